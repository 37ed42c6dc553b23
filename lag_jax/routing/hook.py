"""Routed adapters inside the decoder: the AdapterHook that runs the routers.

``RoutedAdapters`` carries any number of libraries (knowledge adapters on the MLP,
task adapters on attention, ...), each with its own routers and per-request
inputs, plus optional static LoRA weights. At every adapted module and layer each
library that holds the module is routed on that module's own input, per token,
and all deltas are added.

Request-level routers (``vote``, ``request_lag``, gated ``lag``; see
``lag_jax.routing.request``) add per-request state, per layer and module, that rides
through the layer scan beside the library's weights; ``generate`` computes it from the
prompt first (``request_passes``, ``for_prompts``, ``split_aux``,
``with_request_state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lag_jax.model.layers import LoraWeights, lora_delta
from lag_jax.routing import request
from lag_jax.routing.core import ON_DEVICE
from lag_jax.routing.library import LibraryWeights
from lag_jax.routing.request import RequestState
from lag_jax.routing.routers import RouterSpec
from lag_jax.routing.sharded import AdapterSharding


@struct.dataclass
class RoutedLibrary:
  """One library and how a batch routes over it.

  Attributes:
    weights: the library's arrays (leaves [L, ...]; an offloaded library's have no
      A* / B*, which its form fetches).
    mask: [B, N] bool, the adapters each request may route to.
    fixed_ids: [B] int32, each request's adapter for the ``fixed`` router (-1: none).
    router_index: [B] int32, each request's router, an index into ``routers``.
    routers: the routers this batch uses (static: part of the compiled shape).
    form: where the factors live and how a module is routed over them (static):
      ``core.ON_DEVICE``, a sharded library's ``AdapterSharding`` or an offloaded
      library's host (``offload._Host``).
    span: [B, P] bool, the prompt tokens each request's request-level routing pools
      over (votes, request_lag's filter); None: the whole prompt.
    state: the request-level state (``request.RequestState``, leaves [L, B, ...])
      once computed; None before (the library is then *resolving*: see
      ``lag_jax.routing.request``).
    caches: an offloaded library's device caches (``jax.Ref`` leaves, updated in place;
      one offloaded library may appear once per call); None otherwise.
  """

  weights: LibraryWeights
  mask: jax.Array
  fixed_ids: jax.Array
  router_index: jax.Array
  routers: tuple[RouterSpec, ...] = struct.field(pytree_node=False)
  form: Any = struct.field(pytree_node=False, default=ON_DEVICE)
  span: jax.Array | None = None
  state: RequestState | None = None
  caches: Any = None

  @property
  def modules(self) -> tuple[str, ...]:
    return tuple(self.weights.arrows)

  @property
  def sharding(self) -> AdapterSharding | None:
    return self.form if isinstance(self.form, AdapterSharding) else None

  @property
  def request_level(self) -> bool:
    """Some router of the batch is request-level (vote, request_lag, gated)."""
    return any(s.request_level for s in self.routers)

  @property
  def resolving(self) -> bool:
    """Request-level routers whose state is not computed yet, or not final (a
    two-round vote between its rounds)."""
    return self.request_level and (self.state is None or self.state.finalists is not None)

  @property
  def request_passes(self) -> int:
    """Prefills ``generate`` runs: 3 with a two-round vote to resolve (first round,
    second round, then the one that applies), 2 with a voting router to resolve, 1
    with other request-level routers to resolve (their state comes from the prefill
    itself), else 0 (nothing to resolve: the usual single prefill)."""
    if not self.resolving:
      return 0
    if self.state is not None:  # between the rounds of a two-round vote
      return 2
    if any(s.two_rounds for s in self.routers):
      return 3
    return 2 if any(s.votes for s in self.routers) else 1

  def per_layer(self):
    """The layer-scanned inputs: (weights, the layer index or None, the request-level
    state or None). Per-token routers on one device or shards need no layer index (the
    paper's path scans the weights alone); request-level routers and offloaded
    libraries (whose caches are keyed by layer) do."""
    layer = None
    weights = self.weights
    if self.request_level or self.caches is not None or self.arrows_in_place:
      L = next(iter(self.weights.valid.values())).shape[0]
      layer = jnp.arange(L, dtype=jnp.int32)
    if self.arrows_in_place:  # route() reads each layer's arrows from the stack
      weights = weights.replace(arrows={})
    return (weights, layer, self.state)

  @property
  def arrows_in_place(self) -> bool:
    """Whether each layer's arrows are read in place from the library's stack rather
    than scanned (XLA:CPU copies a scanned slice before its dot; TPU / GPU fuse it):
    a library held whole on this CPU device."""
    return self.form is ON_DEVICE and self.sharding is None and jax.default_backend() == "cpu"

  def at_layer(self, layer):
    """``per_layer()``'s inputs of one layer (to route a module outside the decoder)."""
    w, index, state = self.per_layer()
    pick = lambda t: jax.tree.map(lambda v: v[layer], t)  # noqa: E731
    L = next(iter(self.weights.valid.values())).shape[0]
    index = jnp.arange(L, dtype=jnp.int32)[layer] if index is None else index[layer]
    return pick(w), index, None if state is None else pick(state)

  def route(self, module: str, x, layer_xs):
    """Routes module ``module`` at one layer: (delta [B, T, O], chosen [B, T], and
    while resolving the request-level quantities) through the library's form."""
    w, layer, state = layer_xs
    span = module_state = None
    if self.resolving and self.span is not None:
      span = self.span
      if span.shape[1] != x.shape[1]:
        raise ValueError(
          f"routing span has {span.shape[1]} columns for {x.shape[1]} prompt tokens: "
          "fit it with for_prompts (generate does)"
        )
    if state is not None:
      module_state = {
        "cand": state.cand[module],
        "ids": state.ids[module],
        "weights": state.weights[module],
      }
      if state.finalists is not None:  # a two-round vote's second round
        module_state["finalists"] = state.finalists[module]
    C, _ = request.state_dims(self.routers, self.mask.shape[1])
    extra = {}
    if module not in w.arrows:  # arrows_in_place: the stack, read at this layer
      extra["stacked_arrows"] = self.weights.arrows[module]
    return self.form.route(
      self.routers,
      self.router_index,
      x,
      w,
      module,
      self.mask,
      self.fixed_ids,
      self.caches,
      layer=layer,
      span=span,
      state=module_state,
      C=C,
      **extra,
    )

  def pad_batch(self, batch: int) -> RoutedLibrary:
    """Adds rows (all adapters allowed, no fixed id, router 0) up to ``batch``."""
    extra = batch - self.mask.shape[0]
    if extra <= 0:
      return self
    return self.replace(
      mask=jnp.pad(self.mask, ((0, extra), (0, 0)), constant_values=True),
      fixed_ids=jnp.pad(self.fixed_ids, (0, extra), constant_values=-1),
      router_index=jnp.pad(self.router_index, (0, extra)),
      span=None
      if self.span is None
      else jnp.pad(self.span, ((0, extra), (0, 0)), constant_values=True),
      state=None if self.state is None else self.state.pad_batch(extra),
    )

  def for_prompts(self, prompt_mask) -> RoutedLibrary:
    """The span fitted to a padded batch of prompts: prompt_mask [B, P] bool (the real
    prompt tokens); the span is cut or padded to P columns and limited to them.
    Raises ValueError where a request's span holds no prompt token."""
    if not self.resolving:
      return self
    prompt_mask = np.asarray(prompt_mask, bool)
    B, P = prompt_mask.shape
    span = prompt_mask
    if self.span is not None:
      given = np.asarray(self.span, bool)[:, :P]
      given = np.pad(given, ((0, 0), (0, P - given.shape[1])))
      span = given & prompt_mask
    empty = np.flatnonzero(~span.any(axis=1))
    if empty.size:
      raise ValueError(
        f"routing span holds no prompt token for request(s) {empty.tolist()} "
        "(request-level routers pool over it)"
      )
    return self.replace(span=jnp.asarray(span))


def routed(
  library,
  batch: int,
  router: RouterSpec | Sequence[RouterSpec],
  *,
  mask=None,
  fixed_ids=None,
  router_index=None,
  span=None,
) -> RoutedLibrary:
  """Checks and packs per-request routing inputs for ``library``.

  Args:
    library: the adapter library (``AdapterLibrary``), one sharded over a mesh
      (``shard_library``) or one whose factors stay on the host (``OffloadedLibrary``).
    batch: B, the number of requests.
    router: one RouterSpec for all requests, or several (then ``router_index`` [B]
      picks each request's).
    mask: [B, N] or [N] bool, adapters each request may use; default all.
    fixed_ids: [B] adapter ids (or names) for the ``fixed`` router; -1 for none.
    span: for request-level routers, the prompt tokens each request pools over
      (votes, request_lag's filter): [B, P] bool, or B bool sequences of any lengths
      (e.g. ``spans.text_span``'s); None: the whole prompt. ``generate`` fits it to
      the padded prompts.
  Raises:
    ValueError: a mask that allows no adapter for some request, a bad id, a
      router_index outside the routers given, a span that marks no token, layers the
      library lacks, or request-level routers on a shard_map-sharded library.
  """
  routers = (router,) if isinstance(router, RouterSpec) else tuple(router)
  N = len(library)
  weights, form, caches, padded = library.routing_parts()
  _check_layers(weights, routers)
  if span is not None:
    span = _pack_span(span, batch)
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
  # Padding adapters of a sharded library: never allowed, never counted by ``uniform``.
  mask = np.pad(mask, ((0, 0), (0, padded - N)))
  return RoutedLibrary(
    weights,
    jnp.asarray(mask),
    jnp.asarray(fixed_ids),
    jnp.asarray(router_index),
    routers,
    form,
    None if span is None else jnp.asarray(span),
    None,
    caches,
  )


def _check_layers(weights, routers) -> None:
  L = next(iter(weights.valid.values())).shape[0]
  for s in routers:
    for field in ("layers", "vote_layers"):
      value = getattr(s, field)
      if value is not None and value[-1] >= L:
        raise ValueError(f"router {s.name!r}: {field} {value} outside the library's {L} layers")
    missing = sorted(set(s.vote_modules or ()) - set(weights.valid))
    if missing:
      raise ValueError(
        f"router {s.name!r}: vote_modules {missing} are not modules of the library "
        f"(it holds {sorted(weights.valid)})"
      )


def _pack_span(span, batch: int) -> np.ndarray:
  """[B, P] bool from an array or B sequences of any lengths (padded with False)."""
  if isinstance(span, np.ndarray | jax.Array):
    span = np.asarray(span, bool)
    if span.ndim != 2:
      raise ValueError(f"routing span must be [B, P], got shape {span.shape}")
    rows = list(span)
  else:
    rows = [np.asarray(r, bool).reshape(-1) for r in span]
  if len(rows) != batch:
    raise ValueError(f"routing span has {len(rows)} rows for {batch} requests")
  out = np.zeros((batch, max(1, max(len(r) for r in rows))), bool)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
  empty = np.flatnonzero(~out.any(axis=1))
  if empty.size:
    raise ValueError(f"routing span marks no token for request(s) {empty.tolist()}")
  return out


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
    return (self.static, tuple(lib.per_layer() for lib in self.libraries))

  def pad_batch(self, batch: int) -> RoutedAdapters:
    """The same adapters for a batch padded to ``batch`` rows (see generation)."""
    return self.replace(libraries=tuple(lib.pad_batch(batch) for lib in self.libraries))

  # --- Request-level routing (see lag_jax.routing.request) ---------------------------

  @property
  def request_passes(self) -> int:
    """0: route as usual; 1: the prefill also computes the request-level state the
    decode uses; 2: a first prefill computes it (votes), a second applies it; 3: a
    two-round vote's rounds, then the prefill that applies them."""
    return max((lib.request_passes for lib in self.libraries), default=0)

  def for_prompts(self, prompt_mask) -> RoutedAdapters:
    """Spans fitted to the padded prompts (host side; ``RoutedLibrary.for_prompts``)."""
    return self.replace(libraries=tuple(lib.for_prompts(prompt_mask) for lib in self.libraries))

  def split_aux(self, aux):
    """A resolving pass's telemetry -> (the usual telemetry: module -> tuple of [L, B,
    T] ids per library, the request-level state of each library or None)."""
    telemetry, stats = {}, [dict() for _ in self.libraries]
    for module, entries in aux.items():
      holders = [i for i, lib in enumerate(self.libraries) if module in lib.modules]
      out = []
      for i, e in zip(holders, entries, strict=True):
        if isinstance(e, dict):
          stats[i][module] = e
          out.append(e["chosen"])
        else:
          out.append(e)
      telemetry[module] = tuple(out)
    states = tuple(
      request.resolve_state(
        lib.routers, lib.router_index, stats[i], lib.mask.shape[1], previous=lib.state
      )
      if lib.resolving
      else None
      for i, lib in enumerate(self.libraries)
    )
    return telemetry, states

  def with_request_state(self, states) -> RoutedAdapters:
    """The hook with each resolving library's state fixed (``split_aux``'s second half)."""
    return self.replace(
      libraries=tuple(
        lib if st is None else lib.replace(state=st)
        for lib, st in zip(self.libraries, states, strict=True)
      )
    )

  def delta(self, layer_xs, name, x):
    static, lib_xs = layer_xs
    total, chosen = None, []
    if static is not None and name in static:
      total = lora_delta(x, static[name])
    for lib, xs in zip(self.libraries, lib_xs, strict=True):
      if name not in lib.modules:
        continue
      d, c, stats = lib.route(name, x, xs)
      total = d if total is None else total + d
      chosen.append(c if stats is None else {"chosen": c, **stats})
    return total, (tuple(chosen) if chosen else None)
