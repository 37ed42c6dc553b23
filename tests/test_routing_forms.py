"""One routing core, every form of a library: every router x {resident, sharded over 8
simulated devices, offloaded to host memory, offloaded to memory-mapped files} x
{prefill, decode} x {as built, shared directions removed} against the float64 brute
force of tests/reference (ids exact, deltas 1e-4).

Each case routes one batch whose rows use every router at once (``router_index``), at
two modules and both layers, through the hook's entry (``RoutedLibrary.route``) as the
decoder calls it: a resolving prefill (votes, request_lag's candidates), the state
resolved from it, a two-round vote's second round (its finalists' votes; the other rows
apply their state), the final state, a prefill and a decode step with that state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import request as rr
from reference import routing as ref
from reference.request import ref_route_request
from reference.shared import ref_directions, ref_shared_module
from test_routing_beyond import make_adapter

from lag_jax.model.sharding import mesh_from_sizes
from lag_jax.routing import request
from lag_jax.routing.hook import routed
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.offload import OffloadedLibrary, save_offloaded
from lag_jax.routing.request import RequestState
from lag_jax.routing.routers import RouterSpec
from lag_jax.routing.sharded import shard_library
from lag_jax.routing.shared import remove_shared
from lag_jax.testing import tiny_config

ATOL = 1e-4
CFG = tiny_config()  # hidden 64, intermediate 128, 2 layers
L = CFG.num_hidden_layers
N = 7
FORMS = ("resident", "sharded", "offloaded_host", "offloaded_files")
MODULES = ("gate_proj", "down_proj")

# Adapter 5 covers layer 1 only (invalid at layer 0: never chosen there).
ADAPTERS = [
  make_adapter(f"k{i}", r, 60 + i, layers=[1] if i == 5 else None)
  for i, r in enumerate([2, 4, 6, 3, 5, 4, 3])
]

SPECS = (
  RouterSpec("none"),
  RouterSpec("fixed"),
  RouterSpec("uniform"),
  RouterSpec("arrow"),
  RouterSpec("arrow_softmax", k=3, temperature=0.5),
  RouterSpec("spectr"),
  RouterSpec("lag", k=3),
  RouterSpec("lag", k=3, projection="dense"),
  RouterSpec("lag", k=3, projection="grouped"),
  RouterSpec("vote", k=3),
  RouterSpec("vote", k=2, vote_score="score", vote_top_m=2),
  RouterSpec("vote", k=3, vote_score="margin"),
  RouterSpec("request_lag", k=3),
  RouterSpec("lag", k=3, gate=0.3),  # falls back to the vote winner
  RouterSpec("request_lag", k=3, gate=0.3, gate_fallback="none"),
  RouterSpec("lag", k=2, layers=(1,)),  # layer 0 uses the vote winner
  RouterSpec("vote", k=3, vote_score="margin", vote_finalists=3),  # two rounds
  RouterSpec("vote", k=2, vote_score="score", vote_finalists=2, vote_top_m=2),
)
B = len(SPECS)  # one row per router
FIXED = np.where(np.arange(B) == 1, 5, -1)  # adapter 5: nothing at layer 0


@functools.cache
def library() -> AdapterLibrary:
  return AdapterLibrary.from_adapters(ADAPTERS, CFG)


@functools.cache
def form_library(form: str, removal: str, folder=None):
  """The library in ``form``, shared directions removed as that form does it."""
  lib = library()
  if form == "resident":
    return remove_shared(lib, removal)[0]
  if form == "sharded":
    mesh = mesh_from_sizes({"data": 1, "model": 1, "adapter": -1})
    return remove_shared(shard_library(lib, mesh), removal)[0]
  kw = dict(slots=N, chunk_rows=2, stream_chunk=3)  # several transfers, padded last ones
  if form == "offloaded_host":
    olib = OffloadedLibrary.from_library(lib, **kw)
  else:
    save_offloaded(lib, folder)
    olib = OffloadedLibrary.open(folder, **kw)
  return remove_shared(olib, removal)[0]


@functools.partial(jax.jit, static_argnames=("module",))
def _route(lib, x, layer, *, module):
  return lib.route(module, x, lib.at_layer(layer))


def _inputs(seed):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, N), bool)
  mask[rng.random(B) < 0.4, 0] = False
  mask[2::3, 3] = False
  span = rng.random((B, 5)) < 0.7
  span[:, 0] = True
  xs = {m: rng.normal(size=(B, 6, CFG.module_shapes()[m][1])).astype(np.float32) for m in MODULES}
  return mask, span, xs


def _references(removal, module, layer):
  if removal == "none":
    return ref.ref_module(ADAPTERS, CFG, module, layer)
  w = ref_directions(ADAPTERS, module, layer, "top", 1, np.ones(N, bool))
  return ref_shared_module(ADAPTERS, CFG, module, layer, w)


def _ref_state(want, previous=None):
  """Each row's request-level state from the reference's resolving pass (as
  request.resolve_state defines it, for one layer and module): after the first pass
  with the two-round votes' finalists; after their second round (``previous``: the
  first state) with their winners, every other row as before."""
  K, M = request.state_dims(SPECS, N)
  F = request.finalist_width(SPECS, N)
  if previous is not None:
    out = {key: previous[key].copy() for key in ("cand", "ids", "weights")}
    for b, spec in enumerate(SPECS):
      if spec.two_rounds:
        out["ids"][b], out["weights"][b] = rr.top_m(want[b]["votes"], spec.vote_top_m, M)
    return out
  cand = np.full((B, K), -1)
  ids, weights = np.full((B, M), -1), np.zeros((B, M))
  finalists = np.full((B, F), -1)
  for b, spec in enumerate(SPECS):
    if want[b]["cand"] is not None:
      cand[b, : len(want[b]["cand"])] = want[b]["cand"]
    if spec.votes:
      ids[b], weights[b] = rr.top_m(want[b]["votes"], min(spec.vote_top_m, N), M)
    if spec.two_rounds:
      finalists[b] = rr.top_m(want[b]["votes"], spec.vote_finalists, F)[0]
  return {"cand": cand, "ids": ids, "weights": weights, "finalists": finalists}


def _with_state(base, resolved, module):
  """``base`` with one layer and module's resolved state broadcast over the layers."""
  fields = {
    key: getattr(resolved, key)
    for key in ("cand", "ids", "weights", "finalists")
    if getattr(resolved, key) is not None
  }
  return base.replace(
    state=RequestState(
      **{
        key: {module: jnp.broadcast_to(v[module], (L, *v[module].shape[1:]))}
        for key, v in fields.items()
      }
    )
  )


def _check(got, want, where, phase):
  d, c = np.asarray(got[0]), np.asarray(got[1])
  for b, spec in enumerate(SPECS):
    w = want[b]
    at = f"{where} {phase} row {b} {spec}"
    assert w["tie"] > 1e-5 and w["gate_gap"] > 1e-5, f"near tie in the test data: {at}"
    np.testing.assert_array_equal(c[b], w["chosen"], err_msg=at)
    np.testing.assert_allclose(d[b], w["delta"], atol=ATOL, rtol=0, err_msg=at)


@pytest.mark.parametrize("removal", ["none", "top:1"])
@pytest.mark.parametrize("form", FORMS)
def test_every_router_on_every_form_matches_the_brute_force(form, removal, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("lib")) if form == "offloaded_files" else None
  lib = form_library(form, removal, folder)
  router_index = np.arange(B)
  mask, span, xs = _inputs(seed=7)
  base = routed(lib, B, SPECS, mask=mask, fixed_ids=FIXED, router_index=router_index, span=span)
  choices = 0
  for module in MODULES:
    x = xs[module]
    for layer in range(L):
      where = f"{form} {removal} {module} layer {layer}"
      refs = _references(removal, module, layer)
      x64 = x.astype(np.float64)

      def want_of(t0, t1, state, refs=refs, x64=x64, layer=layer):
        return [
          ref_route_request(
            SPECS[b],
            x64[b, t0:t1],
            refs,
            mask[b],
            layer,
            span[b, t0:t1] if state is None or "finalists" in state else None,
            None if state is None else {k: v[b] for k, v in state.items()},
            FIXED[b],
          )
          for b in range(B)
        ]

      # 1. The resolving prefill: per-token decisions, votes, request_lag's candidates.
      got = _route(base, jnp.asarray(x[:, :5]), jnp.int32(layer), module=module)
      want = want_of(0, 5, None)
      _check(got, want, where, "resolving prefill")
      stats = jax.tree.map(np.asarray, got[2])
      state = _ref_state(want)
      for b, spec in enumerate(SPECS):
        if spec.name == "request_lag":
          np.testing.assert_array_equal(stats["cand"][b], state["cand"][b], err_msg=where)
        if spec.votes:
          np.testing.assert_allclose(stats["votes"][b, :N], want[b]["votes"], atol=1e-5)
      resolved = request.resolve_state(
        SPECS,
        router_index,
        {module: {k: v[None] for k, v in stats.items()}},
        stats["votes"].shape[1],
      )
      for key in ("cand", "ids", "finalists"):
        np.testing.assert_array_equal(np.asarray(getattr(resolved, key)[module][0]), state[key])
      # 2. The two-round votes' second round: their votes among their finalists; the
      # other rows apply their state.
      round2 = _with_state(base, resolved, module)
      assert round2.resolving
      got = _route(round2, jnp.asarray(x[:, :5]), jnp.int32(layer), module=module)
      want = want_of(0, 5, state)
      _check(got, want, where, "second round")
      stats = jax.tree.map(np.asarray, got[2])
      for b, spec in enumerate(SPECS):
        if spec.two_rounds:
          np.testing.assert_allclose(stats["votes"][b, :N], want[b]["votes"], atol=1e-5)
          assert set(np.flatnonzero(want[b]["votes"])) <= set(state["finalists"][b])
      resolved = request.resolve_state(
        SPECS,
        router_index,
        {module: {k: v[None] for k, v in stats.items()}},
        stats["votes"].shape[1],
        previous=resolved,
      )
      state = _ref_state(want, previous=state)
      assert resolved.finalists is None
      for key in ("cand", "ids"):
        np.testing.assert_array_equal(np.asarray(getattr(resolved, key)[module][0]), state[key])
      # 3. Prefill and a decode step with the final state (as generate's later passes).
      lib_state = _with_state(base, resolved, module)
      assert not lib_state.resolving
      got = _route(lib_state, jnp.asarray(x[:, :5]), jnp.int32(layer), module=module)
      _check(got, want_of(0, 5, state), where, "prefill")
      got = _route(lib_state, jnp.asarray(x[:, 5:]), jnp.int32(layer), module=module)
      _check(got, want_of(5, 6, state), where, "decode")
      choices += int((np.asarray(got[1]) >= 0).sum())
  assert choices > B  # most rows choose something: the comparison is not vacuous


def test_arrows_read_in_place_from_the_stack_equal_the_scanned_slice():
  """core.stacked_arrow_dots (each layer's arrows read in chunks from the [L, I, N]
  stack, the CPU path of a library held whole) equals the dot with the sliced layer."""
  import jax.numpy as jnp
  import numpy as np

  from lag_jax.routing.core import stacked_arrow_dots

  rng = np.random.default_rng(0)
  arrows = rng.standard_normal((3, 96, 37)).astype(np.float32)  # I = 96: chunks of 96, 32
  x = rng.standard_normal((2, 4, 96)).astype(np.float32)
  for rows in (192, 32, 7):  # 7: the largest divisor of 96 below it, 6
    for layer in range(3):
      got = stacked_arrow_dots(jnp.asarray(x), jnp.asarray(arrows), jnp.int32(layer), rows)
      want = np.einsum("bti,in->btn", x, arrows[layer])
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
