"""A stacked library of spectrally aligned LoRA adapters, ready to route.

Layout, per adapted module (why: the decoder scans over layers, so L leads and each
layer's block is contiguous; within a layer the arrow scores for all N adapters are
one [T, I] @ [I, N] matmul, so arrows are stored I-major as [L, I, N]; the
candidates' A* / B* are gathered by adapter id, so N is next for those):

  a       [L, N, R, I]  A* = V^T, orthonormal rows, zero rows for rank padding
  b       [L, N, O, R]  B* = U S (scale and alpha folded in)
  arrows  [L, I, N]     A*[:, :, 0, :] transposed
  valid   [L, N]        False where the adapter is all zero (never routed to)

Mixed ranks are zero-padded to the library's largest rank R (exact: zero rows add
nothing to a score, a norm or an output); an adapter that covers only some modules
or layers is a zero (invalid) adapter elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from lag_jax.adapters.apply import validate_adapter
from lag_jax.adapters.peft_io import AdapterError, AdapterFile, LoraAdapter
from lag_jax.errors import IntegrityError
from lag_jax.integrity import array_digests, first_nonfinite, folder_mode
from lag_jax.model.config import ModelConfig
from lag_jax.model.transformer import ADAPTABLE_MODULES, ATTENTION_MODULES, MLP_MODULES
from lag_jax.routing.core import ON_DEVICE
from lag_jax.routing.signatures import spectral_align_stacked

KNOWLEDGE_MODULES = MLP_MODULES
TASK_MODULES = ATTENTION_MODULES
_FORMAT_VERSION = 1


@struct.dataclass
class LibraryWeights:
  """Device arrays of a library, by module name (shapes in the module docstring)."""

  a: dict[str, jax.Array]
  b: dict[str, jax.Array]
  arrows: dict[str, jax.Array]
  valid: dict[str, jax.Array]
  # [L, I, Q] per module: input directions removed from routing (routing/shared.py);
  # None for a library as built. Never saved: derived from the others on demand.
  shared: dict[str, jax.Array] | None = None
  # Per module, an ArrowIndex with a leading L axis (routing/arrow_index.py): the
  # clusters an index_probe router scans. None until ``with_index``; never saved.
  index: dict | None = None


class NamedAdapters:
  """Names <-> ids, shared by every form of a library (resident, sharded, offloaded);
  the class provides ``names``, a tuple of adapter names in id order."""

  names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.names)

  def id(self, name: str) -> int:
    try:
      return self.names.index(name)
    except ValueError:
      raise KeyError(f"adapter {name!r} is not in the library") from None


@dataclasses.dataclass(frozen=True)
class AdapterLibrary(NamedAdapters):
  """N adapters of one base model on a fixed set of modules.

  Attributes:
    names: adapter names; an adapter's id is its index.
    modules: the module names the library adapts (e.g. gate/up/down_proj).
    rank: R, the padded rank.
    ranks: [N] each adapter's own (largest) rank, to report padding overhead.
    weights: the stacked arrays.
    metadata: free-form per-adapter dicts (e.g. the source document), by name.
  """

  names: tuple[str, ...]
  modules: tuple[str, ...]
  rank: int
  ranks: tuple[int, ...]
  weights: LibraryWeights
  metadata: dict[str, dict] = dataclasses.field(default_factory=dict)

  @property
  def num_layers(self) -> int:
    return next(iter(self.weights.a.values())).shape[0]

  def routing_parts(self):
    """(weights, routing form, caches, padded N) for ``hook.routed``."""
    return self.weights, ON_DEVICE, None, len(self)

  def nbytes(self) -> int:
    """Resident bytes of all arrays."""
    return sum(x.nbytes for x in jax.tree.leaves(self.weights))

  def exact_nbytes(self) -> int:
    """Bytes an unpadded library would need: 2 h r per module and layer per adapter
    at its own rank, plus one arrow (h) per module and layer, at the stored dtype."""
    total = 0
    for m in self.modules:
      L, _, O, _ = self.weights.b[m].shape
      I = self.weights.a[m].shape[-1]
      item = self.weights.a[m].dtype.itemsize
      total += L * item * sum((O + I) * r + I for r in self.ranks)
    return total

  # --- building -------------------------------------------------------------------

  @classmethod
  def from_adapters(
    cls,
    adapters: Sequence[LoraAdapter | AdapterFile],
    config: ModelConfig,
    modules: Sequence[str] | None = None,
    *,
    rank: int | None = None,
    dtype=jnp.float32,
    chunk: int = 64,
    metadata: dict[str, dict] | None = None,
  ) -> AdapterLibrary:
    """Validates, spectrally aligns and stacks adapters.

    Args:
      adapters: PEFT adapters of the base model ``config``, in memory or as
        ``AdapterFile``s: those are read chunk by chunk, so that peak memory is the
        library plus one chunk, not every adapter as well (their names, modules and
        ranks come from their config and safetensors header first).
      modules: the modules the library adapts; default every module any adapter
        covers. Adapter weights on other modules are an error (they would be lost).
      rank: pad to this rank (>= every adapter's rank); default the largest.
      dtype: storage dtype of A*/B*/arrows (signatures are computed in float32).
      chunk: adapters aligned per batched SVD call (bounds peak memory).
    """
    adapters = list(adapters)
    if not adapters:
      raise AdapterError("cannot build a library from an empty list of adapters")
    names, covers, ranks = [], [], []
    for a in adapters:
      if isinstance(a, AdapterFile):
        names.append(a.adapter_name)
        mods, r = a.peek()
        unknown = sorted(mods - set(ADAPTABLE_MODULES))
        if unknown:
          raise AdapterError(
            f"adapter {a.adapter_name!r} ({a.path}) adapts {unknown}; a library holds "
            f"adapters of {list(ADAPTABLE_MODULES)}"
          )
      else:
        validate_adapter(a, config)
        names.append(a.name)
        mods, r = {m.module for m in a.modules.values()}, max(m.r for m in a.modules.values())
      covers.append(mods)
      ranks.append(r)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise AdapterError(f"duplicate adapter names in the library: {dupes}")
    covered = sorted(set().union(*covers), key=_module_order)
    modules = tuple(covered if modules is None else modules)
    for name, mods in zip(names, covers, strict=True):
      extra = sorted(mods - set(modules))
      if extra:
        raise AdapterError(
          f"adapter {name!r} adapts {extra}, which this library "
          f"(modules {list(modules)}) does not hold"
        )
    ranks = tuple(ranks)
    rank = max(ranks) if rank is None else rank
    if rank < max(ranks):
      raise AdapterError(f"library rank {rank} is below adapter rank {max(ranks)}")
    arrays = _align_modules(adapters, names, config, modules, rank, dtype, chunk)
    weights = LibraryWeights(
      **{f: {m: arrays[m][f] for m in modules} for f in ("a", "b", "arrows", "valid")}
    )
    return cls(tuple(names), modules, rank, ranks, weights, dict(metadata or {}))

  def add(
    self,
    adapters: Sequence[LoraAdapter | AdapterFile],
    config: ModelConfig,
    *,
    chunk: int = 64,
    metadata: dict[str, dict] | None = None,
  ) -> AdapterLibrary:
    """A new library with ``adapters`` appended; only their signatures are computed."""
    if not adapters:
      raise AdapterError("no adapters to add to the library")
    new = AdapterLibrary.from_adapters(
      adapters,
      config,
      self.modules,
      rank=max(self.rank, *(_adapter_rank(a) for a in adapters)),
      dtype=next(iter(self.weights.a.values())).dtype,
      chunk=chunk,
      metadata=metadata,
    )
    clash = sorted(set(self.names) & set(new.names))
    if clash:
      raise AdapterError(f"adapters already in the library: {clash}")
    if self.weights.shared is not None or self.weights.index is not None:
      raise ValueError(
        "add: add adapters to the library as built, then remove shared directions or "
        "build the arrow index again"
      )
    old = self if new.rank == self.rank else self._padded(new.rank)
    w = jax.tree.map(
      lambda x, y, axis: jnp.concatenate([x, y], axis=axis),
      old.weights,
      new.weights,
      _n_axes(old.weights),
    )
    return AdapterLibrary(
      self.names + new.names,
      self.modules,
      new.rank,
      self.ranks + new.ranks,
      w,
      {**self.metadata, **new.metadata},
    )

  def subset(self, ids: Sequence[int | str]) -> AdapterLibrary:
    """The library of the adapters ``ids`` (ids or names), in that order: its own
    arrays (slices), so routing over it costs what N = len(ids) costs; all of them in
    order is this library itself (no copy: at N = 1,000 a copy is gigabytes)."""
    idx = np.asarray([self.id(i) if isinstance(i, str) else int(i) for i in ids], np.int64)
    if (
      idx.size == 0 or len(set(idx.tolist())) != idx.size or idx.min() < 0 or idx.max() >= len(self)
    ):
      raise ValueError(f"subset: ids must be distinct ids in [0, {len(self)}), got {idx.tolist()}")
    w = self.weights
    if w.shared is not None:
      raise ValueError("subset: take the subset before removing shared directions")
    if w.index is not None:
      raise ValueError("subset: take the subset before building the arrow index")
    if np.array_equal(idx, np.arange(len(self))):
      return self
    take = lambda x, axis: jnp.take(x, jnp.asarray(idx), axis=axis)  # noqa: E731
    weights = LibraryWeights(
      a={m: take(x, 1) for m, x in w.a.items()},
      b={m: take(x, 1) for m, x in w.b.items()},
      arrows={m: take(x, 2) for m, x in w.arrows.items()},
      valid={m: take(x, 1) for m, x in w.valid.items()},
    )
    names = tuple(self.names[i] for i in idx)
    return dataclasses.replace(
      self,
      names=names,
      ranks=tuple(self.ranks[i] for i in idx),
      weights=weights,
      metadata={n: self.metadata[n] for n in names if n in self.metadata},
    )

  def with_index(
    self,
    clusters: int | None = None,
    *,
    probe: int = 8,
    capacity_factor: float = 1.5,
    spill: int = 1,
    seed: int = 0,
    arrow_dtype: str = "float32",
  ) -> AdapterLibrary:
    """The library with a sublinear arrow index per layer and module
    (routing/arrow_index.py), for routers with ``RouterSpec(index_probe=P)``.

    Args:
      clusters: J per layer and module (default ``default_clusters(N, probe)``: the
        fewest rows read per token at that probe).
      probe: the probe the default J is sized for (the router's index_probe).
      capacity_factor: members per cluster at most ceil(factor * N / J) (per spill).
      spill: 1 or 2 clusters per arrow (2: better recall, twice the members' bytes).
      seed: the clustering's initial draw.
      arrow_dtype: the probed arrows' storage: float32, bfloat16 or int8 (with a
        scale per arrow).
    """
    from lag_jax.routing.arrow_index import index_layers

    index = index_layers(
      {m: self.weights.arrows[m] for m in self.modules},
      self.weights.valid,
      clusters,
      probe=probe,
      capacity_factor=capacity_factor,
      spill=spill,
      seed=seed,
      arrow_dtype=arrow_dtype,
    )
    return dataclasses.replace(self, weights=self.weights.replace(index=index))

  def with_sketch(
    self,
    dims: int,
    rows_dtype: str | None = "float32",
    moments: dict | None = None,
    ridge: float | None = None,
  ) -> AdapterLibrary:
    """The library with an arrow sketch of ``dims`` dimensions per layer and module in
    place of the arrow index (routing/arrow_sketch.py), for routers with
    ``RouterSpec(index_sketch=dims, index_probe=pool)``; ``rows_dtype``: the sketch's
    adapter-major copy of the arrows for the pool's rescoring (float32: exact;
    bfloat16; None: none, gathered from the arrows); ``moments``: module -> [L, I, I]
    input second moments for a calibrated sketch (routing/calibration.py), ridged by
    ``ridge`` (default ``arrow_sketch.RIDGE``). Derived, never saved."""
    from lag_jax.routing.arrow_sketch import sketch_layers

    arrows = {m: self.weights.arrows[m] for m in self.modules}
    sketch = sketch_layers(arrows, dims, rows_dtype, moments, ridge)
    return dataclasses.replace(self, weights=self.weights.replace(index=sketch))

  def _padded(self, rank: int) -> AdapterLibrary:
    pad = rank - self.rank
    w = self.weights
    a = {m: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for m, x in w.a.items()}
    b = {m: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) for m, x in w.b.items()}
    return dataclasses.replace(self, rank=rank, weights=w.replace(a=a, b=b))

  # --- persistence ----------------------------------------------------------------

  def save(self, path: str | os.PathLike) -> None:
    """Writes arrays (orbax) and library.json; the folder appears only when complete.

    library.json records a sha256 digest of every array, which ``load`` checks.
    Leftovers of an interrupted save into the same parent folder (``.tmp-library-*``,
    ``.old-library-*``) are removed first: saves into one folder must not run at once.
    """
    import orbax.checkpoint as ocp

    if self.weights.shared is not None:
      raise ValueError(
        "this library has shared directions removed (routing/shared.py: its arrows are "
        "derived); save the library as built and apply remove_shared after loading"
      )
    if self.weights.index is not None:
      raise ValueError(
        "this library carries an arrow index (derived, not saved): save the library "
        "as built and call with_index after loading"
      )

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent)
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent)
    old = None
    try:
      jax.block_until_ready(self.weights)
      tree = _to_tree(self.weights)
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, "arrays"), tree)
        ckptr.wait_until_finished()
      meta = {
        "format_version": _FORMAT_VERSION,
        "names": list(self.names),
        "modules": list(self.modules),
        "rank": self.rank,
        "ranks": list(self.ranks),
        "metadata": self.metadata,
        "digests": array_digests(
          {f"{m}/{f}": np.asarray(x) for m, fields in tree.items() for f, x in fields.items()}
        ),
        "files": _data_files(os.path.join(tmp, "arrays")),
      }
      with open(os.path.join(tmp, "library.json"), "w") as f:
        json.dump(meta, f, indent=1)
      os.chmod(tmp, folder_mode())  # mkdtemp makes it 0700
      # Move the old library aside rather than deleting it first, so that a kill at
      # any point leaves either the old or the new library at ``path``.
      if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=parent)
        os.replace(path, os.path.join(old, "library"))
      os.replace(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      if old is not None and not os.path.exists(path):
        os.replace(os.path.join(old, "library"), path)
      raise
    finally:
      if old is not None:
        shutil.rmtree(old, ignore_errors=True)

  @classmethod
  def load(
    cls,
    path: str | os.PathLike,
    *,
    host: bool = False,
    config: ModelConfig | None = None,
    verify: bool = True,
  ) -> AdapterLibrary:
    """Reads a library written by ``save``.

    Args:
      host: keep the arrays in host memory (numpy) rather than on the default
        device, for ``shard_library`` to place: a library split over a mesh never
        lands whole on one device, and each process of a multi-process run places
        only its own devices' slices.
      config: the base model; the library must fit it (``check_fits``).
      verify: check every array against the digest recorded at save and for NaN /
        Inf (sha256 at ~1.5 GB/s per core, on a thread pool). A library saved
        before digests were recorded loads with a warning.
    Raises:
      IntegrityError: library.json unreadable or inconsistent, arrays missing,
        damaged or of the wrong shape, a digest mismatch or a non-finite value;
        the message names the file (and module, array and adapter).
      AdapterError: not a library; or it does not fit ``config``.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = _read_meta(path)
    arrays = os.path.join(path, "arrays")
    if not os.path.isdir(arrays):
      raise IntegrityError(f"{arrays}: the library's arrays folder is missing; rebuild it")
    # Every data file the save wrote, with its size, before orbax reads any: a missing
    # or truncated file is named here, and orbax's reader threads never start on it
    # (a failed restore can leave them posting to a closed event loop at exit).
    files = meta.get("files") or {}
    if not isinstance(files, dict):
      raise IntegrityError(f"{path}/library.json: 'files' is not an object; rebuild the library")
    for name, size in files.items():
      file = os.path.join(arrays, name)
      have = os.path.getsize(file) if os.path.isfile(file) else None
      if have != size:
        state = "is missing" if have is None else f"has {have} bytes, {size} were written"
        raise IntegrityError(
          f"{file} {state}: a data file is missing or damaged: rebuild the library"
        )
    # Restored as numpy: the sharding saved with the arrays names one device, which
    # another process of a multi-process run (or another machine) may not have.
    as_numpy = {
      m: dict.fromkeys(_FIELDS, ocp.RestoreArgs(restore_type=np.ndarray)) for m in meta["modules"]
    }
    try:
      with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(arrays, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    except Exception as e:  # orbax / tensorstore: a missing or damaged data file
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise IntegrityError(
        f"{arrays}: cannot read the library's arrays ({type(e).__name__}: {first}); "
        "a data file is missing or damaged: rebuild the library"
      ) from None
    _check_arrays(path, meta, tree, verify)
    convert = np.asarray if host else jnp.asarray
    weights = LibraryWeights(
      **{f: {m: convert(tree[m][f]) for m in meta["modules"]} for f in _FIELDS}
    )
    logging.info("Loaded library of %d adapters from %s", len(meta["names"]), path)
    library = cls(
      tuple(meta["names"]),
      tuple(meta["modules"]),
      int(meta["rank"]),
      tuple(meta["ranks"]),
      weights,
      meta.get("metadata", {}),
    )
    if config is not None:
      library.check_fits(config, source=path)
    return library

  def check_fits(self, config: ModelConfig, source: str = "the library") -> None:
    """Raises AdapterError unless every module is one the model has, with the model's
    depth and (O, I) shapes: a library of another base model would otherwise fail
    deep inside the layer scan, or not at all where shapes happen to agree."""
    shapes = config.module_shapes()
    problems = []
    for m in self.modules:
      if m not in shapes:
        problems.append(f"module {m!r} is not one the model has ({sorted(shapes)})")
        continue
      L, _, O, _ = self.weights.b[m].shape
      I = self.weights.a[m].shape[-1]
      if config.num_hidden_layers != L:
        problems.append(f"{m}: {L} layers, the model has {config.num_hidden_layers}")
      if shapes[m] != (O, I):
        problems.append(f"{m}: (out, in) = {(O, I)}, the model's is {shapes[m]}")
    if problems:
      raise AdapterError(
        f"{source}: this library does not fit the base model "
        f"({config.model_type}, hidden size {config.hidden_size}): " + "; ".join(problems)
      )


_FIELDS = ("a", "b", "arrows", "valid")
_TMP_PREFIX, _OLD_PREFIX = ".tmp-library-", ".old-library-"


def _remove_leftovers(parent: str) -> None:
  """Removes what an interrupted save left in ``parent`` (never a library in use)."""
  for name in os.listdir(parent):
    if name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
      full = os.path.join(parent, name)
      logging.info("Removing %s, left by an interrupted library save", full)
      shutil.rmtree(full, ignore_errors=True)


def _read_meta(path: str) -> dict:
  """library.json, checked for the fields ``load`` needs and their agreement."""
  meta_path = os.path.join(path, "library.json")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise AdapterError(f"{meta_path}: not an adapter library (library.json missing)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IntegrityError(
      f"{meta_path}: not valid JSON ({e}); the file is truncated or damaged: rebuild the library"
    ) from None
  if not isinstance(meta, dict):
    raise IntegrityError(f"{meta_path}: expected a JSON object")
  if meta.get("format_version") != _FORMAT_VERSION:
    raise AdapterError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
  missing = [k for k in ("names", "modules", "rank", "ranks") if k not in meta]
  if missing:
    raise IntegrityError(f"{meta_path}: fields {missing} are missing")
  if len(meta["ranks"]) != len(meta["names"]):
    raise IntegrityError(f"{meta_path}: {len(meta['names'])} names but {len(meta['ranks'])} ranks")
  return meta


def _check_arrays(path: str, meta: dict, tree: dict, verify: bool) -> None:
  """Shapes against library.json; with ``verify``, digests and finite values."""
  arrays = os.path.join(path, "arrays")
  N, R = len(meta["names"]), int(meta["rank"])
  for m in meta["modules"]:
    if m not in tree or any(f not in tree[m] for f in _FIELDS):
      raise IntegrityError(f"{arrays}: no arrays for module {m!r}")
    # L, I and O come from the arrays (check_fits holds them against the model).
    a, b = tree[m]["a"], tree[m]["b"]
    L, I, O = a.shape[0], a.shape[-1], b.shape[2] if b.ndim == 4 else -1
    want = {"a": (L, N, R, I), "b": (L, N, O, R), "arrows": (L, I, N), "valid": (L, N)}
    for f in _FIELDS:
      if tuple(tree[m][f].shape) != want[f]:
        raise IntegrityError(
          f"{arrays}: {m}/{f} has shape {tuple(tree[m][f].shape)}, but library.json's "
          f"{N} adapters of rank {R} need {want[f]}"
        )
  if not verify:
    return
  digests = meta.get("digests")
  if digests is None:
    logging.warning(
      "%s: saved without array digests (an older version): not verified; save it again to add them",
      path,
    )
  else:
    have = array_digests({f"{m}/{f}": tree[m][f] for m in meta["modules"] for f in _FIELDS})
    bad = sorted(k for k, d in have.items() if digests.get(k) != d)
    if bad:
      raise IntegrityError(
        f"{arrays}: {', '.join(bad)} differ from the digests recorded at save "
        "(the files are damaged): rebuild the library"
      )
  for m in meta["modules"]:
    for f in ("a", "b", "arrows"):
      i = first_nonfinite(tree[m][f])
      if i is not None:
        index = np.unravel_index(i, tree[m][f].shape)
        n = index[2] if f == "arrows" else index[1]
        raise IntegrityError(
          f"{arrays}: {m}/{f} holds a NaN or Inf (adapter {meta['names'][n]!r}, layer {index[0]})"
        )


def _data_files(folder: str) -> dict[str, int]:
  """Every file under ``folder`` (relative path -> size in bytes)."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      full = os.path.join(root, f)
      out[os.path.relpath(full, folder)] = os.path.getsize(full)
  return dict(sorted(out.items()))


@contextlib.contextmanager
def _quiet_orbax():
  """Silences the error records orbax's worker threads log for a failed restore (a
  missing data file printed 16 tracebacks before the exception): the exception the
  restore raises says it once."""
  import logging as py_logging

  loggers = [py_logging.getLogger(n) for n in ("absl", "orbax", "asyncio")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(py_logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def _n_axes(weights: LibraryWeights):
  """The adapter axis of every leaf: 1 for a/b/valid ([L, N, ...]), 2 for arrows."""
  return LibraryWeights(
    a={m: 1 for m in weights.a},
    b={m: 1 for m in weights.b},
    arrows={m: 2 for m in weights.arrows},
    valid={m: 1 for m in weights.valid},
  )


def _to_tree(w: LibraryWeights) -> dict:
  return {m: {"a": w.a[m], "b": w.b[m], "arrows": w.arrows[m], "valid": w.valid[m]} for m in w.a}


def _raw_factors(adapters, config: ModelConfig, module: str, rank: int):
  """a [n, L, R, I] and scale-folded b [n, L, O, R] in float32, zeros where absent."""
  L = config.num_hidden_layers
  O, I = config.module_shapes()[module]
  a = np.zeros((len(adapters), L, rank, I), np.float32)
  b = np.zeros((len(adapters), L, O, rank), np.float32)
  for n, adapter in enumerate(adapters):
    for m in adapter.modules.values():
      if m.module == module:
        a[n, m.layer, : m.r] = m.a.astype(np.float32)
        b[n, m.layer, :, : m.r] = m.b.astype(np.float32) * np.float32(m.scale)
  return a, b


def _module_order(m: str):
  """The model's module order; names it does not know last (validation names them)."""
  return (ADAPTABLE_MODULES.index(m), m) if m in ADAPTABLE_MODULES else (len(ADAPTABLE_MODULES), m)


def _adapter_rank(a) -> int:
  return a.peek()[1] if isinstance(a, AdapterFile) else max(m.r for m in a.modules.values())


def _align_modules(adapters, names, config, modules, rank, dtype, chunk):
  """Signatures of every module for all adapters, chunk by chunk.

  The library's arrays are allocated once on the device, in its layout and dtype; each
  chunk of adapters is read (``AdapterFile``s are loaded from disk only now), aligned
  module by module, written into them in place (a donated update) and dropped. Peak
  memory is the finished library plus one chunk's work (building host copies first
  held the library twice, and concatenating chunks three times; holding every input
  adapter, once more).
  """
  L, n = config.num_hidden_layers, len(adapters)
  out = {}
  for m in modules:
    O, I = config.module_shapes()[m]
    out[m] = {
      "a": jnp.zeros((L, n, rank, I), dtype),
      "b": jnp.zeros((L, n, O, rank), dtype),
      "valid": jnp.zeros((L, n), bool),
    }
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    part = []
    for a, name in zip(adapters[start:stop], names[start:stop], strict=True):
      if isinstance(a, AdapterFile):
        a = a.load()
        validate_adapter(a, config)
        extra = sorted({x.module for x in a.modules.values()} - set(modules))
        if extra or max(x.r for x in a.modules.values()) > rank:
          raise AdapterError(
            f"adapter {name!r} ({a.name}) changed on disk while the library was built"
          )
      part.append(a)
    for m in modules:
      a, b = _raw_factors(part, config, m, rank)
      a_star, b_star, _, valid = spectral_align_stacked(jnp.asarray(a), jnp.asarray(b))
      del a, b
      out[m] = _write_chunk(out[m], a_star, b_star, valid, jnp.int32(start))
      # Waiting for the chunk before more work is dispatched: with many batched LAPACK
      # calls in flight, the CPU runtime was seen to stall under load.
      jax.block_until_ready(out[m])
      del a_star, b_star, valid
    del part
  return {m: {**v, "arrows": _arrows_of(v["a"])} for m, v in out.items()}


@functools.partial(jax.jit, donate_argnums=0)
def _write_chunk(out, a_star, b_star, valid, start):
  """out's a [L, N, R, I], b [L, N, O, R], valid [L, N] with the chunk's [c, L, ...]
  written at adapters start.. (in place: ``out`` is donated)."""
  zero = jnp.int32(0)

  def put(x, chunk_x):
    chunk_x = jnp.swapaxes(chunk_x, 0, 1).astype(x.dtype)
    return jax.lax.dynamic_update_slice(x, chunk_x, (zero, start) + (zero,) * (x.ndim - 2))

  return {"a": put(out["a"], a_star), "b": put(out["b"], b_star), "valid": put(out["valid"], valid)}


@jax.jit
def _arrows_of(a):
  """Each adapter's arrow, the first row of its A*: [L, N, R, I] -> [L, I, N]."""
  return jnp.swapaxes(a[:, :, 0, :], 1, 2)


def peft_adapter_dirs(folder: str | os.PathLike) -> list[str]:
  """Sub-folders of ``folder`` holding a PEFT adapter (adapter_config.json), sorted."""
  folder = os.fspath(folder)
  return sorted(
    os.path.join(folder, d)
    for d in os.listdir(folder)
    if os.path.exists(os.path.join(folder, d, "adapter_config.json"))
  )


def load_or_build_library(
  path: str | os.PathLike,
  config: ModelConfig,
  modules: Sequence[str] | None = None,
  *,
  allow_pickle: bool = False,
  host: bool = False,
) -> AdapterLibrary:
  """A saved library (a folder with library.json), or one built from a folder whose
  sub-folders are PEFT adapters (named after their folders). ``host``: a saved
  library's arrays stay in host memory (see ``AdapterLibrary.load``)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise AdapterError(f"{path}: no such library folder")
  if os.path.exists(os.path.join(path, "library.json")):
    return AdapterLibrary.load(path, host=host, config=config)
  dirs = peft_adapter_dirs(path)
  if not dirs:
    raise AdapterError(
      f"{path}: neither a saved library (library.json) nor a folder of "
      "PEFT adapters (sub-folders with adapter_config.json)"
    )
  # Streamed from disk chunk by chunk (AdapterFile): never every adapter in memory.
  adapters = [AdapterFile(d, allow_pickle=allow_pickle) for d in dirs]
  return AdapterLibrary.from_adapters(adapters, config, modules)
