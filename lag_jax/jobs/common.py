"""Pieces every job shares: resolving a checkpoint name, parsing config fields, writing
outputs atomically with the ordinary file mode."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile

import jax.numpy as jnp

from lag_jax.errors import ConfigError
from lag_jax.integrity import umask

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


def default_file_mode() -> int:
  """The mode ``open(path, 'w')`` gives a new file: 0o666 less the process umask."""
  return 0o666 & ~umask()


def publish(tmp: str, path: str) -> None:
  """Moves a finished temporary file into place: gives it the default file mode
  (``mkstemp`` makes files private, 0o600), then renames it over ``path`` (atomic
  within one file system)."""
  os.chmod(tmp, default_file_mode())
  os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs):
  """``with atomic_write(path) as f: ...`` writes a temporary file next to ``path``
  and publishes it when the block ends; an error removes it and leaves ``path`` as
  it was. ``mode``: 'w' (UTF-8 text unless ``encoding`` is given) or 'wb'."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  suffix = os.path.splitext(path)[1]  # e.g. savefig and np.savez look at the extension
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
  if "b" not in mode:
    open_kwargs.setdefault("encoding", "utf-8")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    publish(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temp file in the same folder, then renames it into place with the
  default file mode (``atomic_write``)."""
  with atomic_write(path) as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
