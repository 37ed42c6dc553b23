"""Request-level routing beyond the paper (vote, request_lag, confidence gating): every
router against a brute-force float64 reference (tests/request_reference.py) at one
module and inside the model, vote = the fixed winner through generate (a consistent
cache), request_lag's decode on the prefill's candidates, mixed batches with
per-request masks equal to requests alone, no recompilation when rows switch routers,
spans, and bad input."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import request as rr
from reference import routing as ref
from reference.request import ref_route_request

from lag_jax.adapters import LoraAdapter
from lag_jax.errors import ConfigError
from lag_jax.generation.generate import TRACE_COUNTS, generate
from lag_jax.model.transformer import MLP_MODULES, CausalLM
from lag_jax.routing import request, spans
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.routers import LayerLibrary, RouterSpec, route
from lag_jax.testing import tiny_config
from lag_jax.testing.libraries import forward, random_adapter

ATOL = 1e-4
CFG = tiny_config()  # hidden 64, intermediate 128, 2 layers
L = CFG.num_hidden_layers
N = 7


def make_adapter(name, r, seed, layers=None, shared_dirs=None) -> LoraAdapter:
  """Random factors on the MLP (``testing.libraries.random_adapter``)."""
  return random_adapter(CFG, name, r, MLP_MODULES, seed, layers=layers, shared_dirs=shared_dirs)


# Adapter 5 covers layer 1 only (invalid at layer 0: never chosen there).
ADAPTERS = [
  make_adapter(f"k{i}", r, 10 + i, layers=[1] if i == 5 else None)
  for i, r in enumerate([2, 4, 6, 3, 5, 4, 3])
]


@functools.cache
def library() -> AdapterLibrary:
  return AdapterLibrary.from_adapters(ADAPTERS, CFG)


def layer_lib(module: str, layer: int) -> LayerLibrary:
  return LayerLibrary.of(library().weights, module, layer)


def refs(module, layer):
  return ref.ref_module(ADAPTERS, CFG, module, layer)


def ref_batch(specs, router_index, x, module, layer, mask, span, state, fixed=None):
  """ref_route_request over a batch x [B, T, I]; state: dict of [B, ...] arrays or None."""
  lib = refs(module, layer)
  B = x.shape[0]
  rows = []
  for b in range(B):
    st = None if state is None else {key: np.asarray(v)[b] for key, v in state.items()}
    rows.append(
      ref_route_request(
        specs[router_index[b]],
        np.asarray(x[b], np.float64),
        lib,
        mask[b],
        layer,
        span[b],
        st,
        -1 if fixed is None else fixed[b],
      )
    )
  return rows


def lib_arrays(lib: LayerLibrary):
  return (lib.a, lib.b, lib.arrows, lib.valid)


@functools.partial(jax.jit, static_argnums=0)
def _route_batch_request(specs, router_index, x, lib_arrays, *args):
  return request.route_batch_request(specs, router_index, x, LayerLibrary(*lib_arrays), *args)


def run_request(specs, router_index, x, module, layer, mask, span, state, fixed=None):
  """Ours, jitted (one compile per routers and shapes: cheaper here than op by op)."""
  B = x.shape[0]
  fixed = np.full(B, -1) if fixed is None else fixed
  d, c, stats = _route_batch_request(
    specs,
    jnp.asarray(router_index, jnp.int32),
    jnp.asarray(x, jnp.float32),
    lib_arrays(layer_lib(module, layer)),
    jnp.asarray(mask),
    jnp.asarray(fixed, jnp.int32),
    jnp.asarray(layer, jnp.int32),
    None if span is None else jnp.asarray(span),
    None if state is None else {k: jnp.asarray(v) for k, v in state.items()},
  )
  return np.asarray(d), np.asarray(c), None if stats is None else jax.tree.map(np.asarray, stats)


def inputs(B, T, seed):
  rng = np.random.default_rng(seed)
  xs = {
    m: rng.normal(size=(B, T, CFG.module_shapes()[m][1])).astype(np.float32)
    for m in ("gate_proj", "down_proj")
  }
  mask = np.ones((B, N), bool)
  mask[1] = [True, False, True, True, False, True, False]
  mask[2] = False
  mask[2, [4, 5]] = True  # 5 lacks layer 0: one usable adapter there
  span = rng.random((B, T)) < 0.6
  span[:, 0] = True
  return xs, mask, span


# --- 1. One layer and module against the reference ----------------------------------

RESOLVE_SPECS = (
  RouterSpec("vote", k=3),
  RouterSpec("vote", k=2, vote_score="score", vote_layers=(1,)),
  RouterSpec("request_lag", k=3),
  RouterSpec("lag", k=3, gate=0.2, gate_fallback="none", layers=(1,)),
  RouterSpec("lag", k=3),
  RouterSpec("fixed"),
  RouterSpec("request_lag", k=2, gate=0.1),  # votes first: ungated, tallied
  RouterSpec("lag", k=1, gate=0.3, gate_fallback="none"),
  RouterSpec("vote", k=3, vote_score="margin"),
  RouterSpec("vote", k=1, vote_score="margin"),  # k = 1: the arrow scores' margin
)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [6, 2, 0, 9, 7, 1, 8, 3, 4, 5]])
def test_resolving_pass_matches_reference(rows):
  """The first pass: votes over the span, request_lag's pooled candidates and the
  per-token decisions of every router, rows with their own masks."""
  B, T = len(rows), 6
  xs, mask, span = inputs(B, T, seed=1)
  fixed = np.array([0, 1, 2, 3, 4, 6, 5, 1, 2, 3])
  K, _ = request.state_dims(RESOLVE_SPECS, N)
  for module, x in xs.items():
    for layer in range(L):
      d, c, stats = run_request(RESOLVE_SPECS, rows, x, module, layer, mask, span, None, fixed)
      want = ref_batch(RESOLVE_SPECS, rows, x, module, layer, mask, span, None, fixed)
      where = f"{module} layer {layer}"
      for b, w in enumerate(want):
        assert w["tie"] > 1e-5 and w["gate_gap"] > 1e-4, f"near tie in test data {where}"
        np.testing.assert_array_equal(c[b], w["chosen"], err_msg=f"{where} row {b}")
        np.testing.assert_allclose(d[b], w["delta"], atol=ATOL, rtol=0, err_msg=f"{where} {b}")
        votes = np.zeros(N) if w["votes"] is None else w["votes"]
        np.testing.assert_allclose(stats["votes"][b], votes, atol=1e-5, err_msg=f"{where} {b}")
        cand = [-1] * K if w["cand"] is None else list(w["cand"]) + [-1] * (K - len(w["cand"]))
        np.testing.assert_array_equal(stats["cand"][b], cand, err_msg=f"{where} row {b}")
        usable = np.flatnonzero(mask[b] & np.asarray(library().weights.valid[module][layer]))
        assert np.isin(c[b][c[b] >= 0], usable).all()  # masks are obeyed
      # Not vacuous: votes count something, gates fire and do not always fire.
      assert stats["votes"].sum() > 0


APPLY_SPECS = (
  RouterSpec("vote", k=3, vote_top_m=2),
  RouterSpec("request_lag", k=3),
  RouterSpec("lag", k=3, gate=0.15),
  RouterSpec("request_lag", k=2, gate=0.1, layers=(0,)),
  RouterSpec("lag", k=2, gate_fallback="none", layers=(1,)),
  RouterSpec("arrow"),
  RouterSpec("vote", k=3),
)


def test_applying_state_matches_reference(T=5):
  """With the request-level state fixed (pass 2 and decode): vote mixtures (top 2),
  request_lag among stored candidates (some of them masked out), gates falling back
  to the vote or to nothing, per-layer switches."""
  B = 7
  xs, mask, _ = inputs(B, T, seed=4)
  rng = np.random.default_rng(5)
  K, M = request.state_dims(APPLY_SPECS, N)
  assert (K, M) == (3, 2)
  fired = 0
  for module, x in xs.items():
    for layer in range(L):
      cand = np.stack([rng.permutation(N)[:K] for _ in range(B)]).astype(np.int32)
      cand[0, 2] = -1
      ids = np.stack([rng.permutation(N)[:M] for _ in range(B)]).astype(np.int32)
      ids[3, 1] = -1
      w = rng.random((B, M)).astype(np.float32)
      w[3, 1] = 0
      w /= w.sum(1, keepdims=True)
      state = dict(cand=cand, ids=ids, weights=w)
      rows = np.arange(B)
      d, c, stats = run_request(APPLY_SPECS, rows, x, module, layer, mask, None, state)
      assert stats is None
      want = ref_batch(APPLY_SPECS, rows, x, module, layer, mask, np.ones((B, T), bool), state)
      where = f"{module} layer {layer}"
      for b, wt in enumerate(want):
        assert wt["tie"] > 1e-5 and wt["gate_gap"] > 1e-4, f"near tie in test data {where}"
        np.testing.assert_array_equal(c[b], wt["chosen"], err_msg=f"{where} row {b}")
        np.testing.assert_allclose(d[b], wt["delta"], atol=ATOL, rtol=0, err_msg=f"{where} {b}")
      # The gated lag row (2) both routes and falls back somewhere.
      lag_d, lag_c = route(
        RouterSpec("lag", k=3),
        jnp.asarray(x),
        layer_lib(module, layer),
        jnp.asarray(mask),
        jnp.zeros(B, jnp.int32),
      )
      fired += int((np.asarray(lag_c)[2] != c[2]).sum())
  assert fired > 0


def test_request_lag_extremes():
  """request_lag with k >= N is per-token SpectR; with k = 1 one adapter per request,
  layer and module (the top pooled one) on every token."""
  xs, mask, span = inputs(3, 6, seed=7)
  for module, x in xs.items():
    for layer in range(L):
      llib = layer_lib(module, layer)
      _, c_all, _ = run_request(
        (RouterSpec("request_lag", k=50),), [0, 0, 0], x, module, layer, mask, span, None
      )
      _, c_sp = route(
        RouterSpec("spectr"), jnp.asarray(x), llib, jnp.asarray(mask), jnp.zeros(3, jnp.int32)
      )
      np.testing.assert_array_equal(c_all, np.asarray(c_sp))
      _, c_one, stats = run_request(
        (RouterSpec("request_lag", k=1),), [0, 0, 0], x, module, layer, mask, span, None
      )
      np.testing.assert_array_equal(c_one, np.broadcast_to(stats["cand"], c_one.shape))


@pytest.mark.parametrize("scope", ["all", "module"])
def test_resolve_state_matches_reference(scope):
  """Winners from the stacked votes: ties to the lower id, top m by vote share, no
  adapter where nothing was voted for, each row by its own router."""
  B = 4
  specs = (
    RouterSpec("vote", vote_scope=scope),
    RouterSpec("vote", vote_scope=scope, vote_top_m=3),
    RouterSpec("lag"),
  )
  rng = np.random.default_rng(0)
  modules = ("gate_proj", "up_proj")
  stats = {
    m: {
      "votes": rng.integers(0, 3, (L, B, N)).astype(np.float32),
      "cand": np.full((L, B, 1), -1, np.int32),
    }
    for m in modules
  }
  stats["gate_proj"]["votes"][:, 3] = 0
  stats["up_proj"]["votes"][:, 3] = 0  # row 3: no votes at all
  router_index = np.array([0, 1, 0, 1])
  st = request.resolve_state(specs, jnp.asarray(router_index), jax.tree.map(jnp.asarray, stats), N)
  for m in modules:
    for layer in range(L):
      for b in range(B):
        spec = specs[router_index[b]]
        v = (
          sum(stats[mm]["votes"][ll, b] for mm in modules for ll in range(L))
          if scope == "all"
          else stats[m]["votes"][layer, b]
        )
        ids, w = rr.top_m(v, spec.vote_top_m, 3)
        np.testing.assert_array_equal(np.asarray(st.ids[m])[layer, b], ids)
        np.testing.assert_allclose(np.asarray(st.weights[m])[layer, b], w, atol=1e-6)
  assert (np.asarray(st.ids["gate_proj"])[:, 3] == -1).all()


# --- 2. Inside the model: both passes against a reference hook ------------------------


@jax.tree_util.register_pytree_node_class
class RequestReferenceHook:
  """Routes every module with ref_route_request (float64 numpy, via pure_callback).

  Resolving (state None, or a two-round vote's finalists) it records each request's
  votes and candidates per layer and module in ``self.stats``; ``self.tie`` /
  ``self.gate_gap`` keep the closest calls."""

  def __init__(self, specs, router_index, mask, span, state=None):
    self.specs, self.router_index, self.mask, self.span = specs, router_index, mask, span
    self.state = state  # module -> dict(cand/ids/weights [L, B, ...]) or None
    self.stats: dict = {}
    self.tie = self.gate_gap = math.inf

  def tree_flatten(self):
    return (), self

  @classmethod
  def tree_unflatten(cls, aux, children):
    return aux

  def per_layer(self):
    return jnp.arange(L)

  def delta(self, layer, name, x):
    if name not in MLP_MODULES:
      return None, None
    B, T, _ = x.shape
    O = CFG.module_shapes()[name][0]

    def callback(layer, x):
      layer = int(layer)
      st = None
      if self.state is not None:
        st = {k: v[layer] for k, v in self.state[name].items()}
      rows = ref_batch(
        self.specs,
        self.router_index,
        np.asarray(x, np.float64),
        name,
        layer,
        self.mask,
        self.span,
        st,
      )
      self.tie = min([self.tie] + [r["tie"] for r in rows])
      self.gate_gap = min([self.gate_gap] + [r["gate_gap"] for r in rows])
      if st is None or "finalists" in st:  # a resolving pass (either round of a vote)
        self.stats[(name, layer)] = rows
      return (
        np.stack([r["delta"] for r in rows]).astype(np.float32),
        np.stack([r["chosen"] for r in rows]).astype(np.int32),
      )

    shapes = (jax.ShapeDtypeStruct((B, T, O), jnp.float32), jax.ShapeDtypeStruct((B, T), jnp.int32))
    d, c = jax.pure_callback(callback, shapes, layer, x)
    return d, (c,)


@pytest.fixture(scope="module")
def model():
  m = CausalLM(CFG, rngs=nnx.Rngs(0))
  m.model.embed_tokens.weight[...] = m.model.embed_tokens.weight[...] * 10  # sharper logits
  return m


MODEL_SPECS = (
  RouterSpec("vote", k=3),
  RouterSpec("vote", k=2, vote_score="score", vote_scope="module", vote_top_m=2),
  RouterSpec("request_lag", k=3),
  RouterSpec("lag", k=3, gate=0.1, layers=(1,)),
)


def ref_state(hook_ref, specs, router_index, B):
  """The reference RequestState from a resolving reference pass's recorded stats."""
  K, M = request.state_dims(specs, N)
  out = {
    m: dict(cand=np.full((L, B, K), -1), ids=np.full((L, B, M), -1), weights=np.zeros((L, B, M)))
    for m in MLP_MODULES
  }
  for b in range(B):
    spec = specs[router_index[b]]
    for m in MLP_MODULES:
      for layer in range(L):
        c = hook_ref.stats[(m, layer)][b]["cand"]
        if c is not None:
          out[m]["cand"][layer, b, : len(c)] = c
    if not spec.votes:
      continue
    for m in MLP_MODULES:
      for layer in range(L):
        if spec.vote_scope == "all":
          v = sum(hook_ref.stats[(mm, ll)][b]["votes"] for mm in MLP_MODULES for ll in range(L))
        else:
          v = hook_ref.stats[(m, layer)][b]["votes"]
        out[m]["ids"][layer, b], out[m]["weights"][layer, b] = rr.top_m(v, spec.vote_top_m, M)
  return out


def test_model_passes_match_reference(model):
  """Pass 1 (resolving: per-token routing, votes over each request's span, pooled
  candidates) and pass 2 (the state applied) of a mixed batch through the model."""
  B, T = 5, 7
  rng = np.random.default_rng(11)
  tokens = rng.integers(0, 256, (B, T))
  router_index = np.array([0, 1, 2, 3, 2])
  mask = np.ones((B, N), bool)
  mask[1, [0, 3]] = False
  mask[2, [1, 2]] = False
  mask[3, 6] = False
  mask[4] = False
  mask[4, [2, 5]] = True
  span = rng.random((B, T)) < 0.7
  span[:, 2] = True
  hook = RoutedAdapters(
    (routed(library(), B, MODEL_SPECS, mask=mask, router_index=router_index, span=span),)
  )
  assert hook.request_passes == 2
  logits, _, aux = forward(model, tokens, hook)
  telemetry, (state,) = hook.split_aux(aux)
  hook_ref = RequestReferenceHook(MODEL_SPECS, router_index, mask, span)
  logits_ref, _, aux_ref = forward(model, tokens, hook_ref)
  assert hook_ref.tie > 1e-5 and hook_ref.gate_gap > 1e-4, "near tie in the test data"
  np.testing.assert_allclose(logits, logits_ref, atol=ATOL, rtol=0)
  for m in MLP_MODULES:
    np.testing.assert_array_equal(np.asarray(telemetry[m][0]), np.asarray(aux_ref[m][0]))
  want = ref_state(hook_ref, MODEL_SPECS, router_index, B)
  for m in MLP_MODULES:
    np.testing.assert_array_equal(np.asarray(state.cand[m]), want[m]["cand"], err_msg=m)
    np.testing.assert_array_equal(np.asarray(state.ids[m]), want[m]["ids"], err_msg=m)
    np.testing.assert_allclose(np.asarray(state.weights[m]), want[m]["weights"], atol=1e-5)
  # Pass 2: the state applied, against the reference applying the same state.
  applied = hook.with_request_state((state,))
  assert applied.request_passes == 0
  logits2, _, aux2 = forward(model, tokens, applied)
  st_np = {
    m: {k: np.asarray(getattr(state, k)[m]) for k in ("cand", "ids", "weights")}
    for m in MLP_MODULES
  }
  hook_ref2 = RequestReferenceHook(MODEL_SPECS, router_index, mask, span, st_np)
  logits2_ref, _, aux2_ref = forward(model, tokens, hook_ref2)
  assert hook_ref2.tie > 1e-5 and hook_ref2.gate_gap > 1e-4, "near tie in the test data"
  np.testing.assert_allclose(logits2, logits2_ref, atol=ATOL, rtol=0)
  for m in MLP_MODULES:
    np.testing.assert_array_equal(np.asarray(aux2[m][0]), np.asarray(aux2_ref[m][0]))
  ids2 = np.asarray(aux2["gate_proj"][0])  # [L, B, T]
  assert (ids2[:, 0] == ids2[:, 0, :1]).all()  # a vote row: one adapter per layer
  assert len(np.unique(ids2[:, 0])) == 1  # scope 'all': the same one in every layer
  assert not np.array_equal(logits, logits2)  # the passes differ for voting rows


# --- 3. Through generate -------------------------------------------------------------
# Every test here runs the same tuple of routers on 4 prompts (rows pick theirs by
# router_index), so they share one compiled resolving prefill, prefill and decode.

PROMPTS = [
  list(np.random.default_rng(s).integers(0, 256, n)) for s, n in ((1, 9), (2, 6), (3, 12), (4, 7))
]
B_GEN = len(PROMPTS)
MIXED = (
  RouterSpec("vote", k=3),
  RouterSpec("request_lag", k=2),
  RouterSpec("lag", k=3),
  RouterSpec("fixed"),
  RouterSpec("none"),
  RouterSpec("lag", k=3, gate=0.1),
)


def mixed_hook(router_index, rows=None, mask=None, fixed=None, span=None):
  rows = list(range(B_GEN)) if rows is None else rows
  mask = np.ones((B_GEN, N), bool) if mask is None else mask
  fixed = np.full(B_GEN, -1) if fixed is None else np.asarray(fixed)
  span = [np.ones(len(p), bool) for p in PROMPTS] if span is None else span
  return RoutedAdapters(
    (
      routed(
        library(),
        len(rows),
        MIXED,
        mask=mask[rows],
        fixed_ids=fixed[rows],
        router_index=np.asarray(router_index)[rows],
        span=[span[r] for r in rows],
      ),
    )
  )


def gen(model, hook, rows=None):
  prompts = PROMPTS if rows is None else [PROMPTS[r] for r in rows]
  return generate(
    model, prompts, max_new_tokens=4, lora=hook, return_logits=True, return_routing=True
  )


def test_vote_equals_the_fixed_winner(model):
  """Pass 2 re-prefills with the winner: tokens, logits and cache are those of the
  fixed router with the winner (one LoRA per request), bit for bit."""
  span = [np.arange(len(p)) >= 2 for p in PROMPTS]
  out = gen(model, mixed_hook([0] * B_GEN, span=span))
  assert out.prefill_passes == 2
  ids = out.routing["up_proj"][0]  # [B, L, S]
  winners = [int(ids[b, 1, 0]) for b in range(B_GEN)]  # layer 1: every adapter covers it
  for b, p in enumerate(PROMPTS):
    seen = ids[b, :, : len(p) + len(out.tokens[b]) - 1]
    assert (seen[1] == winners[b]).all()
    assert (seen[0] == (winners[b] if winners[b] != 5 else -1)).all()
  fixed = gen(model, mixed_hook([3] * B_GEN, fixed=winners))
  assert out.tokens == fixed.tokens
  for a, b in zip(out.logits, fixed.logits, strict=True):
    np.testing.assert_array_equal(a, b)
  assert len(set(winners)) > 1  # not one adapter for everyone
  # The span decides: the vote over the first token alone is that token's majority.
  first = [np.arange(len(p)) == 0 for p in PROMPTS]
  one = gen(model, mixed_hook([0] * B_GEN, span=first))
  assert [int(one.routing["up_proj"][0][b, 1, 0]) for b in range(B_GEN)] != winners


def test_request_lag_decodes_on_the_prefill_candidates(model):
  """Decode reranks among the candidates the prompt chose: generated logits equal a
  cache-free pass over prompt + new tokens whose span is the prompt."""
  out = gen(model, mixed_hook([1] * B_GEN))
  full = [p + t[:-1] for p, t in zip(PROMPTS, out.tokens, strict=True)]
  T = max(len(f) for f in full)
  tokens = np.stack([np.pad(f, (0, T - len(f))) for f in full])  # causal: end padding is inert
  hook = RoutedAdapters(
    (
      routed(
        library(),
        B_GEN,
        MIXED,
        router_index=[1] * B_GEN,
        span=[np.arange(T) < len(p) for p in PROMPTS],
      ),
    )
  )
  logits, _, aux = forward(model, tokens, hook)
  telemetry, (state,) = hook.split_aux(aux)
  for b, p in enumerate(PROMPTS):
    n, m_ = len(p), len(full[b])
    np.testing.assert_allclose(out.logits[b], logits[b, n - 1 : m_], atol=1e-4, rtol=0)
    for m in MLP_MODULES:
      got = out.routing[m][0][b, :, :m_]
      np.testing.assert_array_equal(got, np.asarray(telemetry[m][0])[:, b, :m_])
      for layer in range(L):  # only the request's 2 candidates appear
        assert set(np.unique(got[layer])) <= set(np.asarray(state.cand[m])[layer, b].tolist())
  assert len(np.unique(out.routing["gate_proj"][0][0])) > 2  # per-token choices, -1 included


def test_mixed_batch_rows_are_independent_and_do_not_recompile(model):
  """Rows with vote, request_lag, gated lag and fixed, each with its own mask and
  span, in one batch: each row's result is its own whatever the order of the batch
  (rows do not see each other's state); switching the rows' routers (lag, none ...),
  masks, spans and fixed ids recompiles nothing. (A mixed batch against the float64
  reference: test_model_passes_match_reference.)"""
  mask = np.ones((B_GEN, N), bool)
  mask[0, [1, 2]] = False
  mask[1, 4] = False
  mask[3] = False
  mask[3, [0, 6]] = True
  fixed = np.array([-1, -1, 2, 6])
  span = [np.arange(len(p)) % 2 == 0 for p in PROMPTS]
  router_index = np.array([0, 1, 5, 3])
  out = gen(model, mixed_hook(router_index, mask=mask, fixed=fixed, span=span))
  assert out.prefill_passes == 2
  before = dict(TRACE_COUNTS)
  order = [2, 0, 3, 1]
  perm = gen(model, mixed_hook(router_index, order, mask, fixed, span), order)
  for j, b in enumerate(order):
    assert perm.tokens[j] == out.tokens[b], b
    np.testing.assert_allclose(perm.logits[j], out.logits[b], atol=1e-5, rtol=0)
  ids = out.routing["gate_proj"][0]
  for b in range(B_GEN):
    seen = ids[b][ids[b] >= 0]
    assert mask[b, seen].all()  # masks are obeyed
  assert (ids[3, :, : len(PROMPTS[3])] == 6).all()  # fixed
  # Other routers per row, masks, spans and fixed ids: no new compilation.
  rng = np.random.default_rng(0)
  results = []
  for router_index in ([4, 2, 0, 1], [1, 0, 3, 5], [5, 3, 2, 0]):
    m = rng.random((B_GEN, N)) < 0.7
    m[:, 0] = True
    sp = [rng.random(len(p)) < 0.5 for p in PROMPTS]
    for s_ in sp:
      s_[0] = True
    results.append(
      gen(model, mixed_hook(router_index, None, m, rng.integers(-1, N, B_GEN), sp)).tokens
    )
  assert dict(TRACE_COUNTS) == before, (dict(TRACE_COUNTS), before)
  assert results[0] != results[1] != results[2]


# --- 4. Spans, the paper's router untouched, bad input --------------------------------


def test_spans_from_character_offsets():
  from lag_jax.testing import tiny_checkpoint
  from lag_jax.text.tokenizer import Tokenizer

  tok = Tokenizer.from_dir(tiny_checkpoint())
  text, ids, mask = spans.user_turn_span(tok, "Who is Ada Blum?", "Be brief.")
  assert ids == tok.encode(text) and mask.shape == (len(ids),)
  # The byte tokenizer: one token per byte of the user's message.
  assert mask.sum() == len("Who is Ada Blum?")
  assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Who is Ada Blum?"
  _, ids2, q = spans.user_turn_span(
    tok, "Answer briefly.\n\nQuestion: Who is Ada?", span_text="Who is Ada?"
  )
  assert tok.decode([i for i, m in zip(ids2, q, strict=True) if m]) == "Who is Ada?"
  assert spans.token_mask([(0, 2), (2, 5), (5, 6)], [(3, 4), None]).tolist() == [False, True, False]
  with pytest.raises(ValueError, match="does not occur"):
    spans.text_span(tok, "abc", "xyz")


def test_lag_path_is_unchanged():
  """A library whose routers are all per-token takes the paper's path: the layer scan
  carries its weights and no request-level state. (On CPU a library held whole leaves its
  arrows out of the scan and passes the layer index instead, so that route() reads each
  layer's arrows in place from the stack.)"""
  lib = routed(library(), 2, (RouterSpec("lag", k=3), RouterSpec("arrow")), router_index=[0, 1])
  w, layer, state = lib.per_layer()
  assert not lib.request_level and state is None
  if lib.arrows_in_place:
    assert jax.default_backend() == "cpu"
    assert w.arrows == {} and lib.weights.arrows  # left out of the scan, kept in the library
    for field in ("a", "b", "valid", "shared", "index"):
      assert getattr(w, field) is getattr(lib.weights, field), field
    np.testing.assert_array_equal(layer, np.arange(lib.weights.valid["gate_proj"].shape[0]))
  else:
    assert w is lib.weights and layer is None
  assert RoutedAdapters((lib,)).request_passes == 0
  assert RouterSpec("lag", k=3, vote_top_m=2).request_level is False  # vote options unused


def test_bad_request_routing_inputs():
  with pytest.raises(ValueError, match="gate / layers apply"):
    RouterSpec("arrow", gate=0.1)
  with pytest.raises(ValueError, match="gate must be in"):
    RouterSpec("lag", gate=1.5)
  with pytest.raises(ValueError, match="vote_scope"):
    RouterSpec("vote", vote_scope="token")
  with pytest.raises(ValueError, match="vote_top_m"):
    RouterSpec("vote", vote_top_m=0)
  with pytest.raises(ValueError, match="layer indices"):
    RouterSpec("lag", layers=(-1,))
  assert RouterSpec("lag", layers=[3, 1, 1]).layers == (1, 3)
  with pytest.raises(ValueError, match="request-level state"):
    route(
      RouterSpec("vote"),
      jnp.zeros((1, 1, 64)),
      layer_lib("gate_proj", 0),
      jnp.ones((1, N), bool),
      jnp.zeros(1, jnp.int32),
    )
  with pytest.raises(ValueError, match="outside the library's 2 layers"):
    routed(library(), 1, RouterSpec("lag", gate=0.1, layers=(2,)))
  with pytest.raises(ValueError, match="marks no token"):
    routed(library(), 2, RouterSpec("vote"), span=[[True], [False, False]])
  with pytest.raises(ValueError, match="2 rows for 1"):
    routed(library(), 1, RouterSpec("vote"), span=[[True], [True]])
  hook = RoutedAdapters((routed(library(), 1, RouterSpec("vote"), span=[[False] * 5 + [True]]),))
  with pytest.raises(ValueError, match="no prompt token"):
    hook.for_prompts(np.arange(8)[None] < 3)  # the span lies past the prompt


def test_request_routers_on_a_sharded_library_in_the_model():
  """request_lag on a library sharded over 8 simulated devices, by shard_map and by
  impl='jit' (XLA partitions the one-device routers): the same decisions and state as
  on one device, inside the model."""
  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.model.sharding import mesh_from_sizes
  from lag_jax.routing.sharded import shard_library
  from lag_jax.testing import tiny_checkpoint

  mesh = mesh_from_sizes({"data": 1, "model": 1, "adapter": -1})
  libs = [library()] + [shard_library(library(), mesh, impl=i) for i in ("shard_map", "jit")]
  hooks = [RoutedAdapters((routed(lib, 2, RouterSpec("request_lag", k=2)),)) for lib in libs]
  tokens = np.asarray(PROMPTS[1][:6] + PROMPTS[0][:6]).reshape(2, 6)
  sharded_model = load_model(tiny_checkpoint(), mesh=mesh)
  outs = []
  for hook, m in zip(hooks, (load_model(tiny_checkpoint()), sharded_model, sharded_model)):
    _, _, aux = forward(m, tokens, hook)
    outs.append(hook.split_aux(aux))
  tel1, (st1,) = outs[0]
  for tel8, (st8,) in outs[1:]:
    for m in MLP_MODULES:
      np.testing.assert_array_equal(np.asarray(tel8[m][0]), np.asarray(tel1[m][0]))
      np.testing.assert_array_equal(np.asarray(st8.cand[m]), np.asarray(st1.cand[m]))


# --- 5. The evaluation harness ------------------------------------------------------------


def test_harness_method_names():
  from lag_jax.eval import harness

  m = harness.method_from_name("LAG+gate(k=4;gate=0.2;fallback=none;layers=0-1+5)")
  assert (m.knowledge, m.task, m.k) == ("lag", "lag", 4)
  opts = dict(m.knowledge_options)
  assert opts == {"gate": 0.2, "gate_fallback": "none", "layers": (0, 1, 5)}
  spec = harness.router_spec(m.knowledge, m.k, m.knowledge_options, 30)
  assert spec == RouterSpec("lag", k=4, gate=0.2, gate_fallback="none", layers=(0, 1, 5))
  edges = harness.router_spec("lag", 4, (("layers", "edges"),), 30).layers
  assert edges == tuple(range(10)) + tuple(range(20, 30))
  v = harness.method_from_name("Vote-user(k=8;m=2;score=score)")
  assert v.span == "user" and dict(v.knowledge_options) == {"vote_top_m": 2, "vote_score": "score"}
  assert {b.name.split("(")[0] for b in harness.beyond_methods(4)} == set(harness.BEYOND)
  std = harness.standard_methods(4)
  got = harness.select_methods(std, ["Oracle", "LAG", "Vote", "ReqLAG(k=2)", "RAG"], 4)
  assert [g.name for g in got] == ["Oracle", "LAG(k=4)", "RAG", "Vote(k=4)", "ReqLAG(k=2)"]
  r = harness.method_from_name("R-Vote(k=2)")
  assert (r.knowledge, r.task, r.rag, r.k) == ("none", "vote", True, 2)
  assert harness.method_from_name("P-ReqLAG").knowledge == "prag"
  assert harness.select_methods(std, ["Vote"], 4, retrieval=False)[0].name == "Vote(k=4)"
  # A method this run cannot offer is an error that says why, never a silent skip.
  with pytest.raises(ConfigError, match="needs retrieval"):
    harness.select_methods(std, ["R-Vote", "Vote"], 4, retrieval=False)
  assert harness.method_from_name("Vote-score(k=4;removal=top:4)").removal == "top:4"
  assert harness.method_from_name("Vote(k=4)").removal == ""
  with pytest.raises(ConfigError, match="wide"):
    harness.method_from_name("Vote(removal=wide:2)")
  for bad in ("Vote(q=1)", "Vote(span=all)", "LAG+gate(gate=2)", "Nope(k=1)"):
    with pytest.raises(ValueError):
      harness.method_from_name(bad)


def test_harness_runs_a_vote_method():
  """Vote through run_method on the tiny checkpoint: the question's tokens vote, the
  result reports per-request routing accuracy and the two prefills."""
  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.data.kilt import KiltExample
  from lag_jax.eval import harness
  from lag_jax.testing import tiny_checkpoint
  from lag_jax.text.tokenizer import Tokenizer

  folder = tiny_checkpoint()
  tok = Tokenizer.from_dir(folder)
  examples = [
    KiltExample(f"q{i}", f"Where was k{i} born?", ("Paris",), (f"k{i}",), "qa") for i in range(3)
  ]
  setting = harness.Setting(
    load_model(folder), tok, library(), None, [], max_new_tokens=2, batch_size=4
  )
  method = harness.method_from_name("Vote(k=3)")
  r = harness.run_method(setting, method, examples, [0, 1, 2], None, None)
  assert len(r.predictions) == 3 and r.timing["prefill_passes"] == 2
  assert r.request_routing["total"] == 3
  row = harness.summarize([r], {"qa": "QA"})[method.name]
  assert 0 <= row["routing_request_acc"] <= 1 and row["timing"]["prefill_s"] > 0
  report = dict(
    benchmark="t",
    num_examples=3,
    num_knowledge_adapters=N,
    num_task_adapters=0,
    methods={method.name: row},
  )
  assert "routing acc. (requests)" in harness.markdown_table(report)
  # The question span is the input's characters (byte tokenizer: one token a byte).
  text, q, _ = harness.render_prompt(tok, examples[0])
  enc = tok.backend.encode(text, add_special_tokens=False)
  sp = harness.prompt_spans(text, enc.offsets, q, harness.user_message(examples[0]))
  assert sp["question"].sum() == len(examples[0].input) < sp["user"].sum() < sp["prompt"].sum()


def test_a_method_with_its_own_removal_routes_that_library():
  """Vote(removal=top:1) routes Setting.knowledge_removed['top:1'], exactly as Vote on
  a setting whose library is that one; without it in the setting, a clear error."""
  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.data.kilt import KiltExample
  from lag_jax.eval import harness
  from lag_jax.routing.shared import remove_shared
  from lag_jax.testing import tiny_checkpoint
  from lag_jax.text.tokenizer import Tokenizer

  folder = tiny_checkpoint()
  model, tok = load_model(folder), Tokenizer.from_dir(folder)
  examples = [
    KiltExample(f"q{i}", f"Where was k{i} born?", ("Paris",), (f"k{i}",), "qa") for i in range(3)
  ]
  lib = library()
  removed = remove_shared(lib, "top:1")[0]
  kw = dict(max_new_tokens=2, batch_size=4)
  own = harness.Setting(model, tok, lib, None, [], knowledge_removed={"top:1": removed}, **kw)
  plain = harness.Setting(model, tok, removed, None, [], **kw)
  a = harness.run_method(
    own, harness.method_from_name("Vote(k=3;removal=top:1)"), examples, [0, 1, 2], None, None
  )
  b = harness.run_method(
    plain, harness.method_from_name("Vote(k=3)"), examples, [0, 1, 2], None, None
  )
  assert a.predictions == b.predictions and a.request_routing == b.request_routing
  assert a.routing == b.routing
  with pytest.raises(ValueError, match="no knowledge library with removal 'mean:1'"):
    harness.run_method(
      own, harness.method_from_name("Vote(k=3;removal=mean:1)"), examples, [0, 1, 2], None, None
    )


def test_generate_job_router_config():
  import importlib.util
  import pathlib

  from lag_jax.jobs import generate as gen_job

  path = pathlib.Path(__file__).parents[1] / "configs" / "generate.py"
  spec = importlib.util.spec_from_file_location("generate_config", path)
  gen_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen_config)
  c = gen_config.get_config("tiny_lag")
  c.router, c.gate, c.route_layers, c.vote_layers, c.vote_top_m = "lag", 0.2, "0-1+5", "1", 2
  assert gen_job._router_spec(c, "lag") == RouterSpec(
    "lag", k=3, gate=0.2, layers=(0, 1, 5), vote_layers=(1,), vote_top_m=2
  )
  # Gate and route_layers apply to lag / request_lag only (e.g. not to a fixed task router).
  assert gen_job._router_spec(c, "vote") == RouterSpec("vote", k=3, vote_layers=(1,), vote_top_m=2)
  assert gen_job._layer_list("") is None
