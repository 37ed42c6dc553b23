"""Sampling methods: small frozen dataclasses with one ``get_next_tokens`` method.

They are hashable, so a sampler is a static argument of the jitted decode loop:
each distinct sampler compiles once. All methods take float32 logits [B, V] and
return int32 token ids [B].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp


class Sampler(Protocol):
  def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    """logits [B, V] float32, a PRNG key -> next tokens [B] int32."""
    ...


@dataclasses.dataclass(frozen=True)
class Greedy:
  """The most likely token (ties go to the lowest id, as in ``torch.argmax``)."""

  def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    del rng
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
  """Samples from softmax(logits / temperature), optionally truncated.

  The filters compose in HF's order: temperature, then top-k (keep the k most
  likely tokens), then top-p (nucleus: keep the smallest set of the remaining
  tokens, most likely first, whose cumulative probability is >= top_p; the most
  likely token is always kept, so top_p -> 0 becomes greedy).

  Attributes:
    temperature: > 0; lower is sharper.
    top_k: keep this many tokens, or None for all.
    top_p: in (0, 1]; None or 1 keeps all.
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(
        f"Sample: temperature must be > 0, got {self.temperature} "
        "(use Greedy() for argmax decoding)"
      )
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"Sample: top_k must be >= 1 or None, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"Sample: top_p must be in (0, 1] or None, got {self.top_p}")

  def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32) / self.temperature
    V = logits.shape[-1]
    use_top_p = self.top_p is not None and self.top_p < 1
    if self.top_k is None and not use_top_p:
      return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    # Both filters work on the candidates sorted by decreasing logit: lax.top_k
    # returns them sorted, and with k = V it is a full sort for top-p alone.
    C = V if self.top_k is None else min(self.top_k, V)
    values, ids = jax.lax.top_k(logits, C)  # [B, C] each
    if use_top_p:
      probs = jax.nn.softmax(values, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumsum
      # A candidate is needed while the more likely ones hold < top_p of the mass;
      # the first one has mass_before = 0 and is always kept.
      values = jnp.where(mass_before < self.top_p, values, -jnp.inf)
    choice = jax.random.categorical(rng, values, axis=-1)  # [B] index into C
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


_SAMPLERS = {"greedy": Greedy, "sample": Sample}
_NEUTRAL = {"temperature": 1.0, "top_k": None, "top_p": None}  # what Greedy amounts to


def make_sampler(name: str, **kwargs: Any) -> Greedy | Sample:
  """A sampler from a config: ``make_sampler("greedy")``, or
  ``make_sampler("sample", temperature=0.7, top_p=0.9)``.

  A config can pass its sampling fields whatever the name: "greedy" accepts them
  at their neutral values (temperature 1, top_k / top_p None) and refuses others,
  which would silently do nothing. Unknown names or arguments raise ValueError.
  """
  if name not in _SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose from {sorted(_SAMPLERS)}")
  if name == "greedy":
    active = {k: v for k, v in kwargs.items() if k in _NEUTRAL and v != _NEUTRAL[k]}
    if active:
      raise ValueError(
        f"sampler 'greedy' takes no sampling arguments, got {active} (use sampler 'sample')"
      )
    kwargs = {k: v for k, v in kwargs.items() if k not in _NEUTRAL}
  try:
    return _SAMPLERS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"sampler {name!r}: bad arguments {kwargs} ({e})") from None
