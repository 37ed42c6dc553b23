"""Writes a CausalLM as an HF safetensors checkpoint folder (config.json + weights)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from lag_jax.checkpoints.safetensors_loader import hf_keys
from lag_jax.model.config import ModelConfig
from lag_jax.model.transformer import CausalLM


def hf_config_dict(config: ModelConfig) -> dict:
  """An HF ``config.json`` dict that ``ModelConfig.from_hf_dict`` reads back equal."""
  d = {
    "model_type": config.model_type,
    "architectures": [
      {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
      }[config.model_type]
    ],
    "hidden_act": "silu",
    "rope_theta": config.rope_theta,
    "eos_token_id": list(config.eos_token_id) or None,
  }
  for f in (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "mlp_bias",
    "bos_token_id",
  ):
    d[f] = getattr(config, f)
  if config.model_type != "qwen2":
    d["attention_bias"] = config.attention_bias
  if config.sliding_window:
    d["sliding_window"] = config.sliding_window
  if config.rope_scaling:
    d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
  return d


def save_model(model: CausalLM, folder: str | os.PathLike) -> None:
  """Writes config.json + model.safetensors; the folder appears only when complete."""
  folder = os.fspath(folder)
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    tensors = {}
    for path_tuple, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      path = ".".join(str(p) for p in path_tuple)
      value = np.asarray(var[...])
      keys = hf_keys(path, model.config.num_hidden_layers)
      if path.startswith("model.layers."):
        for i, key in enumerate(keys):
          tensors[key] = np.ascontiguousarray(value[i])
      else:
        tensors[keys[0]] = value
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_dict(model.config), f, indent=2)
    if os.path.exists(folder):
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
