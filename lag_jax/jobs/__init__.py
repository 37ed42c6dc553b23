"""Jobs that ``lag_jax.run`` dispatches to, by the config's ``job`` field."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections


def _generate(config, workdir):
  from lag_jax.jobs import generate

  return generate.run(config, workdir)


def _build_library(config, workdir):
  from lag_jax.jobs import build_library

  return build_library.run(config, workdir)


def _evaluate(config, workdir):
  from lag_jax.jobs import evaluate

  return evaluate.run(config, workdir)


def _routing_scale(config, workdir):
  from lag_jax.jobs import routing_scale

  return routing_scale.run(config, workdir)


JOBS: dict[str, Callable[[ml_collections.ConfigDict, str], object]] = {
  "generate": _generate,
  "build_library": _build_library,
  "evaluate": _evaluate,
  "routing_scale": _routing_scale,
}


def run(config: ml_collections.ConfigDict, workdir: str):
  if config.job not in JOBS:
    raise ValueError(f"config field 'job'={config.job!r} is unknown; choose from {sorted(JOBS)}")
  return JOBS[config.job](config, workdir)
