"""Shared-component removal (lag_jax/routing/shared.py) against a dense float64 reference:
the shared directions (mean adapter's right singular vectors; the share-weighted Gram's
eigenvectors), the residual adapters' arrows, every router's choices and deltas with
the directions removed (per token and request level), a planted shared direction that
misroutes until it is removed, the model path, and bad input."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import routing as ref
from reference.request import ref_route_request
from reference.shared import ref_directions, ref_shared_module
from test_routing_beyond import make_adapter

from lag_jax.model.transformer import MLP_MODULES
from lag_jax.routing import request
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.routers import LayerLibrary, RouterSpec, route_batch
from lag_jax.routing.shared import parse_mode, remove_shared
from lag_jax.testing import tiny_config

ATOL = 1e-4
CFG = tiny_config()
L = CFG.num_hidden_layers
N = 7


ADAPTERS = [
  make_adapter(f"k{i}", r, 40 + i, layers=[1] if i == 5 else None)
  for i, r in enumerate([2, 4, 6, 3, 5, 4, 3])
]


@functools.cache
def library() -> AdapterLibrary:
  return AdapterLibrary.from_adapters(ADAPTERS, CFG)


def same_span(got, want, where):
  """Two [I, S] bases span the same space: equal projectors."""
  np.testing.assert_allclose(got @ got.T, want @ want.T, atol=ATOL, err_msg=where)


# --- 1. Directions and arrows -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["mean:1", "mean:2", "top:1", "top:3"])
def test_directions_and_arrows_match_dense_reference(spec):
  mode, count = parse_mode(spec)
  among = np.array([True, True, False, True, True, True, True])  # adapter 2 left out
  lib, report = remove_shared(library(), spec, among=among)
  w = lib.weights
  for m in MLP_MODULES:
    assert w.shared[m].shape == (L, CFG.module_shapes()[m][1], count)
    assert report.leading[m].shape[0] == L
    for layer in range(L):
      where = f"{spec} {m} layer {layer}"
      want = ref_directions(ADAPTERS, m, layer, mode, count, among)
      got = np.asarray(w.shared[m][layer], np.float64)
      same_span(got, want, where)
      refs = ref_shared_module(ADAPTERS, CFG, m, layer, want)
      for i, r in enumerate(refs):
        arrow = np.asarray(w.arrows[m][layer][:, i], np.float64)
        if not r.valid:
          continue
        assert abs(abs(arrow @ r.arrow) - 1.0) < ATOL, f"{where} adapter {i}"
        assert np.abs(arrow @ got).max() < ATOL  # the arrow lies outside W
  # What is applied is untouched; what is not derived is the same array.
  for m in MLP_MODULES:
    assert lib.weights.a[m] is library().weights.a[m]
    assert lib.weights.b[m] is library().weights.b[m]


# --- 2. Routers with the directions removed ---------------------------------------------

SPECS = (
  RouterSpec("lag", k=3),
  RouterSpec("arrow"),
  RouterSpec("spectr"),
  RouterSpec("arrow_softmax", k=3),
  RouterSpec("lag", k=2, projection="dense"),
  RouterSpec("lag", k=3, projection="gather"),
)


def layer_lib(lib, module, layer) -> LayerLibrary:
  return LayerLibrary.of(lib.weights, module, layer)


def fields(lib: LayerLibrary):
  return dataclasses.astuple(lib)


@functools.partial(jax.jit, static_argnums=0)
def _route(specs, router_index, x, lib_fields, mask, fixed):
  return route_batch(specs, router_index, x, LayerLibrary(*lib_fields), mask, fixed)


@pytest.mark.parametrize("spec", ["mean:1", "top:2"])
def test_per_token_routers_match_reference(spec):
  lib, _ = remove_shared(library(), spec)
  mode, count = parse_mode(spec)
  rng = np.random.default_rng(3)
  B, T = len(SPECS), 5
  rows = np.arange(B)
  mask = np.ones((B, N), bool)
  mask[1, [0, 3]] = False
  fixed = np.full(B, -1)
  changed = 0
  for m in ("gate_proj", "down_proj"):
    x = rng.normal(size=(B, T, CFG.module_shapes()[m][1])).astype(np.float32)
    for layer in range(L):
      where = f"{spec} {m} layer {layer}"
      w = ref_directions(ADAPTERS, m, layer, mode, count, np.ones(N, bool))
      refs = ref_shared_module(ADAPTERS, CFG, m, layer, w)
      want_d, want_c, margin = ref.route_batch(SPECS, rows, x.astype(np.float64), refs, mask, fixed)
      assert margin > 1e-5, f"near tie in test data {where}"
      d, c = _route(
        SPECS, jnp.asarray(rows), jnp.asarray(x), fields(layer_lib(lib, m, layer)), mask, fixed
      )
      np.testing.assert_array_equal(np.asarray(c), want_c, err_msg=where)
      np.testing.assert_allclose(np.asarray(d), want_d, atol=ATOL, rtol=0, err_msg=where)
      _, plain_c, _ = ref.route_batch(
        SPECS, rows, x.astype(np.float64), ref.ref_module(ADAPTERS, CFG, m, layer), mask, fixed
      )
      changed += int((plain_c != want_c).sum())
  assert changed > 0  # the removal changes some choices: the comparison is not vacuous


@functools.partial(jax.jit, static_argnums=0)
def _request(specs, router_index, x, lib_fields, mask, fixed, layer, span):
  lib = LayerLibrary(*lib_fields)
  return request.route_batch_request(specs, router_index, x, lib, mask, fixed, layer, span, None)


def test_request_routers_match_reference():
  """The resolving pass of vote (count and score) and request_lag with the shared
  directions removed, against the reference fed the residual signatures."""
  lib, _ = remove_shared(library(), "top:1")
  specs = (
    RouterSpec("vote", k=3),
    RouterSpec("vote", k=2, vote_score="score"),
    RouterSpec("request_lag", k=3),
  )
  rows = [0, 1, 2, 0]
  B, T = len(rows), 6
  rng = np.random.default_rng(5)
  mask = np.ones((B, N), bool)
  mask[3, [1, 4]] = False
  span = rng.random((B, T)) < 0.7
  span[:, 0] = True
  for m in ("up_proj", "down_proj"):
    x = rng.normal(size=(B, T, CFG.module_shapes()[m][1])).astype(np.float32)
    for layer in range(L):
      w = ref_directions(ADAPTERS, m, layer, "top", 1, np.ones(N, bool))
      refs = ref_shared_module(ADAPTERS, CFG, m, layer, w)
      d, c, stats = _request(
        specs,
        jnp.asarray(rows, jnp.int32),
        jnp.asarray(x),
        fields(layer_lib(lib, m, layer)),
        jnp.asarray(mask),
        jnp.full((B,), -1, jnp.int32),
        jnp.asarray(layer, jnp.int32),
        jnp.asarray(span),
      )
      for b in range(B):
        where = f"{m} layer {layer} row {b}"
        want = ref_route_request(
          specs[rows[b]], x[b].astype(np.float64), refs, mask[b], layer, span[b], None
        )
        assert want["tie"] > 1e-5, f"near tie in test data {where}"
        np.testing.assert_array_equal(np.asarray(c)[b], want["chosen"], err_msg=where)
        np.testing.assert_allclose(np.asarray(d)[b], want["delta"], atol=ATOL, err_msg=where)
        if want["votes"] is not None:
          np.testing.assert_allclose(np.asarray(stats["votes"])[b], want["votes"], atol=1e-5)


# --- 3. What it is for: a planted shared direction --------------------------------------


def test_planted_shared_direction_misroutes_until_removed():
  """Every adapter reads one common direction strongly (the recipe's), and its own
  weakly: tokens along an adapter's own direction plus the common one go to whichever
  adapter reads the common one most, until the common direction is removed."""
  rng = np.random.default_rng(0)
  common = {}
  for m in MLP_MODULES:
    v = rng.normal(size=CFG.module_shapes()[m][1])
    common[m] = (v / np.linalg.norm(v)).astype(np.float32)
  adapters = [make_adapter(f"p{i}", 3, 100 + i, shared_dirs=common) for i in range(6)]
  lib = AdapterLibrary.from_adapters(adapters, CFG)
  spec = RouterSpec("lag", k=1)  # the Arrow filter alone: what the shared direction skews
  right_before = []
  for mode in ("mean:1", "top:1"):
    clean, _ = remove_shared(lib, mode)
    for m in ("gate_proj", "down_proj"):
      for layer in range(L):
        # Token i: adapter i's most distinctive input direction (of its residual) plus
        # the common direction.
        res = np.asarray(clean.weights.arrows[m][layer]).T  # [N, I]
        x = (res + 3.0 * common[m][None])[None].astype(np.float32)  # [1, N, I]
        want = np.arange(len(adapters))
        mask = np.ones((1, len(adapters)), bool)
        fixed = np.full(1, -1)
        zero = jnp.zeros(1, jnp.int32)
        _, before = _route((spec,), zero, x, fields(layer_lib(lib, m, layer)), mask, fixed)
        _, after = _route((spec,), zero, x, fields(layer_lib(clean, m, layer)), mask, fixed)
        assert (np.asarray(after)[0] == want).all(), f"{mode} {m} {layer}"
        right_before.append((np.asarray(before)[0] == want).mean())
  assert np.mean(right_before) <= 0.5, right_before


# --- 4. Through the model ---------------------------------------------------------------


def test_generate_with_shared_removed():
  """A fixed adapter gives the same tokens with and without removal (what is applied
  is unchanged); LAG and Vote run through prefill and decode on the residual
  signatures and route only to usable adapters."""
  from flax import nnx

  from lag_jax.generation.generate import generate
  from lag_jax.model.transformer import CausalLM
  from lag_jax.routing.hook import RoutedAdapters, routed

  model = CausalLM(CFG, rngs=nnx.Rngs(0))
  clean, _ = remove_shared(library(), "top:1")
  prompts = [[5, 9, 3, 7], [2, 8, 4]]
  fixed = RouterSpec("fixed")
  outs = [
    generate(
      model,
      prompts,
      max_new_tokens=4,
      lora=RoutedAdapters((routed(lib, 2, fixed, fixed_ids=[1, 3]),)),
    )
    for lib in (library(), clean)
  ]
  assert outs[0].tokens == outs[1].tokens
  for spec in (RouterSpec("lag", k=3), RouterSpec("vote", k=3)):
    out = generate(
      model,
      prompts,
      max_new_tokens=4,
      lora=RoutedAdapters((routed(clean, 2, spec),)),
      return_routing=True,
    )
    for module, (ids,) in out.routing.items():
      assert ids.max() < N and (ids >= -1).all(), module


# --- 5. Bad input -----------------------------------------------------------------------


def test_bad_input(tmp_path):
  for bad in ("median:1", "top:0", "top:x", "none:2"):
    with pytest.raises(ValueError, match="shared_removal"):
      parse_mode(bad)
  assert parse_mode("top") == ("top", 1) and parse_mode("none") == ("none", 0)
  same, _ = remove_shared(library(), "none")
  assert same is library()
  clean, _ = remove_shared(library(), "mean:1")
  with pytest.raises(ValueError, match="already"):
    remove_shared(clean, "top:1")
  with pytest.raises(ValueError, match="among"):
    remove_shared(library(), "top:1", among=np.ones(3, bool))
  with pytest.raises(ValueError, match="input dims"):
    remove_shared(library(), f"top:{CFG.hidden_size}")
  with pytest.raises(ValueError, match="save the library as built"):
    clean.save(tmp_path / "lib")
  assert not (tmp_path / "lib").exists()
  with pytest.raises(ValueError, match="subset"):
    clean.subset([0, 1])


def test_subset():
  sub = library().subset(["k3", 1, 6])
  assert sub.names == ("k3", "k1", "k6") and sub.ranks == (3, 4, 3)
  w, full = sub.weights, library().weights
  for m in MLP_MODULES:
    np.testing.assert_array_equal(np.asarray(w.a[m]), np.asarray(full.a[m])[:, [3, 1, 6]])
    np.testing.assert_array_equal(
      np.asarray(w.arrows[m]), np.asarray(full.arrows[m])[:, :, [3, 1, 6]]
    )
  for bad in ([], [0, 0], [7], ["nope"]):
    with pytest.raises((ValueError, KeyError)):
      library().subset(bad)
  lib = library()
  assert lib.subset(range(len(lib))) is lib  # all, in order: no copy
  assert lib.subset([*range(1, len(lib)), 0]).names[0] == lib.names[1]  # reordered: a copy
