"""Writing files so that a failure never leaves a truncated one: a temporary file next
to the target, renamed into place (atomic within one file system)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from lag_jax.integrity import umask


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
