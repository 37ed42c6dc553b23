"""Digests and fingerprints: what makes saved work checkable.

- ``array_digest``: sha256 of an array's dtype, shape and bytes. Libraries record one
  per array at save and check them at load, so flipped bits or a truncated file are
  an error rather than garbage logits. sha256 runs at ~1.5 GB/s on one core here
  (SHA extensions) and hashlib releases the GIL, so ``array_digests`` hashes arrays on
  a thread pool.
- ``file_digest`` / ``folder_digest``: sha256 of files (a source PEFT adapter folder).
- ``fingerprint``: sha256 of a JSON-able description (an adapter's training texts,
  recipe and base model), so a rerun can tell that what it would train differs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np

_CHUNK = 1 << 24  # 16 MiB: bounded memory when hashing views of memory-mapped files


def array_digest(x) -> str:
  """'sha256:<hex>' of an array's dtype, shape and C-order bytes."""
  x = np.asarray(x)
  h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
  flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
  for start in range(0, flat.size, _CHUNK):
    h.update(flat[start : start + _CHUNK])
  return "sha256:" + h.hexdigest()


def array_digests(arrays: Mapping[str, object], workers: int | None = None) -> dict[str, str]:
  """{key: array_digest(array)}, hashed in parallel threads."""
  keys = list(arrays)
  workers = workers or min(len(keys), os.cpu_count() or 1) or 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return dict(zip(keys, pool.map(lambda k: array_digest(arrays[k]), keys), strict=True))


def file_digest(path: str | os.PathLike) -> str:
  """'sha256:<hex>' of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return "sha256:" + h.hexdigest()


def folder_digest(path: str | os.PathLike) -> str:
  """'sha256:<hex>' over a folder's regular files (names and bytes, sorted by name;
  hidden files and sub-folders are ignored)."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if name.startswith(".") or not os.path.isfile(full):
      continue
    h.update(name.encode() + b"\0" + file_digest(full).encode() + b"\0")
  return "sha256:" + h.hexdigest()


def fingerprint(obj) -> str:
  """'sha256:<hex>' of a JSON-able object (keys sorted, so dict order is irrelevant)."""
  text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def first_nonfinite(x) -> int | None:
  """Flat index of the first NaN / Inf in an array, or None (always None for bool and
  integer arrays)."""
  x = np.asarray(x)
  if x.dtype.kind in "biu":
    return None
  bad = ~np.isfinite(x)
  return int(np.flatnonzero(bad)[0]) if bad.any() else None


def umask() -> int:
  """The process's umask (files written through mkstemp / mkdtemp get 0600 / 0700;
  chmod them to ``0o666 & ~umask()`` / ``folder_mode()`` before publishing)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def folder_mode() -> int:
  """The mode ``os.makedirs`` gives a new folder: 0o777 less the process umask."""
  return 0o777 & ~umask()
