"""Decoder architecture, read from a Hugging Face ``config.json``.

One family covers Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3. Anything in a
config that would change the maths and that we do not implement raises
``UnsupportedConfigError`` naming the field, rather than silently computing
something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lag_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedConfigError(UserError):
  """A checkpoint config asks for maths this implementation does not have."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style frequency scaling (``rope_type: llama3``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder. Field names follow HF."""

  model_type: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_hidden_layers: int  # L
  num_attention_heads: int  # H
  num_key_value_heads: int  # K
  head_dim: int  # E
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # bias on q/k/v (Qwen2; Llama's attention_bias)
  o_proj_bias: bool = False  # Llama's attention_bias also biases o_proj
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over E on queries and keys
  sliding_window: int | None = None  # Mistral
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise UnsupportedConfigError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )

  @property
  def q_per_kv(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  def module_shapes(self) -> dict[str, tuple[int, int]]:
    """(O, I) of every linear module that LoRA may adapt, by HF name."""
    D, F, E = self.hidden_size, self.intermediate_size, self.head_dim
    H, K = self.num_attention_heads, self.num_key_value_heads
    return {
      "q_proj": (H * E, D),
      "k_proj": (K * E, D),
      "v_proj": (K * E, D),
      "o_proj": (D, H * E),
      "gate_proj": (F, D),
      "up_proj": (F, D),
      "down_proj": (D, F),
    }

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Validates an HF config dict and converts it. ``source`` names it in errors."""

    def fail(msg):
      raise UnsupportedConfigError(f"{source}: {msg}")

    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      fail(
        f"unknown architecture model_type={model_type!r} "
        f"(architectures={d.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}"
      )
    for key in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
    ):
      if not isinstance(d.get(key), int) or d[key] <= 0:
        fail(f"field {key!r} must be a positive integer, got {d.get(key)!r}")
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
      fail(f"field 'hidden_act'={act!r} is not supported (only 'silu')")
    if d.get("pretraining_tp", 1) not in (1, None):
      # HF computes the same function either way; tp > 1 only splits the matmuls.
      pass
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
      if d.get(key) is not None:
        fail(f"field {key!r} is not supported")
    if d.get("use_sliding_window"):
      fail("field 'use_sliding_window'=true (Qwen2/3 sliding window) is not supported")
    layer_types = d.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
      fail(f"field 'layer_types' has non full-attention layers: {sorted(set(layer_types))}")

    # Rope: transformers >= 5 writes `rope_parameters`; older configs `rope_theta`
    # plus `rope_scaling`.
    rope = dict(d.get("rope_parameters") or {})
    if d.get("rope_scaling"):
      rope.update(d["rope_scaling"])
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
      try:
        scaling = RopeScaling(
          factor=float(rope["factor"]),
          low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
      except KeyError as e:
        fail(f"rope scaling of type 'llama3' lacks field {e.args[0]!r}")
    elif rope_type != "default":
      fail(f"field 'rope_scaling' type {rope_type!r} is not supported (default, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      fail("field 'partial_rotary_factor' != 1 is not supported")

    H = d["num_attention_heads"]
    K = d.get("num_key_value_heads") or H
    E = d.get("head_dim") or d["hidden_size"] // H
    if model_type == "qwen2":
      attention_bias, o_bias = True, False
    else:
      attention_bias = bool(d.get("attention_bias", False))
      o_bias = attention_bias and model_type in ("llama", "mistral")
    eos = d.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    window = d.get("sliding_window") if model_type == "mistral" else None
    return cls(
      model_type=model_type,
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=H,
      num_key_value_heads=K,
      head_dim=E,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      attention_bias=attention_bias,
      o_proj_bias=o_bias,
      mlp_bias=bool(d.get("mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      sliding_window=int(window) if window else None,
      bos_token_id=d.get("bos_token_id"),
      eos_token_id=eos,
    )

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> ModelConfig:
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"{path}: checkpoint config not found") from None
    except json.JSONDecodeError as e:
      raise UnsupportedConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, source=path)
