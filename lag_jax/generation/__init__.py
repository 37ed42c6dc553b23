"""Batched KV-cached generation and sampling.

``generate`` (the function) shadows the ``generate`` submodule as an attribute of
this package; reach module-level names with ``from lag_jax.generation.generate
import ...``.
"""

from lag_jax.generation.generate import (
  GenerationOutput,
  SamplingState,
  generate,
  perplexity,
  score,
)
from lag_jax.generation.sampling import Greedy, Sample, Sampler, make_sampler

__all__ = [
  "GenerationOutput",
  "Greedy",
  "Sample",
  "Sampler",
  "SamplingState",
  "generate",
  "make_sampler",
  "perplexity",
  "score",
]
