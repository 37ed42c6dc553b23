"""Parameter-holding building blocks: Linear (the one LoRA hook), RMSNorm, Embedding.

Parameters are stored in HF layout (``weight`` is O x I) so a checkpoint maps onto
them one to one. ``stack`` prepends axes (the layer axis L) so that a whole decoder
stack lives in one array per parameter and the forward pass can ``lax.scan`` it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type


class LoraWeights(NamedTuple):
  """A low-rank delta for one linear module: ``delta(x) = (x @ a.T) @ b.T``.

  The LoRA scale is folded into ``b``. Shapes: a [..., R, I], b [..., O, R], with
  an optional leading L axis while stacked over layers. Zero rows in ``a`` (rank
  padding, or an adapter that does not cover this layer) contribute nothing.
  """

  a: jax.Array
  b: jax.Array


def lora_delta(x: jax.Array, lora: LoraWeights) -> jax.Array:
  """x [..., I] -> [..., O] through a rank-R adapter; computed in x's dtype."""
  r = jnp.einsum("...i,ri->...r", x, lora.a.astype(x.dtype))
  return jnp.einsum("...r,or->...o", r, lora.b.astype(x.dtype))


class AdapterHook(Protocol):
  """Where adapters enter the decoder.

  The decoder scans over layers: ``per_layer()`` is a pytree whose leaves carry a
  leading L axis, and inside the scan ``delta`` receives one layer's slice of it.
  Implementations are pytrees (they are arguments of jitted functions).
  """

  def per_layer(self) -> Any: ...

  def delta(self, layer_xs: Any, name: str, x: jax.Array) -> tuple[jax.Array | None, Any]:
    """The delta [..., O] to add to module ``name``'s output for input x [..., I]
    (None for no delta), and telemetry to return per layer (None for none)."""
    ...


@runtime_checkable
class RequestLevelHook(AdapterHook, Protocol):
  """An AdapterHook whose routing needs per-request state computed from the prompt
  first (request-level routers: ``lag_jax.routing.request``; ``RoutedAdapters``
  implements it). ``generate`` drives it:

  1. ``for_prompts(prompt_mask)`` once the prompts are padded ([B, P] bool, the real
     prompt tokens): the hook fits what it pools over to them;
  2. ``request_passes`` prefills (0: none of this, one ordinary prefill): in a
     *resolving* prefill the telemetry carries the request-level quantities, and
     ``split_aux(aux)`` splits it into (the usual telemetry, the state);
  3. ``with_request_state(state)``: the hook that applies that state in the next
     prefill (when ``request_passes`` is 2) and in every decode step. With 3, every
     prefill but the last resolves (each from the state the one before fixed: a
     two-round vote), and the last applies.
  """

  @property
  def request_passes(self) -> int: ...

  def for_prompts(self, prompt_mask) -> RequestLevelHook: ...

  def split_aux(self, aux) -> tuple[Any, Any]: ...

  def with_request_state(self, states) -> RequestLevelHook: ...


@jax.tree_util.register_pytree_node_class
class StaticLora:
  """The same low-rank adapters for every token: module name -> LoraWeights [L, ...]."""

  def __init__(self, lora: dict[str, LoraWeights]):
    self.lora = dict(lora)

  def tree_flatten(self):
    return (self.lora,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children[0])

  def per_layer(self):
    return self.lora

  def delta(self, layer_xs, name, x):
    lora = layer_xs.get(name)
    return (None if lora is None else lora_delta(x, lora)), None


class LayerAdapters:
  """One layer's view of an AdapterHook; Linear modules call it with their name.

  Telemetry the hook returns is collected in ``aux`` (module name -> pytree) so the
  decoder can return it from the layer scan.
  """

  def __init__(self, hook: AdapterHook, layer_xs: Any):
    self.hook, self.layer_xs, self.aux = hook, layer_xs, {}

  def __call__(self, name: str, x: jax.Array) -> jax.Array | None:
    delta, aux = self.hook.delta(self.layer_xs, name, x)
    if aux is not None:
      self.aux[name] = aux
    return delta


class Linear(nnx.Module):
  """y = x W^T + b (+ adapter deltas). Every adaptable module goes through here.

  Attributes:
    name: the HF module name ('q_proj', ...), which adapters are keyed by.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    name: str = "",
    use_bias: bool = False,
    stack: tuple[int, ...] = (),
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.name = name
    shape = (*stack, out_features, in_features)
    self.weight = nnx.Param((0.02 * jax.random.normal(rngs.params(), shape)).astype(param_dtype))
    self.bias = nnx.Param(jnp.zeros((*stack, out_features), param_dtype)) if use_bias else None

  def __call__(self, x: jax.Array, adapters: LayerAdapters | None = None) -> jax.Array:
    """x [..., I] -> [..., O] in x's dtype (the compute dtype)."""
    y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if adapters is not None:
      delta = adapters(self.name, x)
      if delta is not None:
        y = y + delta.astype(y.dtype)
    return y


class RMSNorm(nnx.Module):
  """HF's RMSNorm: normalise in float32, cast back, then scale."""

  def __init__(
    self, dim: int, eps: float, *, stack: tuple[int, ...] = (), param_dtype: Dtype = jnp.float32
  ):
    self.weight = nnx.Param(jnp.ones((*stack, dim), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Embedding(nnx.Module):
  """Token embedding, ``weight`` [V, D]; also the tied output projection."""

  def __init__(self, vocab: int, dim: int, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.weight = nnx.Param(
      (0.02 * jax.random.normal(rngs.params(), (vocab, dim))).astype(param_dtype)
    )

  def __call__(self, tokens: jax.Array, dtype: Dtype) -> jax.Array:
    """tokens [B, T] -> [B, T, D]."""
    return jnp.take(self.weight[...], tokens, axis=0).astype(dtype)

  def attend(self, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> logits [B, T, V] in float32."""
    return jnp.einsum(
      "btd,vd->btv", h, self.weight[...].astype(h.dtype), preferred_element_type=jnp.float32
    )
