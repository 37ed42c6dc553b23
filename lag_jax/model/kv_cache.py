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
    k: [L, B, S, K, E] keys after RoPE (and q/k norm), in the compute dtype.
    v: [L, B, S, K, E] values.

  Slot j of sequence b holds position j. A sequence's valid slots are those at
  positions <= the query's own position: the causal mask is all the bookkeeping
  needed, because decode overwrites padding slots before it can see them.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads,
             config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def length(self) -> int:
    return self.k.shape[2]


def write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buffer [B, S, K, E] <- new [B, T, K, E] at slots start[b] .. start[b] + T - 1."""
  return jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice(buf, x, (s, 0, 0)))(
      buffer, new.astype(buffer.dtype), start)
