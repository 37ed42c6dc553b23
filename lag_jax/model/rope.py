"""Rotary position embeddings, HF ``rotate_half`` convention, with Llama 3 scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lag_jax.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """[E/2] float32 inverse frequencies, after ``rope_type: llama3`` scaling if set."""
  E = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E))
  s = config.rope_scaling
  if s is not None:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [B, T, heads, E] by positions [B, T]; math in float32."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, E/2]
  cos = jnp.cos(freqs)[:, :, None, :]
  sin = jnp.sin(freqs)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
