"""Tiny random HF reference models, saved to a folder, for parity tests."""

from __future__ import annotations

import torch
import transformers

ARCHS = {
  "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
  "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
# name -> (num_attention_heads, num_key_value_heads)
ATTENTION = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def tiny_hf_model(
  arch: str = "llama", attention: str = "gqa", tied: bool = False, seed: int = 0, **overrides
):
  """A random tiny HF causal LM in float32 eval mode."""
  config_cls, model_cls = ARCHS[arch]
  H, K = ATTENTION[attention]
  kwargs = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=H,
    num_key_value_heads=K,
    head_dim=8,
    max_position_embeddings=256,
    tie_word_embeddings=tied,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  if arch == "llama":
    kwargs["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32,
    }
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kwargs)).eval()
  # Random init leaves norms at 1 and biases at 0: perturb them so they are tested.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_tiny(path, **kwargs):
  model = tiny_hf_model(**kwargs)
  model.save_pretrained(path)
  return model
