"""Sampling methods: small frozen dataclasses with one ``get_next_tokens`` method.

They are hashable, so a sampler is a static argument of the jitted decode loop:
each distinct sampler compiles once. All methods take float32 logits [B, V] and
return int32 token ids [B].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from lag_jax.errors import ConfigError


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
# The values at which a sampling argument does nothing (what Greedy amounts to).
_OFF = {"temperature": (1.0,), "top_k": (None, 0), "top_p": (None, 1.0)}


class SamplerArgumentError(ConfigError):
  """``make_sampler`` got a bad value.

  Attributes:
    argument: the parameter at fault ("sampler" for the name itself).
    value: its value.
  """

  def __init__(self, message: str, argument: str, value: Any):
    super().__init__(message)
    self.argument, self.value = argument, value


def _is_number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def _config_arguments(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  """Checks the sampling arguments and maps the config's "off" values (top_k 0,
  top_p 1) to None."""
  kwargs = dict(kwargs)
  if "temperature" in kwargs:
    t = kwargs["temperature"]
    if not (_is_number(t) and t > 0 and math.isfinite(t)):
      raise SamplerArgumentError(
        f"sampler {name!r}: temperature must be a number > 0, got {t!r} "
        "(use sampler 'greedy' for argmax decoding)",
        "temperature",
        t,
      )
  if kwargs.get("top_k") is not None:
    k = kwargs["top_k"]
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
      raise SamplerArgumentError(
        f"sampler {name!r}: top_k must be an integer >= 0 (0: off), got {k!r}", "top_k", k
      )
    kwargs["top_k"] = k or None
  if kwargs.get("top_p") is not None:
    p = kwargs["top_p"]
    if not (_is_number(p) and 0 < p <= 1):
      raise SamplerArgumentError(
        f"sampler {name!r}: top_p must be in (0, 1] (1: off), got {p!r}", "top_p", p
      )
    kwargs["top_p"] = None if p == 1 else p
  return kwargs


def make_sampler(name: str, **kwargs: Any) -> Greedy | Sample:
  """A sampler from a config: ``make_sampler("greedy")``, or
  ``make_sampler("sample", temperature=0.7, top_p=0.9)``.

  Takes a config's values as they are: ``top_k`` 0 and ``top_p`` 1 mean off (as
  None does), so ``make_sampler("sample", top_k=0, top_p=1.0) == Sample()``. A
  config can pass its sampling fields whatever the name: "greedy" accepts them at
  their neutral values (temperature 1, top_k / top_p off) and refuses others, which
  would silently do nothing.

  Raises:
    SamplerArgumentError: a ``ConfigError`` (so a ``ValueError``) whose ``argument``
      names the parameter at fault: an unknown name ("sampler") or argument,
      temperature <= 0, top_k < 0 or not an integer, top_p outside (0, 1].
  """
  if name not in _SAMPLERS:
    raise SamplerArgumentError(
      f"unknown sampler {name!r}; choose from {sorted(_SAMPLERS)}", "sampler", name
    )
  if name == "greedy":
    active = {k: v for k, v in kwargs.items() if k in _OFF and v not in _OFF[k]}
    if active:
      argument = next(iter(active))
      raise SamplerArgumentError(
        f"sampler 'greedy' takes no sampling arguments, got {active} (use sampler 'sample')",
        argument,
        active[argument],
      )
    kwargs = {k: v for k, v in kwargs.items() if k not in _OFF}
  else:
    kwargs = _config_arguments(name, kwargs)
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(_SAMPLERS[name])})
  if unknown:
    raise SamplerArgumentError(
      f"sampler {name!r}: bad arguments {kwargs} (unknown: {unknown})",
      unknown[0],
      kwargs[unknown[0]],
    )
  return _SAMPLERS[name](**kwargs)
