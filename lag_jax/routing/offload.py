"""A library larger than device memory: arrows on the device, A* / B* on the host.

Placement. Routing needs only the arrows (and valid flags): [L, I, N] per module stay
resident on the device. The factors A* [L, N, R, I] and B* [L, N, O, R] live in host
memory (numpy) or on disk (one ``.npy`` file per module and factor, memory-mapped;
see ``OffloadWriter`` / ``save_offloaded``; ``offload.json`` records every file's size
and block digests, which ``OffloadedLibrary.open`` checks). A device-side cache holds
recently used adapters: per module, a fixed number of A* slots [S_a + 1, R, I] and B*
slots [S_b + 1, O, R] (the extra slot is a zero scratch row), keyed by (layer, adapter
id) and shared by all layers, with least-recently-used eviction. The host keeps the
directory (which key sits in which slot) and the hit / miss counters.

Routing: the routing core (``core.route_module``, every router, request-level ones
and shared-direction removal included) with the ``Offloaded`` placement, per layer and
module inside the jitted layer scan (so ``generate``'s prefill and its ``while_loop``
decode work unchanged). Where a router reads factors by id (``a_rows`` / ``b_rows``):

  1. an ordered ``io_callback`` sends the ids (e.g. the candidates, [B, T, k] int32)
     to the host, which looks them up, assigns slots to the misses (evicting LRU keys
     not used by this call) and returns every id's slot and the number of chunks;
  2. a ``fori_loop`` of ordered callbacks returns the missing rows, M at a time
     (M = min(``chunk_rows``, the most rows this call can need): slot ids + rows),
     which the device scatters into the cache. The caches are ``jax.Ref``s: mutable
     device buffers that persist across layers, decode steps and calls, and whose
     reads and writes keep program order. They hold the factors' bit patterns as
     unsigned integers (XLA:CPU runs a bfloat16 scatter as float32 over the whole
     buffer) and are bit-cast back when read;
  3. the rows are gathered from the cache and used as the resident library's would be
     (dense and grouped projections fetch every adapter's A* into id order).
LAG fetches its candidates' A*, then its winners' B*; the same arithmetic on the same
rows in the same shapes, so the ids are the resident library's and the outputs agree
to float rounding (tests: atol 1e-6, float32).

Bytes moved per decode step, per layer and module (O x I), B tokens, k candidates,
rank R, factor itemsize s: host -> device, only misses: m_a R I s + m_b O R s with
m_a <= min(B k, N) distinct (layer, id) candidates and m_b <= min(B, N) winners,
rounded up to whole chunks of M rows; device -> host, the ids (4 B k + 4 B bytes)
and back their slots. Worst case (every candidate a miss) for
SmolLM2's gate/up/down at k = 20, R = 6, bfloat16: 689 KB per token and layer, 20.7
MB per token over 30 layers; with every candidate cached, about 1 KB of ids. Nothing
per step grows with N but the arrow scores, which are on the device anyway. Host
round trips: two per routed module and layer (the A* and B* plans) plus one per chunk
of misses; about 0.45 ms each on this 2-core CPU (benchmarks/results/offload.md), so
with everything cached that overhead, not bytes, is what the offload adds.

Why callbacks: routing is data-dependent and ``generate`` runs the whole decode loop
as one XLA program, so the host must be asked from inside it; the alternative of a
two-phase step per layer from Python would give up the compiled loop. One round trip
per factor keeps B* off the wire for the k - 1 losers (B* is 2.7x A* for gate/up).

Reductions over every adapter (SpectR's arg-max, the uniform merge) stream the
factors, ``stream_chunk`` adapters per callback, straight through the device (not
through the cache, which they would flush): exact, but every token then moves the
whole A* (and B* for uniform), N R I s bytes per layer and module, as slow as SpectR
is known to be. Shared-direction removal streams the files twice, once, and caches
its result beside the library (``remove_shared_offloaded``).

On TPU / GPU: the caches and arrows are HBM; io_callback results are copied host to
device (PCIe / host DMA), which is what the byte counts above measure. JAX's host
offload memory kinds give a callback-free variant for libraries that fit in host
RAM: put A* / B* in ``memory_kind="pinned_host"`` (``NamedSharding(...,
memory_kind="pinned_host")``), gather the candidates' rows on the host inside the
jitted step (``compute_on("device_host")``) and ``jax.device_put`` them to
``memory_kind="device"``; XLA then schedules the DMAs itself. Libraries beyond host
RAM (e.g. 450 GB of float32 factors for N = 100k at SmolLM2's 30 layers) need the
disk path here (memory-mapped files, or tensorstore in the same callbacks). On this
CPU-only machine "device" and host memory are the same RAM: the transfers are
memcpys, and device bytes are counted as the bytes of the jax arrays held.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import io_callback

from lag_jax.adapters.peft_io import AdapterError
from lag_jax.errors import IntegrityError
from lag_jax.integrity import array_digest, first_nonfinite
from lag_jax.routing import core
from lag_jax.routing.library import AdapterLibrary, LibraryWeights, NamedAdapters

FACTORS = ("a", "b")
MANIFEST = "offload.json"
_FORMAT_VERSION = 1
VERIFY = ("full", "lazy", "size")
# Digests are recorded per block of a file's data (whole rows of A* / B*, about this
# many bytes): the unit that ``verify="lazy"`` checks on first read, and what an
# error locates (layer and adapters).
_BLOCK_BYTES = 1 << 20
_SEGMENT_BLOCKS = 64  # blocks per task when hashing on a thread pool


# --- Files ----------------------------------------------------------------------------


def _file(module: str, field: str) -> str:
  return f"{module}.{field}.npy"


def _numpy_storage(dtype) -> np.dtype:
  """The dtype an array is written as: itself if numpy has it, else raw bits (bfloat16
  -> uint16; ml_dtypes' types do not survive a .npy header)."""
  dtype = np.dtype(dtype)
  if dtype.kind in "biuf" and dtype.name in np.sctypeDict:
    return dtype
  return np.dtype(f"u{dtype.itemsize}")


def _bits(dtype) -> np.dtype:
  """The unsigned integer type of ``dtype``'s width: device caches hold bit patterns,
  since XLA:CPU runs a bfloat16 scatter as float32 over the whole buffer (it converted
  a 75 MB cache twice per 64-row write: 140 ms, against 0.35 ms for uint16)."""
  return np.dtype(f"u{np.dtype(dtype).itemsize}")


# --- Integrity: what offload.json records of each file, and how it is checked ------------
#
# Per file the manifest records its shape, dtype and size, a digest of its .npy header
# and sha256 digests of its data in blocks of whole rows (about _BLOCK_BYTES each).
# Opening checks every file's presence, header, shape, dtype and size, then the digests
# and finiteness of what ``verify`` asks for (see ``OffloadedLibrary.open``).


def _unit(shape: Sequence[int], n_axis: int, itemsize: int) -> int:
  """Bytes of one index of the adapter axis and all after it (one A* / B* row)."""
  return math.prod(shape[n_axis + 1 :]) * itemsize


def _block_bytes(unit: int) -> int:
  """Bytes per digest block: whole rows of ``unit`` bytes, about _BLOCK_BYTES."""
  return max(1, _BLOCK_BYTES // unit) * unit


def _segments(n: int) -> list[tuple[int, int]]:
  return [(j, min(j + _SEGMENT_BLOCKS, n)) for j in range(0, n, _SEGMENT_BLOCKS)]


def _read_header(path: str) -> tuple[bytes, tuple[int, ...], bool, np.dtype]:
  """(header bytes, shape, fortran_order, dtype) of a .npy file (raises on a bad one)."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read = {
      (1, 0): np.lib.format.read_array_header_1_0,
      (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read is None:
      raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    offset = f.tell()
    f.seek(0)
    return f.read(offset), tuple(shape), bool(fortran), dtype


def _digest(buf) -> str:
  return array_digest(np.frombuffer(buf, np.uint8))


def _digest_segment(path: str, offset: int, nbytes: int, K: int, j0: int, j1: int) -> list[str]:
  """Digests of data blocks [j0, j1) of a file (read with pread: nothing is mapped)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    return [_digest(os.pread(fd, min(K, nbytes - j * K), offset + j * K)) for j in range(j0, j1)]
  finally:
    os.close(fd)


def _describe(files: Sequence[tuple[str, Any, tuple[int, ...], int]]) -> dict[str, dict]:
  """The manifest's record of finished files (path, dtype, shape, adapter axis), by file
  name: shape, dtype, bytes, the header's digest and the data's block digests (read back
  from the files, hashed on a thread pool)."""
  entries, jobs = {}, {}
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    for path, dtype, shape, n_axis in files:
      storage = _numpy_storage(dtype)
      nbytes = math.prod(shape) * storage.itemsize
      header = _read_header(path)[0]
      K = _block_bytes(_unit(shape, n_axis, storage.itemsize))
      name = os.path.basename(path)
      entries[name] = {
        "shape": list(shape),
        "dtype": np.dtype(dtype).name,
        "bytes": len(header) + nbytes,
        "header": _digest(header),
        "block_bytes": K,
      }
      jobs[name] = [
        pool.submit(_digest_segment, path, len(header), nbytes, K, j0, j1)
        for j0, j1 in _segments(-(-nbytes // K))
      ]
    for name, futures in jobs.items():
      entries[name]["blocks"] = [d for f in futures for d in f.result()]
  return entries


class _FileCheck:
  """One data file's block digests (None where the manifest has none: then only the
  values are checked) and which blocks have been verified. Checks blocks of the file
  (``data``: of an in-memory copy of its data) against their digests, then their
  values for NaN / Inf."""

  def __init__(self, where, path, offset, dtype, shape, n_axis, names, entry=None, data=None):
    self.where, self.path, self.offset = where, path, offset
    self.dtype, self.shape, self.n_axis, self.names = np.dtype(dtype), shape, n_axis, names
    self.itemsize = _numpy_storage(dtype).itemsize
    self.nbytes = math.prod(shape) * self.itemsize
    self.unit = _unit(shape, n_axis, self.itemsize)
    if entry is None:
      self.K, self.digests = _block_bytes(self.unit), None
    else:
      self.K, self.digests = int(entry["block_bytes"]), list(entry["blocks"])
    self.data = data  # uint8 [nbytes] or None: read the file
    self.verified = np.zeros(-(-self.nbytes // self.K), bool)

  @property
  def num_blocks(self) -> int:
    return len(self.verified)

  def _at(self, element: int) -> str:
    idx = tuple(int(i) for i in np.unravel_index(element, self.shape))
    return f"layer {idx[0]}, adapter {self.names[idx[self.n_axis]]!r} (index {list(idx)})"

  def _span(self, lo: int, hi: int) -> str:
    first = np.unravel_index(lo // self.itemsize, self.shape)
    last = np.unravel_index((hi - 1) // self.itemsize, self.shape)
    if self.n_axis != 1:  # the arrows: adapters are the last axis, a block spans them all
      return f"layer {first[0]}" if first[0] == last[0] else f"layers {first[0]} to {last[0]}"
    a, b = self.names[first[1]], self.names[last[1]]
    if first[0] != last[0]:
      return f"layer {first[0]} adapter {a!r} to layer {last[0]} adapter {b!r}"
    return f"layer {first[0]}, " + (f"adapter {a!r}" if a == b else f"adapters {a!r} to {b!r}")

  def check(self, blocks) -> list[str]:
    """Problems of ``blocks`` (indices), one line each; the good ones become verified."""
    problems = []
    fd = os.open(self.path, os.O_RDONLY) if self.data is None else None
    try:
      for j in blocks:
        lo, hi = j * self.K, min((j + 1) * self.K, self.nbytes)
        if fd is None:
          buf = self.data[lo:hi]
        else:
          buf = np.frombuffer(os.pread(fd, hi - lo, self.offset + lo), np.uint8)
        if self.digests is not None and _digest(buf) != self.digests[j]:
          problems.append(
            f"{self.where}: bytes {lo:,} to {hi:,} of its data ({self._span(lo, hi)}) do not "
            "match the digest recorded at save"
          )
          continue
        if len(buf) != hi - lo:  # no digests, and the file shrank since it was opened
          problems.append(f"{self.where}: bytes {lo:,} to {hi:,} of its data are missing")
          continue
        values = buf.view(self.dtype)
        bad = first_nonfinite(values)
        if bad is not None:
          problems.append(
            f"{self.where}: a non-finite value ({values[bad]}) at "
            f"{self._at(lo // self.itemsize + bad)}"
          )
          continue
        self.verified[j] = True
    finally:
      if fd is not None:
        os.close(fd)
    return problems

  def check_rows(self, layer: int, ids) -> None:
    """Verifies, once, the blocks that hold rows [layer, ids] of an [L, N, ...] file.

    Raises:
      IntegrityError: a block does not match its digest or holds a NaN / Inf.
    """
    rows = layer * self.shape[1] + np.asarray(ids, np.int64).reshape(-1)
    first, last = rows * self.unit // self.K, ((rows + 1) * self.unit - 1) // self.K
    blocks = np.unique(np.concatenate([np.arange(f, g + 1) for f, g in zip(first, last)] or [[]]))
    todo = blocks[~self.verified[blocks.astype(np.int64)]].astype(np.int64)
    if todo.size and (problems := self.check(todo.tolist())):
      raise IntegrityError(problems[0])


def _inspect(file, shape, dtype, axes, entry, files) -> tuple[int | None, str | None]:
  """Checks one file's presence, header, shape, dtype and size against the manifest
  (``entry``: its record in ``files``, None for a manifest without digests).

  Returns (the data's byte offset, None) or (None, what is wrong, naming the file).
  """
  storage = _numpy_storage(dtype)
  nbytes = math.prod(shape) * storage.itemsize
  if files is not None:
    K = entry.get("block_bytes") if isinstance(entry, dict) else None
    blocks = entry.get("blocks") if isinstance(entry, dict) else None
    if (
      not isinstance(K, int)
      or K <= 0
      or K % storage.itemsize
      or not isinstance(blocks, list)
      or len(blocks) != -(-nbytes // K)
      or entry.get("shape") != list(shape)
      or entry.get("dtype") != np.dtype(dtype).name
    ):
      return None, f"{MANIFEST} has no valid record of {file} (shape {list(shape)}, {dtype})"
  if not os.path.exists(file):
    return None, f"{file} is missing"
  try:
    header, got_shape, fortran, got_dtype = _read_header(file)
  except Exception as e:  # whatever a damaged header makes numpy raise
    return None, f"{file} has an unreadable .npy header ({type(e).__name__}: {e})"
  if got_shape != tuple(shape) or got_dtype != storage or fortran:
    order = " (Fortran order)" if fortran else ""
    return None, (
      f"{file} holds {got_dtype}{list(got_shape)}{order}, expected {storage}{list(shape)} = {axes}"
    )
  size, want = os.path.getsize(file), len(header) + nbytes
  if size != want:
    why = "truncated" if size < want else "bytes past the end"
    return None, f"{file} is {size:,} bytes, expected {want:,} ({why})"
  if entry is not None and _digest(header) != entry.get("header"):
    return None, f"{file}: its .npy header does not match the digest recorded at save"
  return len(header), None


def _check_all(checks: Sequence[_FileCheck]) -> list[str]:
  """Every block of every file checked, on a thread pool; the problems in file order."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    futures = [
      pool.submit(c.check, range(j0, j1)) for c in checks for j0, j1 in _segments(c.num_blocks)
    ]
    return [p for f in futures for p in f.result()]


def _raise(what: str, problems: list[str], shown: int = 6) -> None:
  if problems:
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    raise IntegrityError(f"{what}: " + "; ".join(problems[:shown]) + more)


class _BlockFile:
  """A .npy file written block by block with pwrite (never mapped: a writer holding
  a 7.6 GB mapping counted it all as its own resident memory)."""

  def __init__(self, path: str, dtype, shape: tuple[int, ...], n_axis: int):
    self.path, self.shape, self.n_axis = path, shape, n_axis
    self.storage = _numpy_storage(dtype)
    self.dtype = np.dtype(dtype)
    # The header (and a sparse file of the full size), without touching the data pages.
    x = np.lib.format.open_memmap(path, "w+", self.storage, shape)
    del x
    self.data_offset = os.path.getsize(path) - math.prod(shape) * self.storage.itemsize
    self.fd = os.open(path, os.O_WRONLY)

  def write(self, start: int, block: np.ndarray) -> None:
    """Writes ``block`` (the full shape but n along ``n_axis``) at [start, start + n)."""
    lead, N = self.shape[: self.n_axis], self.shape[self.n_axis]
    tail = math.prod(self.shape[self.n_axis + 1 :]) * self.storage.itemsize
    block = np.asarray(block).astype(self.dtype).view(self.storage)
    for flat, idx in enumerate(np.ndindex(*lead)):
      run = np.ascontiguousarray(block[idx])
      os.pwrite(self.fd, memoryview(run).cast("B"), self.data_offset + (flat * N + start) * tail)

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None


class OffloadWriter:
  """Writes an offloaded library folder chunk by chunk (never all of it in memory).

  Files, per module: ``{module}.a.npy`` [L, N, R, I], ``{module}.b.npy`` [L, N, O, R],
  ``{module}.arrows.npy`` [L, I, N], ``{module}.valid.npy`` [L, N]; and ``offload.json``
  (names, modules, rank, shapes, dtypes; under "files", each file's shape, dtype and
  size, its header's digest and sha256 digests of its data in blocks of whole rows),
  written last. Blocks are written out of order (pwrite, layer-major runs), so
  ``close()`` reads each finished file back to digest it, on a thread pool (1.5 to 2.1 s
  for 1.74 GB on this 2-core machine, the files still in the page cache). The folder
  appears only when ``close()`` succeeds (it is built in a temporary sibling and renamed).

  Usage:
    with OffloadWriter(folder, names, shapes, num_layers=L, rank=R) as w:
      w.write("up_proj", start, a_chunk, b_chunk)  # arrows = a_chunk[:, :, 0, :]
  """

  def __init__(
    self,
    folder: str | os.PathLike,
    names: Sequence[str],
    shapes: dict[str, tuple[int, int]],
    *,
    num_layers: int,
    rank: int,
    ranks: Sequence[int] | None = None,
    factor_dtype=jnp.float32,
    arrow_dtype=jnp.float32,
    metadata: dict[str, dict] | None = None,
  ):
    self.folder = os.path.abspath(os.fspath(folder))
    self.names = tuple(names)
    self.shapes = {m: (int(o), int(i)) for m, (o, i) in shapes.items()}
    self.num_layers, self.rank = int(num_layers), int(rank)
    self.ranks = tuple(ranks) if ranks is not None else (self.rank,) * len(self.names)
    self.factor_dtype, self.arrow_dtype = np.dtype(factor_dtype), np.dtype(arrow_dtype)
    self.metadata = dict(metadata or {})
    parent = os.path.dirname(self.folder)
    os.makedirs(parent, exist_ok=True)
    self._tmp = tempfile.mkdtemp(prefix=".tmp-offload-", dir=parent)
    self._files: dict[tuple[str, str], _BlockFile] = {}
    self._written = {m: np.zeros(len(self.names), bool) for m in self.shapes}
    L, N, R = self.num_layers, len(self.names), self.rank
    try:
      for m, (O, I) in self.shapes.items():
        for field, shape, dtype, n_axis in (
          ("a", (L, N, R, I), self.factor_dtype, 1),
          ("b", (L, N, O, R), self.factor_dtype, 1),
          ("arrows", (L, I, N), self.arrow_dtype, 2),
          ("valid", (L, N), np.dtype(bool), 1),
        ):
          path = os.path.join(self._tmp, _file(m, field))
          self._files[m, field] = _BlockFile(path, dtype, shape, n_axis)
    except BaseException:
      self.abort()
      raise

  def __enter__(self) -> OffloadWriter:
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()

  def write(self, module, start: int, a, b, *, arrows=None, valid=None) -> None:
    """Adapters [start, start + n) of ``module``: a [L, n, R, I], b [L, n, O, R]
    (cast to the factor dtype); arrows [L, I, n] default a[:, :, 0, :] transposed;
    valid [L, n] default True."""
    a = np.asarray(a).astype(self.factor_dtype)
    b = np.asarray(b).astype(self.factor_dtype)
    n = a.shape[1]
    for field, x in (("a", a), ("b", b)):
      full = self._files[module, field].shape
      if x.shape != (full[0], n, *full[2:]):
        raise AdapterError(
          f"offload writer: module {module!r} {field} chunk has shape {x.shape}, expected "
          f"{(full[0], n, *full[2:])}"
        )
      self._files[module, field].write(start, x)
    if arrows is None:  # the stored A*'s first rows, exactly
      arrows = a[:, :, 0, :].swapaxes(1, 2)
    self._files[module, "arrows"].write(start, arrows)
    if valid is None:
      valid = np.ones((self.num_layers, n), bool)
    self._files[module, "valid"].write(start, valid)
    self._written[module][start : start + n] = True

  def close(self) -> None:
    missing = {m: int((~w).sum()) for m, w in self._written.items() if not w.all()}
    if missing:
      self.abort()
      raise AdapterError(f"offload writer: adapters never written, by module: {missing}")
    for f in self._files.values():
      f.close()
    try:
      files = _describe([(f.path, f.dtype, f.shape, f.n_axis) for f in self._files.values()])
    except BaseException:
      self.abort()
      raise
    self._files.clear()
    manifest = {
      "format_version": _FORMAT_VERSION,
      "names": list(self.names),
      "modules": list(self.shapes),
      "num_layers": self.num_layers,
      "rank": self.rank,
      "ranks": list(self.ranks),
      "shapes": {m: list(s) for m, s in self.shapes.items()},
      "factor_dtype": self.factor_dtype.name,
      "arrow_dtype": self.arrow_dtype.name,
      "metadata": self.metadata,
      "files": files,
    }
    with open(os.path.join(self._tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    old = None
    if os.path.exists(self.folder):
      old = tempfile.mkdtemp(prefix=".old-offload-", dir=os.path.dirname(self.folder))
      os.replace(self.folder, os.path.join(old, "library"))
    os.replace(self._tmp, self.folder)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)

  def abort(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()
    shutil.rmtree(self._tmp, ignore_errors=True)


def save_offloaded(library: AdapterLibrary, folder: str | os.PathLike, *, chunk: int = 4096):
  """Writes an AdapterLibrary as an offloaded library folder (same dtypes)."""
  if library.weights.shared is not None:
    raise ValueError(
      "save_offloaded: the library has shared directions removed (its arrows are "
      "derived); save the library as built"
    )
  w = library.weights
  first = library.modules[0]
  with OffloadWriter(
    folder,
    library.names,
    {m: (w.b[m].shape[2], w.a[m].shape[3]) for m in library.modules},
    num_layers=library.num_layers,
    rank=library.rank,
    ranks=library.ranks,
    factor_dtype=w.a[first].dtype,
    arrow_dtype=w.arrows[first].dtype,
    metadata=library.metadata,
  ) as writer:
    for m in library.modules:
      for start in range(0, len(library), chunk):
        stop = min(start + chunk, len(library))
        writer.write(
          m,
          start,
          np.asarray(w.a[m][:, start:stop]),
          np.asarray(w.b[m][:, start:stop]),
          arrows=np.asarray(w.arrows[m][:, :, start:stop]),
          valid=np.asarray(w.valid[m][:, start:stop]),
        )


# --- Host side: the factor store, the slot directories, the callbacks ------------------


@dataclasses.dataclass
class CacheStats:
  """Counters of one device cache (or a sum of them).

  Attributes:
    calls: fetches (one per routed module, layer and factor).
    hits, misses: distinct (layer, adapter) keys a fetch asked for that were already
      cached / had to be brought in.
    evictions: keys dropped to make room.
    chunks: host -> device transfers of missing rows (``chunk_rows`` rows each).
    bytes_moved: host -> device bytes of those chunks, padding included.
    bytes_needed: the missing rows' own bytes (bytes_moved less the chunk padding).
    streamed_rows, streamed_bytes: adapters' A* streamed past the cache (SpectR).
  """

  calls: int = 0
  hits: int = 0
  misses: int = 0
  evictions: int = 0
  chunks: int = 0
  bytes_moved: int = 0
  bytes_needed: int = 0
  streamed_rows: int = 0
  streamed_bytes: int = 0

  @property
  def hit_rate(self) -> float:
    total = self.hits + self.misses
    return self.hits / total if total else float("nan")

  def __add__(self, other: CacheStats) -> CacheStats:
    return CacheStats(
      **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
    )

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


class SlotDirectory:
  """Which (layer, adapter id) key occupies each of ``slots`` cache slots; LRU."""

  def __init__(self, slots: int):
    if slots < 1:
      raise ValueError(f"a device cache needs at least one slot, got {slots}")
    self.slots = slots
    self.where: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()
    self.free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
    self.stats = CacheStats()

  def assign(self, layer: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slots for distinct ``ids`` (1-D) of ``layer``.

    Returns (slot of each id, the missing ids' slots, the missing ids). Hits become
    most recently used; a miss takes a free slot or evicts the least recently used key
    that this call does not use (there is one while len(ids) <= slots).
    """
    if len(ids) > self.slots:
      raise ValueError(
        f"one fetch needs {len(ids)} adapters at once, more than the cache's {self.slots} slots"
      )
    out = np.empty(len(ids), np.int32)
    missing = []
    for j, i in enumerate(ids.tolist()):
      slot = self.where.get((layer, i))
      if slot is None:
        missing.append(j)
      else:
        self.where.move_to_end((layer, i))
        out[j] = slot
    for j in missing:
      if self.free:
        slot = self.free.pop()
      else:
        _, slot = self.where.popitem(last=False)
        self.stats.evictions += 1
      self.where[(layer, int(ids[j]))] = slot
      out[j] = slot
    self.stats.calls += 1
    self.stats.hits += len(ids) - len(missing)
    self.stats.misses += len(missing)
    missing = np.asarray(missing, np.int64)
    return out, out[missing], ids[missing]

  def clear(self) -> None:
    self.where.clear()
    self.free = list(range(self.slots - 1, -1, -1))


class _Host:
  """The host half of an offloaded library: factors, directories, the callbacks.

  Hashed by identity: it is static data of the jitted hook, so one library compiles
  once and a new library (other arrays behind the callbacks) compiles anew.
  """

  def __init__(self, factors, slots, chunk_rows, stream_chunk, num_adapters, checks=None):
    self.factors = factors  # {"a": {module: [L, N, R, I]}, "b": {module: [L, N, O, R]}}
    # verify="lazy": (field, module) -> _FileCheck, whose blocks are verified when first
    # read; after a failure every callback raises it again (the directories then name
    # slots whose rows never arrived).
    self.checks = dict(checks or {})
    self.failed: IntegrityError | None = None
    self.num_adapters = num_adapters
    self.slots = dict(slots)  # field -> S
    self.chunk_rows = dict(chunk_rows)  # field -> M
    self.stream_chunk = stream_chunk
    self.directories = {
      (field, m): SlotDirectory(self.slots[field]) for field in FACTORS for m in factors[field]
    }
    self.streamed = {m: CacheStats() for m in factors["a"]}
    self.pending: dict[tuple[str, str], tuple[int, np.ndarray, np.ndarray]] = {}
    self.lock = threading.Lock()

  def plan(self, field: str, module: str, rows_per_chunk: int, layer, ids, need):
    """Callback: slots of ``ids`` (scratch slot S where ``need`` is False) and the
    number of chunks of missing rows that follow."""
    ids, need = np.asarray(ids), np.asarray(need, bool)
    directory = self.directories[field, module]
    with self.lock:
      self._verify(field, module, 0, [])
      want, inverse = np.unique(ids[need], return_inverse=True)
      slot_of, miss_slots, miss_ids = directory.assign(int(layer), want)
      slots = np.full(ids.shape, directory.slots, np.int32)
      slots[need] = slot_of[inverse.reshape(-1)]
      self.pending[field, module] = (int(layer), miss_slots, miss_ids)
      chunks = -(-len(miss_ids) // rows_per_chunk)
    return slots, np.int32(chunks)

  def chunk(self, field: str, module: str, M: int, i):
    """Callback: chunk ``i`` of the last plan's missing rows: (slots [M], rows [M, ...]),
    padded with the scratch slot and zero rows."""
    store = self.factors[field][module]
    directory = self.directories[field, module]
    with self.lock:
      layer, miss_slots, miss_ids = self.pending[field, module]
      lo = int(i) * M
      ids = miss_ids[lo : lo + M]
      slots = np.full((M,), directory.slots, np.int32)
      slots[: len(ids)] = miss_slots[lo : lo + M]
      self._verify(field, module, layer, ids)
      rows = np.zeros((M, *store.shape[2:]), store.dtype)
      rows[: len(ids)] = store[layer, ids]  # sorted ids: in file order
      directory.stats.chunks += 1
      directory.stats.bytes_moved += rows.nbytes
      directory.stats.bytes_needed += rows[: len(ids)].nbytes
    return slots, rows.view(_bits(rows.dtype))

  def _verify(self, field: str, module: str, layer: int, ids) -> None:
    """verify="lazy": checks the blocks holding rows [layer, ids] before they are read
    (callers hold the lock). Raises IntegrityError (inside the jitted call JAX reports
    it as a JaxRuntimeError carrying the message)."""
    if self.failed is not None:
      raise self.failed
    check = self.checks.get((field, module))
    if check is None or len(ids) == 0:
      return
    try:
      check.check_rows(layer, ids)
    except IntegrityError as e:
      self.failed = e
      raise

  def stream(self, field: str, module: str, layer, i):
    """Callback: ``field``'s factor of adapters [i c, (i + 1) c), zero rows past N
    (c = stream_chunk)."""
    c = self.stream_chunk
    store = self.factors[field][module]
    lo = int(i) * c
    hi = min(lo + c, self.num_adapters)
    with self.lock:
      self._verify(field, module, int(layer), np.arange(lo, hi))
    rows = np.zeros((c, *store.shape[2:]), store.dtype)
    rows[: hi - lo] = store[int(layer), lo:hi]
    with self.lock:
      self.streamed[module].streamed_rows += hi - lo
      self.streamed[module].streamed_bytes += rows.nbytes
    return rows

  def route(self, specs, router_index, x, w, module, mask, fixed_ids, caches, **kw):
    """``core.route_module`` at one module with this host's factors (the hook's entry;
    w: this layer's arrows, valid flags and shared directions)."""
    pl = Offloaded(
      a=None,
      b=None,
      arrows=w.arrows[module],
      valid=w.valid[module],
      shared=None if w.shared is None else w.shared[module],
      index=None if w.index is None else w.index[module],
      module=module,
      layer=kw["layer"],
      caches=caches,
      host=self,
    )
    return core.route_module(specs, router_index, x, pl, mask, fixed_ids, **kw)


# --- The library ------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class OffloadedLibrary(NamedAdapters):
  """An adapter library whose factors stay on the host (see the module docstring).

  Build with ``OffloadedLibrary.open(folder, ...)`` (memory-mapped files) or
  ``OffloadedLibrary.from_library(library, ...)`` (host numpy copies); route with
  ``routed(offloaded_library, B, spec)`` and the ``RoutedAdapters`` hook.

  Attributes:
    names, modules, rank, ranks, metadata: as in the AdapterLibrary.
    arrows: module -> [L, I, N] device array.
    valid: module -> [L, N] bool device array.
    caches: field ("a", "b") -> module -> the device cache, a ``jax.Ref``
      ([S_a + 1, R, I] resp. [S_b + 1, O, R]; the last slot is a zero scratch row),
      holding the factors' bit patterns as unsigned integers of the same width.
  """

  names: tuple[str, ...]
  modules: tuple[str, ...]
  rank: int
  ranks: tuple[int, ...]
  arrows: dict[str, jax.Array]
  valid: dict[str, jax.Array]
  caches: dict[str, dict[str, Any]]
  host: _Host
  metadata: dict[str, dict] = dataclasses.field(default_factory=dict)
  shared: dict[str, jax.Array] | None = None
  folder: str | None = None
  # Per module, an ArrowIndex (routing/arrow_index.py) or ArrowSketch
  # (routing/arrow_sketch.py) with a leading L axis, held on the device beside the
  # arrows. None until ``with_index`` / ``with_sketch``; never saved.
  index: dict | None = None

  def routing_parts(self):
    """What ``hook.routed`` needs: (the scanned weights, with no A* / B*; the form
    that routes them; the caches; the padded N).

    Raises:
      IntegrityError: the library was opened with ``verify="lazy"`` and a call has
        found a corrupt block.
    """
    if self.host.failed is not None:  # verify="lazy" found a corrupt block
      raise IntegrityError(
        f"{self.host.failed} (found by an earlier call; the library cannot be used)"
      )
    weights = LibraryWeights(
      a={}, b={}, arrows=self.arrows, valid=self.valid, shared=self.shared, index=self.index
    )
    caches = {f: dict(d) for f, d in self.caches.items()}
    return weights, self.host, caches, len(self)

  @property
  def num_layers(self) -> int:
    return next(iter(self.arrows.values())).shape[0]

  def with_index(self, clusters: int | None = None, **kw) -> OffloadedLibrary:
    """The library with a sublinear arrow index per layer and module, for routers
    with ``RouterSpec(index_probe=P)``: per token the Arrow filter reads J centroids
    and P clusters' arrows instead of all N (the step's cost at N = 10^5). Options as
    ``AdapterLibrary.with_index``; built from the arrows as they stand (after any
    shared-direction removal); the same device cache and host factors."""
    from lag_jax.routing.arrow_index import index_layers

    return dataclasses.replace(self, index=index_layers(self.arrows, self.valid, clusters, **kw))

  def with_sketch(
    self,
    dims: int,
    rows_dtype: str | None = "float32",
    moments: dict | None = None,
    ridge: float | None = None,
  ) -> OffloadedLibrary:
    """The library with an arrow sketch of ``dims`` dimensions per layer and module in
    place of the arrow index (routing/arrow_sketch.py), for routers with
    ``RouterSpec(index_sketch=dims, index_probe=pool)``: per decode token the Arrow
    filter reads N Z sketch numbers and the pool's P arrows instead of all N arrows.
    Built from the arrows as they stand, held on the device beside them (with the
    sketch's adapter-major copy of the arrows in ``rows_dtype``, as
    ``AdapterLibrary.with_sketch``: float32 doubles the arrows' device bytes, bfloat16
    adds half); ``moments`` for a calibrated sketch, as ``AdapterLibrary.with_sketch``;
    never saved."""
    from lag_jax.routing.arrow_sketch import sketch_layers

    return dataclasses.replace(
      self, index=sketch_layers(self.arrows, dims, rows_dtype, moments, ridge)
    )

  @property
  def slots(self) -> dict[str, int]:
    """Cache slots per factor ("a", "b"), each module and factor its own cache."""
    return dict(self.host.slots)

  # --- building ---------------------------------------------------------------------

  @classmethod
  def _build(
    cls,
    names,
    modules,
    rank,
    ranks,
    arrows,
    valid,
    factors,
    metadata,
    checks=None,
    shared=None,
    **cache_kw,
  ):
    slots = cache_kw["slots"] or len(names)  # None: every adapter fits
    b_slots = cache_kw.get("b_slots") or slots
    chunk_rows = cache_kw.get("chunk_rows", 64)
    b_chunk_rows = cache_kw.get("b_chunk_rows") or chunk_rows
    stream_chunk = cache_kw.get("stream_chunk", 1024)
    if min(chunk_rows, b_chunk_rows, stream_chunk) < 1:
      raise ValueError("chunk_rows, b_chunk_rows and stream_chunk must be >= 1")
    host = _Host(
      factors,
      {"a": int(slots), "b": int(b_slots)},
      {"a": int(chunk_rows), "b": int(b_chunk_rows)},
      int(stream_chunk),
      len(names),
      checks,
    )
    caches = {
      field: {
        m: jax.new_ref(
          jnp.zeros(
            (host.slots[field] + 1, *factors[field][m].shape[2:]), _bits(factors[field][m].dtype)
          )
        )
        for m in modules
      }
      for field in FACTORS
    }
    return cls(
      tuple(names),
      tuple(modules),
      int(rank),
      tuple(ranks),
      arrows,
      valid,
      caches,
      host,
      metadata,
      shared,
      cache_kw.get("folder"),
    )

  @classmethod
  def from_library(
    cls,
    library: AdapterLibrary,
    *,
    slots: int | None,
    b_slots: int | None = None,
    chunk_rows: int = 64,
    b_chunk_rows: int | None = None,
    stream_chunk: int = 1024,
  ) -> OffloadedLibrary:
    """Moves a resident library's A* / B* to host numpy arrays (same dtypes).

    Args:
      slots: A* cache slots per module (shared by the layers); None: N, every adapter.
        One fetch needs all its distinct candidates at once: at least min(B T k, N)
        for a [B, T] call at k.
      b_slots: B* cache slots per module; default ``slots``.
      chunk_rows, b_chunk_rows: rows per host -> device transfer of missing A* / B*
        (at most; a call that can need fewer rows uses that many).
      stream_chunk: adapters per transfer when SpectR streams A*.
    """
    w = library.weights
    factors = {
      "a": {m: np.asarray(w.a[m]) for m in library.modules},
      "b": {m: np.asarray(w.b[m]) for m in library.modules},
    }
    return cls._build(
      library.names,
      library.modules,
      library.rank,
      library.ranks,
      dict(w.arrows),
      dict(w.valid),
      factors,
      dict(library.metadata),
      shared=None if w.shared is None else dict(w.shared),
      slots=slots,
      b_slots=b_slots,
      chunk_rows=chunk_rows,
      b_chunk_rows=b_chunk_rows,
      stream_chunk=stream_chunk,
    )

  @classmethod
  def open(
    cls,
    folder: str | os.PathLike,
    *,
    slots: int | None,
    b_slots: int | None = None,
    chunk_rows: int = 64,
    b_chunk_rows: int | None = None,
    stream_chunk: int = 1024,
    in_memory: bool = False,
    verify: str = "full",
  ) -> OffloadedLibrary:
    """Opens a folder written by ``OffloadWriter`` / ``save_offloaded``.

    Arrows and valid flags are read onto the device; A* and B* are memory-mapped
    (``in_memory``: read into host RAM). Cache arguments as in ``from_library``.

    Every file's presence, .npy header, shape, dtype and size are checked against the
    manifest, and the arrows' and valid flags' digests and the arrows' values (NaN /
    Inf) always. ``verify`` says when A* and B* are checked (their block digests, then
    their values):
      "full": all of them, now (default);
      "lazy": each block when a cache miss or the SpectR stream first reads it (from
        inside the jitted call, where JAX reports the IntegrityError as a
        JaxRuntimeError carrying its message; the library then refuses every call);
      "size": never (trusted files; only the checks above).

    Why "full" by default: hashing every block once per open costs seconds per GB
    (BENCHMARKS.md, "Opening an offloaded library"), while "lazy" moves the same
    hashing onto the decode path (a single-row miss reads its whole block) and reports
    corruption in the middle of a generation rather than before it. Choose "lazy" for
    libraries far beyond host RAM, where reading everything at open would take minutes,
    or where most blocks are never read.

    A manifest written before digests were recorded opens with a logged warning: sizes,
    shapes and values are checked, contents cannot be.

    Raises:
      AdapterError: no manifest, or an unsupported format version.
      IntegrityError: a corrupt manifest; files missing, truncated, of the wrong shape
        or dtype; a digest that does not match; a NaN / Inf. The message names each file
        at fault (and, for a block, the layer and adapters it holds).
    """
    if verify not in VERIFY:
      raise ValueError(f"OffloadedLibrary.open: verify={verify!r}, expected one of {VERIFY}")
    start = time.perf_counter()
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, MANIFEST)
    try:
      with open(path) as f:
        meta = json.load(f)
    except FileNotFoundError:
      raise AdapterError(f"{path}: not an offloaded library ({MANIFEST} missing)") from None
    except (OSError, ValueError) as e:
      raise IntegrityError(f"{path}: the offloaded library's manifest is unreadable: {e}") from None
    if not isinstance(meta, dict):
      raise IntegrityError(f"{path}: the offloaded library's manifest is not a JSON object")
    if meta.get("format_version") != _FORMAT_VERSION:
      raise AdapterError(f"{path}: unsupported format_version {meta.get('format_version')}")
    try:
      names = [str(n) for n in meta["names"]]
      modules = [str(m) for m in meta["modules"]]
      L, N, R = int(meta["num_layers"]), len(names), int(meta["rank"])
      factor_dtype, arrow_dtype = jnp.dtype(meta["factor_dtype"]), jnp.dtype(meta["arrow_dtype"])
      shapes = {m: tuple(int(d) for d in meta["shapes"][m]) for m in modules}
      files = meta.get("files")
      if files is not None and not isinstance(files, dict):
        raise TypeError("'files' is not an object")
    except (KeyError, TypeError, ValueError) as e:
      raise IntegrityError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    if files is None:
      logging.warning(
        "%s: written before offloaded libraries recorded digests: the files' sizes, shapes "
        "and values are checked, their contents cannot be; re-write the library "
        "(OffloadWriter / save_offloaded) to record them",
        path,
      )
    problems, found = [], {}
    for m in modules:
      O, I = shapes[m]
      dims = f"L={L}, N={N}, R={R}, O={O}, I={I}"
      expected = {
        "a": ((L, N, R, I), factor_dtype, "[L, N, R, I]"),
        "b": ((L, N, O, R), factor_dtype, "[L, N, O, R]"),
        "arrows": ((L, I, N), arrow_dtype, "[L, I, N]"),
        "valid": ((L, N), jnp.dtype(bool), "[L, N]"),
      }
      for field, (shape, dtype, axes) in expected.items():
        file = os.path.join(folder, _file(m, field))
        entry = None if files is None else files.get(_file(m, field))
        offset, problem = _inspect(file, shape, dtype, f"{axes} with {dims}", entry, files)
        if problem is not None:
          problems.append(f"module {m!r}: {problem}")
        else:
          found[field, m] = (file, offset, shape, dtype, entry)
    _raise(f"offloaded library {folder} is corrupt or incomplete", problems)
    arrays: dict[str, dict[str, Any]] = {f: {} for f in ("a", "b", "arrows", "valid")}
    checks = {}
    for (field, m), (file, offset, shape, dtype, entry) in found.items():
      x = np.memmap(file, _numpy_storage(dtype), "r", offset, shape).view(dtype)
      resident = field in ("arrows", "valid") or in_memory
      if in_memory and field in FACTORS:
        x = np.array(x)
      where = f"offloaded library: module {m!r}: {file}"
      n_axis = 2 if field == "arrows" else 1
      data = x.reshape(-1).view(np.uint8) if resident else None
      checks[field, m] = _FileCheck(where, file, offset, dtype, shape, n_axis, names, entry, data)
      arrays[field][m] = x
    now = [c for (f, _), c in checks.items() if f not in FACTORS or verify == "full"]
    if (total := sum(c.nbytes for c in now)) > 1 << 30:
      logging.info(
        "Verifying %.1f GB of %s (verify=%r; 'lazy' checks each block when first read)",
        total / 1e9,
        folder,
        verify,
      )
    _raise(f"offloaded library {folder} is corrupt", _check_all(now))
    for field in ("arrows", "valid"):
      arrays[field] = {m: jnp.asarray(np.asarray(x)) for m, x in arrays[field].items()}
    logging.info(
      "Opened offloaded library of %d adapters from %s (verify=%s, %.2f s)",
      N,
      folder,
      verify,
      time.perf_counter() - start,
    )
    return cls._build(
      names,
      modules,
      R,
      meta["ranks"],
      arrays["arrows"],
      arrays["valid"],
      {"a": arrays["a"], "b": arrays["b"]},
      meta.get("metadata", {}),
      checks={k: c for k, c in checks.items() if k[0] in FACTORS} if verify == "lazy" else None,
      folder=folder,
      slots=slots,
      b_slots=b_slots,
      chunk_rows=chunk_rows,
      b_chunk_rows=b_chunk_rows,
      stream_chunk=stream_chunk,
    )

  # --- accounting -------------------------------------------------------------------

  def device_nbytes(self) -> dict[str, int]:
    """Device bytes: arrows, valid flags, and the caches (scratch slots included)."""
    caches = sum(
      math.prod(r.shape) * r.dtype.itemsize for d in self.caches.values() for r in d.values()
    )
    return {
      "arrows": sum(x.nbytes for x in self.arrows.values()),
      "valid": sum(x.nbytes for x in self.valid.values()),
      "caches": caches,
    }

  def host_nbytes(self) -> int:
    """Bytes of A* and B* on the host (or on disk)."""
    return sum(x.nbytes for d in self.host.factors.values() for x in d.values())

  def stats(self) -> dict[str, CacheStats]:
    """Counters by "{field}/{module}" ("a/up_proj", ...), "stream/{module}" for the
    SpectR stream, and "total"."""
    out = {f"{f}/{m}": d.stats for (f, m), d in self.host.directories.items()}
    out.update({f"stream/{m}": s for m, s in self.host.streamed.items() if s.streamed_rows})
    out = {k: dataclasses.replace(v) for k, v in out.items()}
    out["total"] = sum(out.values(), CacheStats())
    return out

  def reset_stats(self) -> None:
    for d in self.host.directories.values():
      d.stats = CacheStats()
    for m in self.host.streamed:
      self.host.streamed[m] = CacheStats()

  def clear_cache(self) -> None:
    """Forgets every cached adapter (the next fetches all miss)."""
    with self.host.lock:
      for d in self.host.directories.values():
        d.clear()


# --- Routing over the offloaded library ---------------------------------------------------


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _fetch(host: _Host, caches, field: str, module: str, layer, ids, need):
  """Brings the adapters ``ids`` (where ``need``) of ``layer`` into the device cache.

  Returns (the cache's value after the fetch, each id's slot; the scratch slot, all
  zeros, where ``need`` is False). Read the rows out of the value at once.
  """
  ref = caches[field][module]
  most = min(math.prod(ids.shape), host.num_adapters)
  # Chunks no larger than the call can fill (a decode step's one B* row per token
  # travels as B rows, not as a padded chunk_rows block).
  S, M = host.slots[field], min(host.chunk_rows[field], most)
  if most > S:
    what = "candidates' A*" if field == "a" else "selected adapters' B*"
    raise ValueError(
      f"offloaded library, module {module!r}: a call routing ids of shape {tuple(ids.shape)} "
      f"may need {most} {what} at once, more than the cache's {S} {field} slots; open the "
      f"library with {'slots' if field == 'a' else 'b_slots'} >= {most}"
    )
  slots, chunks = io_callback(
    functools.partial(host.plan, field, module, M),
    (_sds(ids.shape, jnp.int32), _sds((), jnp.int32)),
    layer,
    ids.astype(jnp.int32),
    need,
    ordered=True,
  )
  row_shape = tuple(ref.shape[1:])

  def body(i, carry):
    chunk_slots, rows = io_callback(
      functools.partial(host.chunk, field, module, M),
      (_sds((M,), jnp.int32), _sds((M, *row_shape), ref.dtype)),
      i,
      ordered=True,
    )
    ref[...] = ref[...].at[chunk_slots].set(rows)
    return carry

  jax.lax.fori_loop(0, chunks, body, jnp.int32(0))
  dtype = host.factors[field][module].dtype
  return jax.lax.bitcast_convert_type(ref[...], dtype), slots


@dataclasses.dataclass(frozen=True)
class Offloaded(core.Resident):
  """The placement of one layer and module of an offloaded library: arrows, valid
  flags and shared directions on the device; A* and B* fetched by id into the device
  caches (``a_rows`` / ``b_rows``), or streamed (``scan``: SpectR, uniform)."""

  module: str = ""
  layer: Any = None
  caches: Any = None
  host: Any = None

  @property
  def out_dim(self) -> int:
    return self.host.factors["b"][self.module].shape[2]

  @property
  def rank(self) -> int:
    return self.host.factors["a"][self.module].shape[2]

  def _fetch(self, field, ids, need):
    need = jnp.broadcast_to(jnp.asarray(need, bool), ids.shape) & (ids >= 0)
    return _fetch(self.host, self.caches, field, self.module, self.layer, ids, need)

  def a_rows(self, ids, need):
    cache, slots = self._fetch("a", ids, need)
    return core.gather_adapters(cache, slots)

  def b_rows(self, ids, need):
    cache, slots = self._fetch("b", ids, need)
    return cache[slots]

  def all_a(self):
    """Every adapter's A* (at most the B T k rows a gather could need), fetched into
    id order, so the library has the resident shape and is projected as it would be."""
    everyone = jnp.arange(self.n, dtype=jnp.int32)
    cache, slots = self._fetch("a", everyone, self.valid)
    return cache[slots]

  def scan(self, fn, carry, allowed, with_b: bool):
    """Streams A* (and B*) ``stream_chunk`` adapters per callback straight through the
    device, not through the cache (which it would flush)."""
    host, module = self.host, self.module
    N, c = host.num_adapters, host.stream_chunk
    chunks = -(-N // c)
    allowed = jnp.pad(allowed, ((0, 0), (0, chunks * c - N)))

    def fetch(field, i):
      store = host.factors[field][module]
      return io_callback(
        functools.partial(host.stream, field, module),
        _sds((c, *store.shape[2:]), store.dtype),
        self.layer,
        i,
        ordered=True,
      )

    def body(i, carry):
      a = fetch("a", i)
      b = fetch("b", i) if with_b else None
      ids = i * c + jnp.arange(c, dtype=jnp.int32)
      here = jax.lax.dynamic_slice_in_dim(allowed, i * c, c, axis=1)
      return fn(carry, a, b, ids, here)

    return jax.lax.fori_loop(0, chunks, body, carry)


# --- Shared-direction removal, streamed -----------------------------------------------------

SHARED_CACHE = "shared"


def _fingerprint(library: OffloadedLibrary) -> str | None:
  """The manifest's digest (it records every file's block digests), or None without a
  folder."""
  if library.folder is None:
    return None
  with open(os.path.join(library.folder, MANIFEST), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def remove_shared_offloaded(library: OffloadedLibrary, mode: str, count: int, among):
  """``shared.remove_shared`` for an offloaded library: per layer and module, a first
  pass streams A* and B* ``stream_chunk`` adapters at a time and adds up the Gram, a
  second streams A* (and B*'s column norms) for the residual arrows. Nothing else is
  read; the factors are checked as ``verify`` says. With a folder, the result is
  cached in ``<folder>/shared/`` under the manifest's digest (a rewritten library
  computes anew); an unwritable folder only logs a warning."""
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415

  from lag_jax.routing import shared as sh  # noqa: PLC0415 (shared imports this lazily)

  if library.index is not None:
    raise ValueError(
      "remove_shared_offloaded: this library carries an arrow index of its arrows as they "
      "were; remove shared directions first, then call with_index"
    )
  host, N = library.host, len(library)
  key = f"{mode}-{count}-{hashlib.sha256(np.packbits(among).tobytes()).hexdigest()[:12]}"
  fingerprint = _fingerprint(library)
  path = None if fingerprint is None else os.path.join(library.folder, SHARED_CACHE, key)
  arrays = None
  if path is not None and os.path.exists(path + ".safetensors"):
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(path + ".safetensors", "numpy") as f:
      same = (f.metadata() or {}).get("fingerprint") == fingerprint
    if same:
      arrays = load_file(path + ".safetensors")
      logging.info("Shared directions of %s from its cache %s", library.folder, path)
  if arrays is None:
    c, start = host.stream_chunk, time.perf_counter()

    def chunks(m, layer):
      """(lo, hi, A*, B*, weights) of ``stream_chunk`` adapters, padded to one shape."""
      weight = np.asarray(sh.weights_of(among, np.asarray(library.valid[m][layer])))
      for lo in range(0, N, c):
        hi = min(lo + c, N)
        with host.lock:
          for field in FACTORS:
            host._verify(field, m, layer, np.arange(lo, hi))
        pad = ((0, c - (hi - lo)), (0, 0), (0, 0))
        a, b = (
          np.pad(np.asarray(host.factors[f][m][layer, lo:hi], np.float32), pad) for f in FACTORS
        )
        yield lo, hi, a, b, np.pad(weight[lo:hi], pad[0])

    def part_sum(m, layer):
      return sum(sh._part(mode)(a, b, w) for _, _, a, b, w in chunks(m, layer))

    def residual(m, layer, top):
      arrows = np.zeros((top.shape[0], N), np.float32)
      for lo, hi, a, b, _ in chunks(m, layer):
        arrows[:, lo:hi] = np.asarray(sh._residual_arrows(a, b, top))[:, : hi - lo]
      return arrows

    dims = {m: (library.num_layers, library.arrows[m].shape[1]) for m in library.modules}
    found = sh.solve(library.modules, dims, mode, count, part_sum, residual)
    logging.info(
      "Shared directions (%s:%d) of %d adapters: factors streamed twice in %.1f s",
      mode,
      count,
      N,
      time.perf_counter() - start,
    )
    arrays = {}
    for m, (dirs, arrows, lead) in found.items():
      arrays[f"{m}.shared"], arrays[f"{m}.arrows"] = dirs, np.stack(arrows)
      arrays[f"{m}.leading"] = lead
    if path is not None:
      try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.safetensors"
        save_file(arrays, tmp, metadata={"fingerprint": fingerprint})
        os.replace(tmp, path + ".safetensors")
      except OSError as e:
        logging.warning("Could not cache the shared directions beside %s: %s", library.folder, e)
  arrows = {m: jnp.asarray(arrays[f"{m}.arrows"], library.arrows[m].dtype) for m in library.modules}
  shared = {m: jnp.asarray(arrays[f"{m}.shared"]) for m in library.modules}
  leading = {m: arrays[f"{m}.leading"] for m in library.modules}
  out = dataclasses.replace(library, arrows=arrows, shared=shared)
  return out, sh.SharedReport(mode, count, leading)
