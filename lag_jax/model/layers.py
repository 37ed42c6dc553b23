"""Parameter-holding building blocks: Linear (the one LoRA hook), RMSNorm, Embedding.

Parameters are stored in HF layout (``weight`` is O x I) so a checkpoint maps onto
them one to one. ``stack`` prepends axes (the layer axis L) so that a whole decoder
stack lives in one array per parameter and the forward pass can ``lax.scan`` it.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Linear(nnx.Module):
  """y = x W^T + b (+ a LoRA delta). Every adaptable module goes through here."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
               stack: tuple[int, ...] = (), param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    shape = (*stack, out_features, in_features)
    self.weight = nnx.Param(
        (0.02 * jax.random.normal(rngs.params(), shape)).astype(param_dtype))
    self.bias = (nnx.Param(jnp.zeros((*stack, out_features), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array, lora: LoraWeights | None = None) -> jax.Array:
    """x [..., I] -> [..., O] in x's dtype (the compute dtype)."""
    y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if lora is not None:
      y = y + lora_delta(x, lora)
    return y


class RMSNorm(nnx.Module):
  """HF's RMSNorm: normalise in float32, cast back, then scale."""

  def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...] = (),
               param_dtype: Dtype = jnp.float32):
    self.weight = nnx.Param(jnp.ones((*stack, dim), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Embedding(nnx.Module):
  """Token embedding, ``weight`` [V, D]; also the tied output projection."""

  def __init__(self, vocab: int, dim: int, *, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.weight = nnx.Param(
        (0.02 * jax.random.normal(rngs.params(), (vocab, dim))).astype(param_dtype))

  def __call__(self, tokens: jax.Array, dtype: Dtype) -> jax.Array:
    """tokens [B, T] -> [B, T, D]."""
    return jnp.take(self.weight[...], tokens, axis=0).astype(dtype)

  def attend(self, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> logits [B, T, V] in float32."""
    return jnp.einsum("btd,vd->btv", h, self.weight[...].astype(h.dtype),
                      preferred_element_type=jnp.float32)
