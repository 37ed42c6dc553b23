"""A library sharded over the ``adapter`` mesh axis, and expert-parallel routing on it.

Placement: every leaf of the library is split along its N axis over the mesh axis
that the rules table maps the logical ``adapter`` axis to. N is padded up to a multiple
of that axis's size with invalid all-zero adapters (never chosen, never counted), so
each shard holds n = N_pad / shards adapters: their A*, B*, arrows and valid flags;
shared directions (if removed) are replicated.

Routing (``route_sharded``: the routing core, ``core.route_module``, inside a
``shard_map`` manual over the adapter axis only; the other mesh axes stay with XLA)
with the ``Sharded`` placement. Shard d owns global ids [d n, (d + 1) n). Per token,
nothing proportional to N crosses devices:

  1. local |arrow . x| scores [B, T, n] and the local top-k (ids + offset);
  2. an all-gather of the (score, id) candidates only: [B, T, k] per shard;
  3. the global top-k of the gathered candidates, the same on every shard;
  4. each candidate's owner computes ||A* P x||^2, a pmax of the [B, T, k] norms gives
     all of them everywhere, and the winner is picked by the same lower-id tie rule on
     every shard (request-level routers: votes and states are computed alike, from
     the same global decisions, on every shard);
  5. the owner of the chosen adapter(s) computes B* A* x and one psum of [B, T, O]
     over the adapter axis adds the (single non-zero, or per-owner weighted)
     contributions.

Ties: lax.top_k prefers the lower index among equal values, each shard's list is
in id order for equal scores, and shard d's ids all precede shard d + 1's; so the
top-k over the gathered lists in shard order prefers lower global ids, exactly as
the single-device routers do.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lag_jax import distributed
from lag_jax.model.sharding import DEFAULT_RULES
from lag_jax.routing import core
from lag_jax.routing.library import AdapterLibrary, LibraryWeights, NamedAdapters, _n_axes

IMPLS = ("shard_map", "jit")

# Logical axes of the library's leaves (per module), resolved by the rules table.
LIBRARY_LOGICAL_AXES = {
  "a": ("layers", "adapter", None, None),  # [L, N, R, I]
  "b": ("layers", "adapter", None, None),  # [L, N, O, R]
  "arrows": ("layers", None, "adapter"),  # [L, I, N]
  "valid": ("layers", "adapter"),  # [L, N]
}


@dataclasses.dataclass(frozen=True)
class AdapterSharding:
  """How a routed library is split (static: hashable, part of the compiled shape).

  Attributes:
    mesh: the device mesh the library lives on.
    axis: the mesh axis the adapters are split over.
    impl: ``shard_map`` (explicit expert-parallel routing, the default) or ``jit``
      (the single-device routers on the sharded arrays, partitioned by XLA).
  """

  mesh: Mesh
  axis: str = "adapter"
  impl: str = "shard_map"

  def __post_init__(self):
    if self.impl not in IMPLS:
      raise ValueError(f"sharded routing impl {self.impl!r} is unknown; choose from {IMPLS}")
    if self.axis not in self.mesh.shape:
      raise ValueError(f"mesh {dict(self.mesh.shape)} has no axis {self.axis!r}")

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]

  def route(self, specs, router_index, x, w, module, mask, fixed_ids, caches, **kw):
    """The hook's entry at one module (``route_sharded``)."""
    del caches
    lib = core.Resident.of(w, module)
    return route_sharded(specs, router_index, x, lib, mask, fixed_ids, self, **kw)


@dataclasses.dataclass(frozen=True)
class ShardedLibrary(NamedAdapters):
  """An AdapterLibrary placed on a mesh, split along N (see the module docstring).

  ``routed(...)`` takes it in place of an AdapterLibrary: masks and ids are over the
  library's own N adapters, the padding is added there. The model's parameters must
  live on the same mesh (e.g. ``load_model(folder, mesh=mesh)``), since one jitted
  call cannot mix arrays committed to different devices.

  Attributes:
    names, modules, rank, ranks, metadata: as in the AdapterLibrary.
    weights: the padded arrays, N_pad = ``padded_size`` adapters, sharded.
    sharding: the mesh, its adapter axis and the routing implementation.
  """

  names: tuple[str, ...]
  modules: tuple[str, ...]
  rank: int
  ranks: tuple[int, ...]
  weights: LibraryWeights
  sharding: AdapterSharding
  metadata: dict[str, dict] = dataclasses.field(default_factory=dict)

  @property
  def padded_size(self) -> int:
    return next(iter(self.weights.valid.values())).shape[1]

  def routing_parts(self):
    """(weights, routing form, caches, padded N) for ``hook.routed``."""
    return self.weights, self.sharding, None, self.padded_size

  def nbytes(self) -> int:
    """Bytes of all (padded) arrays over all devices."""
    return sum(x.nbytes for x in jax.tree.leaves(self.weights))

  def nbytes_per_device(self) -> dict[int, int]:
    """Resident bytes on each device (by device id)."""
    return nbytes_per_device(self.weights)


def nbytes_per_device(tree) -> dict[int, int]:
  """Bytes of a pytree of arrays held on each device, by device id."""
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def library_partition_spec(
  field: str, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> PartitionSpec:
  """PartitionSpec of a library leaf (``a``, ``b``, ``arrows`` or ``valid``)."""
  spec = []
  for axis in LIBRARY_LOGICAL_AXES[field]:
    mesh_axis = rules.get(axis) if axis else None
    spec.append(mesh_axis if mesh_axis in mesh.shape and mesh_axis not in spec else None)
  return PartitionSpec(*spec)


def shard_library(
  library: AdapterLibrary,
  mesh: Mesh,
  rules: Mapping[str, str | None] = DEFAULT_RULES,
  *,
  impl: str = "shard_map",
) -> ShardedLibrary:
  """Places ``library`` on ``mesh``, split along N over the rules' ``adapter`` axis.

  N is padded to a multiple of the axis size with zero, invalid adapters. Each leaf
  goes through host memory and each device receives only its own slice; with a mesh
  over several processes, every process holds the same ``library`` and places only
  its own devices' slices (nothing crosses processes).
  Raises:
    ValueError: the rules map ``adapter`` to no axis of the mesh.
  """
  axis = rules.get("adapter")
  if axis not in mesh.shape:
    raise ValueError(
      f"sharding rules map 'adapter' to {axis!r}, which is not an axis of mesh {dict(mesh.shape)}"
    )
  sharding = AdapterSharding(mesh, axis, impl)
  N = len(library)
  pad = math.ceil(N / sharding.size) * sharding.size - N

  def place(field, x, n_axis):
    host = np.asarray(x)
    if pad:
      widths = [(0, 0)] * host.ndim
      widths[n_axis] = (0, pad)
      host = np.pad(host, widths)  # zeros; valid pads with False
    return distributed.put(host, NamedSharding(mesh, library_partition_spec(field, mesh, rules)))

  w, axes = library.weights, _n_axes(library.weights)
  weights = LibraryWeights(
    **{
      f: {m: place(f, getattr(w, f)[m], getattr(axes, f)[m]) for m in getattr(w, f)}
      for f in ("a", "b", "arrows", "valid")
    }
  )
  if w.shared is not None:  # [L, I, Q] directions: replicated, every shard projects x
    replicated = NamedSharding(mesh, PartitionSpec())
    weights = weights.replace(
      shared={m: distributed.put(np.asarray(d), replicated) for m, d in w.shared.items()}
    )
  return ShardedLibrary(
    library.names,
    library.modules,
    library.rank,
    library.ranks,
    weights,
    sharding,
    dict(library.metadata),
  )


# --- Routing on the shards ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sharded(core.Resident):
  """The placement of one shard inside ``shard_map``: its n adapters' factors (global
  ids [offset, offset + n)), with the operations that make the routers' results global
  (see the module docstring). Arrays are the shard's own; ``shared`` is replicated."""

  axis: str = "adapter"
  offset: jax.Array | None = None
  devices: int = 1

  @property
  def size(self) -> int:
    return self.n * self.devices

  def top_k(self, values, k: int):
    vals, ids = jax.lax.top_k(values, min(k, values.shape[-1]))
    return self.merge(vals, ids.astype(jnp.int32) + self.offset, k)

  def merge(self, vals, ids, k: int):
    """The global top-k of each shard's candidates, the same on every shard; ties go
    to the lower global id. Only the k local candidates travel."""
    # One collective for both: the scores travel bit-cast as int32 (moved bit for bit;
    # ids bit-cast to float would be denormals, which some hardware flushes to zero).
    packed = jnp.stack([jax.lax.bitcast_convert_type(vals.astype(jnp.float32), jnp.int32), ids])
    packed = jax.lax.all_gather(packed, self.axis, axis=packed.ndim - 1, tiled=True)
    all_vals, all_ids = jax.lax.bitcast_convert_type(packed[0], jnp.float32), packed[1]
    top, pos = jax.lax.top_k(all_vals, min(k, all_vals.shape[-1]))
    return top, jnp.take_along_axis(all_ids, pos, axis=-1)

  def owner(self, ids):
    local = ids - self.offset
    return (ids >= 0) & (local >= 0) & (local < self.n)

  def local(self, ids):
    return jnp.clip(ids - self.offset, 0, self.n - 1)

  def owner_max(self, values, ids):
    return jax.lax.pmax(jnp.where(self.owner(ids), values, -jnp.inf), self.axis)

  def any(self, flag):
    return jax.lax.pmax(flag.astype(jnp.int32), self.axis) > 0

  def total(self, x):
    return jax.lax.psum(x, self.axis)

  def finish(self, delta):
    return jax.lax.psum(delta, self.axis)

  def allowed_at(self, allowed, ids):
    here = jnp.take_along_axis(allowed, self.local(ids), axis=1) & self.owner(ids)
    return self.any(here)

  def a_rows(self, ids, need):
    del need
    return core.gather_adapters(self.a, self.local(ids))

  def b_rows(self, ids, need):
    del need
    return self.b[self.local(ids)]

  def scan(self, fn, carry, allowed, with_b: bool):
    ids = self.offset + jnp.arange(self.n, dtype=jnp.int32)
    return fn(carry, self.a, self.b if with_b else None, ids, allowed)


def route_sharded(specs, router_index, x, lib: core.Resident, mask, fixed_ids, sharding, **kw):
  """``core.route_module`` on a library split over ``sharding``'s axis.

  Args:
    specs, router_index, x, fixed_ids, kw (layer, span, state, C): as in
      ``core.route_module``.
    lib: one layer's slice of the padded library, N sharded over the adapter axis
      (``shared`` replicated).
    mask: [B, N_pad] bool (False on padding).
  Returns:
    as ``core.route_module``, replicated over the adapter axis.
  """
  if sharding.impl == "jit":
    return core.route_module(specs, router_index, x, lib, mask, fixed_ids, **kw)
  axis = sharding.axis

  C = kw.pop("C", 1)

  def body(x, factors, mask, args):
    a, b, arrows, valid, shared = factors
    pl = Sharded(
      a=a,
      b=b,
      arrows=arrows,
      valid=valid,
      shared=shared,
      axis=axis,
      offset=jax.lax.axis_index(axis).astype(jnp.int32) * a.shape[0],
      devices=sharding.size,
    )
    router_index, fixed_ids, kw = args
    return core.route_module(specs, router_index, x, pl, mask, fixed_ids, C=C, **kw)

  sharded = PartitionSpec(axis)
  factors = (lib.a, lib.b, lib.arrows, lib.valid, lib.shared)
  factor_specs = (
    sharded,
    sharded,
    PartitionSpec(None, axis),
    sharded,
    None if lib.shared is None else PartitionSpec(),
  )
  fn = jax.shard_map(
    body,
    mesh=sharding.mesh,
    in_specs=(PartitionSpec(), factor_specs, PartitionSpec(None, axis), PartitionSpec()),
    out_specs=PartitionSpec(),
    axis_names={axis},
    # all_gather's result is typed as varying; the choices computed from it are the
    # same on every shard by construction (deterministic ops on identical inputs).
    check_vma=False,
  )
  return fn(x, factors, mask, (router_index, fixed_ids, kw))


def route_batch_sharded(specs, router_index, x, lib, mask, fixed_ids, sharding):
  """Per-token routers on a sharded library: (delta [B, T, O], chosen [B, T])."""
  delta, chosen, _ = route_sharded(specs, router_index, x, lib, mask, fixed_ids, sharding)
  return delta, chosen


# --- What a compiled program moves between devices ---------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")


def _shapes_bytes(type_text: str) -> tuple[list[str], list[int]]:
  shapes, sizes = [], []
  for dtype, dims in _SHAPE.findall(type_text):
    if dtype in _DTYPE_BYTES:
      shapes.append(f"{dtype}[{dims}]")
      sizes.append(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype])
  return shapes, sizes


def hlo_collectives(hlo_text: str) -> list[dict]:
  """The cross-device collectives of a compiled HLO module (``.compile().as_text()``).

  Returns one dict per collective instruction (async ``-start`` forms counted once,
  their ``-done`` halves not at all): ``kind``, ``operands`` (shapes), ``operand_bytes``
  (what each device contributes, all operands), ``largest_operand_bytes`` (XLA
  combines small collectives into one with several operands), ``result`` and
  ``result_bytes``. An instruction inside a loop body (the decoder's layer scan)
  appears once but runs every trip.
  """
  types: dict[str, str] = {}
  found = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, type_text, opcode, rest = m.groups()
    types[name] = type_text
    kind = opcode.removesuffix("-start")
    if kind not in COLLECTIVES or opcode.endswith("-done"):
      continue
    # Operands are "%name" (compiled text) or "type %name" (unoptimised text).
    args = rest.split(")", 1)[0]
    names = re.findall(r"%([\w.\-]+)", args)
    operand_types = " ".join(types[n] for n in names) if all(n in types for n in names) else args
    operands, operand_bytes = _shapes_bytes(operand_types)
    result, result_bytes = _shapes_bytes(type_text)
    found.append(
      dict(
        kind=kind,
        operands=operands,
        operand_bytes=sum(operand_bytes),
        largest_operand_bytes=max(operand_bytes, default=0),
        result=result,
        result_bytes=sum(result_bytes),
      )
    )
  return found
