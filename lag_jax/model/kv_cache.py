"""The KV cache: one buffer per layer stacked on L, written at per-sequence offsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from lag_jax.model.config import ModelConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer.

  Attributes:
    k: [L, B, K, S, E] keys after RoPE (and q/k norm), in the compute dtype.
    v: [L, B, K, S, E] values.

  Heads come before slots so that each (b, k) pair's keys are one contiguous
  [S, E] matrix: the attention dots then need no transposed copy of the cache.

  In the decoder's unrolled layer loop (``CausalLM.__call__(layer_params=...)``)
  k and v may instead be tuples of L per-layer [B, K, S, E] arrays
  (``unstacked()``): each layer's attention then reads its own array rather than
  a slice copied out of the stack.

  Slot j of sequence b holds position j. A sequence's valid slots are those at
  positions <= the query's own position: the causal mask is all the bookkeeping
  needed, because decode overwrites padding slots before it can see them.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def length(self) -> int:
    return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]

  def unstacked(self) -> KVCache:
    """The same cache as L per-layer [B, K, S, E] arrays (copies)."""
    if isinstance(self.k, tuple):
      return self
    return KVCache(k=tuple(self.k), v=tuple(self.v))


def write(stack: jax.Array, layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """stack [L, B, K, S, E] <- new [B, T, K, E] at ``layer``, slots positions [B, T].

  A scatter into the whole stack rather than into a per-layer slice: carried
  through the layer scan, the stack is updated in place, where a per-layer
  slice would be copied out and back every step.
  """
  b = jnp.arange(new.shape[0])[:, None]  # [B, 1], broadcast against positions [B, T]
  return stack.at[layer, b, :, positions].set(new.astype(stack.dtype), unique_indices=True)


def write_layer(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """One layer's cache [B, K, S, E] <- new [B, T, K, E] at slots positions [B, T]."""
  b = jnp.arange(new.shape[0])[:, None]
  return cache.at[b, :, positions].set(new.astype(cache.dtype), unique_indices=True)
