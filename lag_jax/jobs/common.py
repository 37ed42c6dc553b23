"""Pieces every job shares: resolving a checkpoint name, parsing config fields, writing
outputs atomically with the ordinary file mode."""

from __future__ import annotations

import math
import os

import jax.numpy as jnp

from lag_jax.errors import ConfigError
from lag_jax.files import (  # noqa: F401 (the jobs' writers, re-exported)
  atomic_write,
  default_file_mode,
  publish,
  write_json_atomic,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_checkpoint(name: str) -> str:
  """'smollm2' (the packaged default), 'tiny-random', or a path to an HF folder."""
  if name == "smollm2":
    from lag_jax import assets

    return os.fspath(assets.smollm2_checkpoint())
  if name == "tiny-random":
    from lag_jax import testing

    return os.fspath(testing.tiny_checkpoint())
  if not os.path.isdir(name):
    raise ConfigError(
      f"config field 'checkpoint'={name!r}: no such folder (use "
      "'smollm2', 'tiny-random' or an HF checkpoint folder)"
    )
  return name


TINY_ADAPTERS = {"tiny-random-adapters": "knowledge", "tiny-random-task-adapters": "task"}


def resolve_adapters_dir(name: str) -> str:
  """A folder of PEFT adapters (or a saved library), or a tiny random set by name."""
  if name in TINY_ADAPTERS:
    from lag_jax import testing

    return os.fspath(testing.tiny_adapters(TINY_ADAPTERS[name]))
  return name


def dtype(field: str, name: str):
  if name not in DTYPES:
    raise ConfigError(f"config field {field!r}={name!r}: choose from {sorted(DTYPES)}")
  return DTYPES[name]


def split_list(value) -> list[str]:
  """A config list given as a tuple/list or a comma-separated string."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in value]


def int_list(field: str, value) -> list[int]:
  """``split_list`` as integers: '1,2,3' or (1, 2, 3) -> [1, 2, 3]; '' -> [].

  Raises:
    ConfigError: naming ``field`` and its value, if an item is not an integer.
  """
  out = []
  for item in split_list(value):
    try:
      out.append(int(item))
    except ValueError:
      raise ConfigError(
        f"config field {field!r}={value!r}: expected integers separated by commas, "
        f"e.g. '1,2,3' ({item!r} is not one)"
      ) from None
  return out


def float_list(field: str, value) -> list[float]:
  """``split_list`` as finite floats: '0.5,1' or (0.5, 1) -> [0.5, 1.0]; '' -> [].

  Raises:
    ConfigError: naming ``field`` and its value, if an item is not a finite number.
  """
  out = []
  for item in split_list(value):
    try:
      number = float(item)
    except ValueError:
      number = math.nan
    if not math.isfinite(number):
      raise ConfigError(
        f"config field {field!r}={value!r}: expected numbers separated by commas, "
        f"e.g. '0.5,1' ({item!r} is not a finite number)"
      )
    out.append(number)
  return out
