"""Puts LoRA adapters onto the model: as a separate low-rank path, or merged into W.

Both forms apply ``W x + sum_n w_n s_n B_n A_n x`` for adapters n with weights w_n
and LoRA scales s_n. The low-rank form concatenates the adapters' ranks, which is
exact: [B_1 .. B_N] [A_1; ..; A_N] = sum_n B_n A_n.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lag_jax.adapters.peft_io import AdapterError, LoraAdapter
from lag_jax.model.config import ModelConfig
from lag_jax.model.layers import LoraWeights
from lag_jax.model.transformer import ADAPTABLE_MODULES, ATTENTION_MODULES, CausalLM

_ADAPTABLE_HINT = (
  "model.layers.<i>.self_attn.{q,k,v,o}_proj and model.layers.<i>.mlp.{gate,up,down}_proj"
)


def _parent(module: str) -> str:
  return "self_attn" if module in ATTENTION_MODULES else "mlp"


def validate_adapter(adapter: LoraAdapter, config: ModelConfig) -> None:
  """Checks that ``adapter`` fits the base model ``config``.

  Raises:
    AdapterError: a module the model lacks or cannot adapt, a shape that differs
      from the base model's (naming the module), or NaN / Inf weights.
  """
  where = f"adapter {adapter.name!r}"
  shapes = config.module_shapes()
  L = config.num_hidden_layers
  for path, m in adapter.modules.items():
    if (
      m.layer is None
      or m.module not in ADAPTABLE_MODULES
      or path != f"model.layers.{m.layer}.{_parent(m.module)}.{m.module}"
    ):
      raise AdapterError(
        f"{where}: module {path} is not one the model can adapt (LoRA is "
        f"supported on {_ADAPTABLE_HINT})"
      )
    if m.layer >= L:
      raise AdapterError(
        f"{where}: module {path} is in layer {m.layer}, but the base model "
        f"has {L} layers — is this adapter for another base model?"
      )
    out_dim, in_dim = shapes[m.module]
    for part, t, want in (("lora_A", m.a, (m.r, in_dim)), ("lora_B", m.b, (out_dim, m.r))):
      if tuple(t.shape) != want:
        raise AdapterError(
          f"{where}: module {path} has {part} of shape {tuple(t.shape)} but the base "
          f"model's {m.module} is {(out_dim, in_dim)} — is this adapter for another base model?"
        )
    for part, t in (("lora_A", m.a), ("lora_B", m.b)):
      if not np.isfinite(t.astype(np.float32)).all():
        raise AdapterError(f"{where}: module {path} has NaN or Inf values in {part}")


def stack_lora(
  adapters: LoraAdapter | Sequence[LoraAdapter],
  config: ModelConfig,
  weights: Sequence[float] | None = None,
  dtype=jnp.float32,
) -> dict[str, LoraWeights]:
  """The model-side ``lora`` pytree for one adapter or a weighted set of N.

  For each module name any adapter adapts, the adapters' ranks are concatenated:
  adapter n takes a slot of R_n columns (its largest rank for that module over
  layers; smaller per-layer ranks are zero-padded), and its B is multiplied by its
  scale times w_n. Layers an adapter does not cover hold zeros.

  Args:
    adapters: a LoraAdapter or a sequence of N of them, all validated against config.
    weights: N mixing weights w_n; default all 1.
    dtype: dtype of the returned arrays.
  Returns:
    module name -> LoraWeights(a [L, sum R_n, I], b [L, O, sum R_n]); modules no
    adapter touches are absent.
  """
  if isinstance(adapters, LoraAdapter):
    adapters = [adapters]
  if weights is None:
    weights = [1.0] * len(adapters)
  if len(weights) != len(adapters):
    raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
  for adapter in adapters:
    validate_adapter(adapter, config)
  shapes, L = config.module_shapes(), config.num_hidden_layers
  out = {}
  for name in ADAPTABLE_MODULES:
    # Slot width of each adapter for this module: its largest rank over layers.
    widths = [
      max((m.r for m in ad.modules.values() if m.module == name), default=0) for ad in adapters
    ]
    total = sum(widths)
    if total == 0:
      continue
    out_dim, in_dim = shapes[name]
    # Assembled on the host in float32 (float64 for float64 adapters) and cast once.
    host_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    a = np.zeros((L, total, in_dim), host_dtype)
    b = np.zeros((L, out_dim, total), host_dtype)
    offset = 0
    for adapter, w, width in zip(adapters, weights, widths, strict=True):
      for m in adapter.modules.values():
        if m.module == name:
          a[m.layer, offset : offset + m.r] = _to_float(m.a, host_dtype)
          b[m.layer, :, offset : offset + m.r] = _to_float(m.b, host_dtype) * host_dtype(
            m.scale * w
          )
      offset += width
    out[name] = LoraWeights(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype))
  return out


def _to_float(t: np.ndarray, dtype) -> np.ndarray:
  if t.dtype == ml_dtypes.bfloat16:
    t = t.astype(np.float32)
  return t.astype(dtype)


def merge_into_model(
  model: CausalLM,
  adapters: LoraAdapter | Sequence[LoraAdapter],
  weights: Sequence[float] | None = None,
) -> CausalLM:
  """A new model with ``W += sum_n w_n s_n B_n A_n`` on every adapted module.

  The input model is left untouched. The sum is formed in float32 at full matmul
  precision and added to W in float32, then cast back to W's dtype; W keeps its
  sharding.
  """
  lora = stack_lora(adapters, model.config, weights, dtype=jnp.float32)
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  new_flat = []
  for path, var in flat:
    keys = tuple(str(p) for p in path)
    if (
      len(keys) == 5
      and keys[:2] == ("model", "layers")
      and keys[-1] == "weight"
      and keys[3] in lora
    ):
      lw = lora[keys[3]]
      w = var.get_value()
      delta = jnp.einsum("lor,lri->loi", lw.b, lw.a, precision=jax.lax.Precision.HIGHEST)
      merged = (w.astype(jnp.float32) + delta).astype(w.dtype)
      var = var.replace(value=jax.device_put(merged, w.sharding))
    new_flat.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(new_flat))
