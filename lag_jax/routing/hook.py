"""Routed adapters inside the decoder: the AdapterHook that runs the routers.

``RoutedAdapters`` carries any number of libraries (knowledge adapters on the MLP,
task adapters on attention, ...), each with its own routers and per-request
inputs, plus optional static LoRA weights. At every adapted module and layer each
library that holds the module is routed on that module's own input, per token,
and all deltas are added.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lag_jax.model.layers import LoraWeights, lora_delta
from lag_jax.routing.library import AdapterLibrary, LibraryWeights
from lag_jax.routing.routers import LayerLibrary, RouterSpec, route_batch
from lag_jax.routing.sharded import AdapterSharding, ShardedLibrary, route_batch_sharded


@struct.dataclass
class RoutedLibrary:
  """One library and how a batch routes over it.

  Attributes:
    weights: the library's arrays (leaves [L, ...]).
    mask: [B, N] bool, the adapters each request may route to.
    fixed_ids: [B] int32, each request's adapter for the ``fixed`` router (-1: none).
    router_index: [B] int32, each request's router, an index into ``routers``.
    routers: the routers this batch uses (static: part of the compiled shape).
    sharding: for a ShardedLibrary, its mesh and adapter axis (static); None for a
      library on one device.
  """

  weights: LibraryWeights
  mask: jax.Array
  fixed_ids: jax.Array
  router_index: jax.Array
  routers: tuple[RouterSpec, ...] = struct.field(pytree_node=False)
  sharding: AdapterSharding | None = struct.field(pytree_node=False, default=None)

  @property
  def modules(self) -> tuple[str, ...]:
    return tuple(self.weights.a)

  def pad_batch(self, batch: int) -> RoutedLibrary:
    """Adds rows (all adapters allowed, no fixed id, router 0) up to ``batch``."""
    extra = batch - self.mask.shape[0]
    if extra <= 0:
      return self
    return self.replace(
      mask=jnp.pad(self.mask, ((0, extra), (0, 0)), constant_values=True),
      fixed_ids=jnp.pad(self.fixed_ids, (0, extra), constant_values=-1),
      router_index=jnp.pad(self.router_index, (0, extra)),
    )


def routed(
  library: AdapterLibrary | ShardedLibrary,
  batch: int,
  router: RouterSpec | Sequence[RouterSpec],
  *,
  mask=None,
  fixed_ids=None,
  router_index=None,
) -> RoutedLibrary:
  """Checks and packs per-request routing inputs for ``library``.

  Args:
    library: the adapter library, or one sharded over a mesh (``shard_library``).
    batch: B, the number of requests.
    router: one RouterSpec for all requests, or several (then ``router_index`` [B]
      picks each request's).
    mask: [B, N] or [N] bool, adapters each request may use; default all.
    fixed_ids: [B] adapter ids (or names) for the ``fixed`` router; -1 for none.
  Raises:
    ValueError: a mask that allows no adapter for some request, a bad id, or a
      router_index outside the routers given.
  """
  routers = (router,) if isinstance(router, RouterSpec) else tuple(router)
  N = len(library)
  mask = np.ones((batch, N), bool) if mask is None else np.asarray(mask, bool)
  if mask.ndim == 1:
    mask = np.broadcast_to(mask, (batch, N))
  if mask.shape != (batch, N):
    raise ValueError(
      f"routing mask has shape {mask.shape}, expected {(batch, N)} "
      f"(requests x adapters of the library)"
    )
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"routing mask allows no adapter for request(s) {empty.tolist()}")
  if fixed_ids is None:
    fixed_ids = np.full((batch,), -1, np.int32)
  else:
    fixed_ids = np.asarray(
      [library.id(i) if isinstance(i, str) else int(i) for i in fixed_ids], np.int32
    )
    bad = [int(i) for i in fixed_ids if not -1 <= i < N]
    if bad or fixed_ids.shape != (batch,):
      raise ValueError(f"fixed_ids must be {batch} ids in [-1, {N}), got {fixed_ids.tolist()}")
  if router_index is None:
    if len(routers) > 1:
      raise ValueError("several routers given: router_index must say which request uses which")
    router_index = np.zeros((batch,), np.int32)
  router_index = np.asarray(router_index, np.int32)
  if router_index.shape != (batch,) or router_index.min() < 0 or router_index.max() >= len(routers):
    raise ValueError(f"router_index must be {batch} values in [0, {len(routers)})")
  sharding = None
  if isinstance(library, ShardedLibrary):
    # Padding adapters: never allowed, never counted by ``uniform``.
    mask = np.pad(mask, ((0, 0), (0, library.padded_size - N)))
    sharding = library.sharding
  return RoutedLibrary(
    library.weights,
    jnp.asarray(mask),
    jnp.asarray(fixed_ids),
    jnp.asarray(router_index),
    routers,
    sharding,
  )


@struct.dataclass
class RoutedAdapters:
  """The AdapterHook for routed libraries (and optional static LoRA on top).

  Telemetry: for each module, a tuple with one [B, T] int32 array per library that
  holds the module (in ``libraries`` order, -1 for none): the adapter each token
  was routed to; stacked over layers by the decoder to [L, B, T].
  """

  libraries: tuple[RoutedLibrary, ...]
  static: dict[str, LoraWeights] | None = None

  def per_layer(self):
    return (self.static, tuple(lib.weights for lib in self.libraries))

  def pad_batch(self, batch: int) -> RoutedAdapters:
    """The same adapters for a batch padded to ``batch`` rows (see generation)."""
    return self.replace(libraries=tuple(lib.pad_batch(batch) for lib in self.libraries))

  def delta(self, layer_xs, name, x):
    static, lib_weights = layer_xs
    total, chosen = None, []
    if static is not None and name in static:
      total = lora_delta(x, static[name])
    for lib, w in zip(self.libraries, lib_weights, strict=True):
      if name not in w.a:
        continue
      layer_lib = LayerLibrary(a=w.a[name], b=w.b[name], arrows=w.arrows[name], valid=w.valid[name])
      args = (lib.routers, lib.router_index, x, layer_lib, lib.mask, lib.fixed_ids)
      if lib.sharding is None:
        d, c = route_batch(*args)
      else:
        d, c = route_batch_sharded(*args, lib.sharding)
      total = d if total is None else total + d
      chosen.append(c)
    return total, (tuple(chosen) if chosen else None)
