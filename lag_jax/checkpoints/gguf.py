"""Converts a llama.cpp GGUF file (Llama architecture) into an HF checkpoint folder.

The folder holds what an HF Llama checkpoint holds: ``config.json``,
``model.safetensors`` (float32, HF tensor names), ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template). Quantised weights are
dequantised with ``gguf.quants.dequantize``; the numbers are those of the
quantised model, not of the original float checkpoint.

Two layout facts of llama.cpp's converter are undone here:

* GGUF lists tensor dimensions innermost first, so a tensor HF stores as
  (O, I) is described as (I, O); the bytes are the same row-major (O, I) array.
* llama.cpp's rope rotates adjacent pairs (x0, x1), (x2, x3), ... whereas HF's
  rotates halves (x_j, x_{j+E/2}). Its converter therefore permutes the rows of
  q_proj and k_proj within each head; ``_unpermute_rope_rows`` inverts that.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import gguf
import numpy as np
import safetensors.numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from lag_jax.errors import UserError

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3

# GGUF tensor name -> HF tensor name, per layer ({i} is the layer index).
_LAYER_TENSORS = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}

# llama.cpp pre-tokenizer names this converter can reproduce with `tokenizers`.
_SUPPORTED_PRE_TOKENIZERS = ("smollm", "gpt-2", "default")


class GGUFConversionError(UserError):
  """A GGUF file is unreadable, incomplete, or holds something we cannot convert."""


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes an HF Llama checkpoint folder converted from a GGUF file.

  Args:
    gguf_path: a llama.cpp GGUF file of architecture ``llama`` with a
      byte-level BPE (``gpt2``) tokenizer.
    out_dir: folder to write into (created if missing). Files already there with
      the same names are overwritten.
  Returns:
    ``out_dir`` as a Path, now holding ``config.json``, ``model.safetensors``,
    ``tokenizer.json`` and ``tokenizer_config.json``.
  Raises:
    GGUFConversionError: naming the file, when it is truncated or unreadable, a
      metadata key or tensor is missing or has the wrong shape, or it uses
      features this converter does not implement.
  """
  gguf_path = pathlib.Path(gguf_path)
  out_dir = pathlib.Path(out_dir)
  reader = _open(gguf_path)
  meta = _Metadata(reader, gguf_path)
  config = _hf_config(meta)
  tensors = _hf_tensors(reader, config, gguf_path)
  tok, tok_config = _hf_tokenizer(meta, config)

  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / "config.json", "w") as f:
    json.dump(config, f, indent=2)
  # "format": "pt" is what transformers checks before loading a safetensors file.
  safetensors.numpy.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
  tok.save(str(out_dir / "tokenizer.json"))
  with open(out_dir / "tokenizer_config.json", "w") as f:
    json.dump(tok_config, f, indent=2, ensure_ascii=False)
  return out_dir


def _open(path: pathlib.Path) -> gguf.GGUFReader:
  if not path.is_file():
    raise GGUFConversionError(f"{path}: GGUF file not found")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # The reader raises ValueError, IndexError, struct errors...
    raise GGUFConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
  # A truncated file can still parse (tensor data are memory-mapped slices), so the
  # tensor extents are checked against the file size.
  size = path.stat().st_size
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise GGUFConversionError(
        f"{path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
        f"but the file has {size} bytes"
      )
  return reader


class _Metadata:
  """Typed access to GGUF key/values, with errors that name the file and key."""

  def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path):
    self.fields = reader.fields
    self.path = path

  def get(self, key: str, default: Any = None) -> Any:
    field = self.fields.get(key)
    if field is None:
      return default
    try:
      return field.contents()
    except Exception as e:
      raise GGUFConversionError(f"{self.path}: metadata key {key!r} is unreadable ({e})") from e

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise GGUFConversionError(f"{self.path}: metadata key {key!r} is missing")
    return value

  def fail(self, msg: str):
    raise GGUFConversionError(f"{self.path}: {msg}")


def _float32_decimal(x: float) -> float:
  """The shortest decimal that rounds to the same float32 (1e-05, not 9.99999974e-06).

  GGUF stores eps and theta as float32; the checkpoint authors wrote decimals.
  """
  return float(str(np.float32(x)))


def _hf_config(meta: _Metadata) -> dict[str, Any]:
  arch = meta.require("general.architecture")
  if arch != "llama":
    meta.fail(f"architecture {arch!r} is not supported (only 'llama')")
  p = f"{arch}."
  D = int(meta.require(p + "embedding_length"))
  H = int(meta.require(p + "attention.head_count"))
  K = int(meta.get(p + "attention.head_count_kv", H))
  E = int(meta.get(p + "attention.key_length", D // H))
  if int(meta.get(p + "attention.value_length", E)) != E:
    meta.fail("attention.value_length != attention.key_length is not supported")
  if int(meta.get(p + "rope.dimension_count", E)) != E:
    meta.fail(f"partial rotary embeddings (rope.dimension_count != {E}) are not supported")
  scaling = meta.get(p + "rope.scaling.type")
  if scaling not in (None, "none"):
    meta.fail(f"rope scaling {scaling!r} is not supported")
  tokens = meta.require("tokenizer.ggml.tokens")
  vocab_size = int(meta.get(p + "vocab_size", len(tokens)))
  config: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": vocab_size,
    "hidden_size": D,
    "intermediate_size": int(meta.require(p + "feed_forward_length")),
    "num_hidden_layers": int(meta.require(p + "block_count")),
    "num_attention_heads": H,
    "num_key_value_heads": K,
    "head_dim": E,
    "hidden_act": "silu",
    "rms_norm_eps": _float32_decimal(meta.require(p + "attention.layer_norm_rms_epsilon")),
    "rope_theta": _float32_decimal(meta.get(p + "rope.freq_base", 10000.0)),
    "rope_scaling": None,
    "max_position_embeddings": int(meta.require(p + "context_length")),
    "tie_word_embeddings": True,  # revised by _hf_tensors if output.weight exists
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
  }
  for hf_key, gguf_key in (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "padding_token_id"),
  ):
    value = meta.get(f"tokenizer.ggml.{gguf_key}")
    if value is not None:
      config[hf_key] = int(value)
  return config


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: [n_heads * E, I] -> same shape.

  llama.cpp's converter views each head's E rows as (2, E/2) (HF's two rope
  halves) and transposes them to (E/2, 2), interleaving the halves into the
  adjacent pairs its rope rotates. The inverse views the rows as (E/2, 2) and
  transposes back.
  """
  rows, cols = w.shape
  E = rows // n_heads
  return w.reshape(n_heads, E // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_tensors(
  reader: gguf.GGUFReader, config: dict[str, Any], path: pathlib.Path
) -> dict[str, np.ndarray]:
  """Dequantises every tensor to float32 under its HF name; revises tie_word_embeddings."""
  c = config
  D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  H, K, E = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
  hf_shapes = {
    "self_attn.q_proj": (H * E, D),
    "self_attn.k_proj": (K * E, D),
    "self_attn.v_proj": (K * E, D),
    "self_attn.o_proj": (D, H * E),
    "mlp.gate_proj": (F, D),
    "mlp.up_proj": (F, D),
    "mlp.down_proj": (D, F),
    "input_layernorm": (D,),
    "post_attention_layernorm": (D,),
  }
  # (gguf name, hf name, hf shape)
  wanted = [
    ("token_embd.weight", "model.embed_tokens.weight", (V, D)),
    ("output_norm.weight", "model.norm.weight", (D,)),
  ]
  for i in range(c["num_hidden_layers"]):
    for g, h in _LAYER_TENSORS.items():
      wanted.append((f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", hf_shapes[h]))
  by_name = {t.name: t for t in reader.tensors}
  if "output.weight" in by_name:
    wanted.append(("output.weight", "lm_head.weight", (V, D)))
    c["tie_word_embeddings"] = False
  unexpected = sorted(set(by_name) - {g for g, _, _ in wanted})
  if unexpected:
    # E.g. rope_freqs (Llama 3 rope scaling) or biases: dropping them would compute
    # a different model.
    raise GGUFConversionError(f"{path}: tensors this converter does not handle: {unexpected[:5]}")

  out = {}
  for g, h, shape in wanted:
    t = by_name.get(g)
    if t is None:
      raise GGUFConversionError(f"{path}: tensor {g!r} (for {h}) is missing")
    # GGUF lists dimensions innermost first.
    gguf_shape = tuple(int(n) for n in reversed(t.shape))
    if gguf_shape != shape:
      raise GGUFConversionError(
        f"{path}: tensor {g!r} has shape {gguf_shape} (HF order), expected {shape}"
      )
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise GGUFConversionError(
        f"{path}: cannot dequantise tensor {g!r} of type {t.tensor_type.name} ({e})"
      ) from e
    w = np.asarray(w, dtype=np.float32).reshape(shape)
    if g.endswith(("attn_q.weight", "attn_k.weight")):
      w = _unpermute_rope_rows(w, H if "attn_q" in g else K)
    out[h] = np.ascontiguousarray(w)
  return out


def _hf_tokenizer(
  meta: _Metadata, config: dict[str, Any]
) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
  """Rebuilds llama.cpp's byte-level BPE as a `tokenizers` object plus tokenizer_config."""
  kind = meta.require("tokenizer.ggml.model")
  if kind != "gpt2":
    meta.fail(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2')")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in _SUPPORTED_PRE_TOKENIZERS:
    meta.fail(f"tokenizer.ggml.pre {pre!r} is not supported ({_SUPPORTED_PRE_TOKENIZERS})")
  tokens = list(meta.require("tokenizer.ggml.tokens"))
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = meta.require("tokenizer.ggml.merges")
  if len(types) != len(tokens):
    meta.fail(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
  pairs = []
  for m in merges:
    # Byte-level symbols never contain a space (it is mapped to 'Ġ'), so the one
    # space separates the pair.
    a, sep, b = m.partition(" ")
    if not sep:
      meta.fail(f"tokenizer.ggml.merges entry {m!r} is not 'left right'")
    pairs.append((a, b))

  vocab = {t: i for i, t in enumerate(tokens)}
  tok = tokenizers.Tokenizer(
    models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
  )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    # SmolLM splits every digit into its own token before the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  control = [tokens[i] for i, ty in enumerate(types) if ty == _TOKEN_TYPE_CONTROL]
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in control]
  )

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  tok_config: dict[str, Any] = {
    # PreTrainedTokenizerFast takes tokenizer.json as is; a model-specific class
    # might rebuild the pipeline from vocab and merges.
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": token("bos_token_id"),
    "eos_token": token("eos_token_id"),
    "unk_token": token("unknown_token_id"),
    "pad_token": token("padding_token_id"),
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": config["max_position_embeddings"],
  }
  template = meta.get("tokenizer.chat_template")
  if template is not None:
    tok_config["chat_template"] = template
  return tok, tok_config
