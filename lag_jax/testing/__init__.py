"""A tiny random checkpoint with a real tokenizer, for tests and ``:tiny`` configs.

The model is a random 2-layer Llama; the tokenizer is byte-level BPE with no merges
(one token per byte) plus ChatML control tokens, and a ChatML chat template. It is
written once into the cache and reused.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax.numpy as jnp
import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers

from lag_jax.checkpoints.hf_writer import save_model
from lag_jax.model.config import ModelConfig
from lag_jax.model.transformer import CausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_config(**overrides) -> ModelConfig:
  kw = dict(
    model_type="llama",
    vocab_size=272,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=(258,),
  )
  kw.update(overrides)
  return ModelConfig(**kw)


def byte_tokenizer() -> tokenizers.Tokenizer:
  """Byte-level BPE without merges: ids 0-255 are bytes, 256.. the control tokens."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_to_unicode = sorted(alphabet)
  vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL_TOKENS])
  return tok


def write_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, **overrides) -> pathlib.Path:
  """Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
  folder = pathlib.Path(folder)
  model = CausalLM(tiny_config(**overrides), param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
  try:
    save_model(model, tmp / "hf")
    byte_tokenizer().save(str(tmp / "hf" / "tokenizer.json"))
    (tmp / "hf" / "tokenizer_config.json").write_text(
      json.dumps(
        {
          "chat_template": CHATML_TEMPLATE,
          "eos_token": "<|im_end|>",
          "bos_token": None,
          "pad_token": "<|endoftext|>",
        },
        indent=2,
      )
    )
    if folder.exists():
      shutil.rmtree(folder)
    os.replace(tmp / "hf", folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def tiny_checkpoint() -> pathlib.Path:
  """The cached tiny checkpoint folder, written on first use."""
  from lag_jax.assets import cache_dir

  folder = cache_dir() / "models" / "tiny-random-v1"
  if not (folder / "tokenizer_config.json").exists():
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(folder)
  return folder


def write_tiny_adapters(
  folder: str | os.PathLike, kind: str, n: int | None = None, seed: int = 0
) -> pathlib.Path:
  """Random PEFT adapters for the tiny model, one sub-folder each.

  kind 'knowledge': n (default 8) adapters of ranks 4-6 on gate/up/down;
  kind 'task': n (default 3) adapters of rank 8 on q/k/v/o.
  """
  from lag_jax.adapters import save_peft_adapter
  from lag_jax.testing.libraries import random_lora

  if kind == "knowledge":
    n, targets, ranks = n or 8, ["gate_proj", "up_proj", "down_proj"], (4, 5, 6)
  elif kind == "task":
    n, targets, ranks = n or 3, ["q_proj", "k_proj", "v_proj", "o_proj"], (8,)
  else:
    raise ValueError(f"kind must be 'knowledge' or 'task', got {kind!r}")
  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
  try:
    for i in range(n):
      r = ranks[i % len(ranks)]
      adapter = random_lora(
        tiny_config(), f"{kind}-{i:02d}", r=r, alpha=2 * r, target_modules=targets, seed=seed + i
      )
      save_peft_adapter(adapter, tmp / f"{kind}-{i:02d}")
    if folder.exists():
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def tiny_adapters(kind: str) -> pathlib.Path:
  """The cached folder of tiny random adapters of ``kind``, written on first use."""
  from lag_jax.assets import cache_dir

  folder = cache_dir() / "adapters" / f"tiny-random-{kind}-v1"
  if not folder.exists():
    write_tiny_adapters(folder, kind)
  return folder
