"""Pieces every job shares: resolving a checkpoint name, loading model + tokenizer."""

from __future__ import annotations

import json
import os
import tempfile

import jax.numpy as jnp

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
    raise FileNotFoundError(
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
    raise ValueError(f"config field {field!r}={name!r}: choose from {sorted(DTYPES)}")
  return DTYPES[name]


def split_list(value) -> list[str]:
  """A config list given as a tuple/list or a comma-separated string."""
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return [str(v) for v in value]


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temp file in the same folder, then renames it into place."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
