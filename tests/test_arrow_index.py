"""The sublinear arrow index (lag_jax/routing/arrow_index.py) against the exact scan."""

import jax.numpy as jnp
import numpy as np
import pytest

from lag_jax.routing import arrow_index as ai


def _exact(arrows, x, allowed, k):
  s = np.abs(np.einsum("bti,in->btn", x, arrows))
  s = np.where(allowed[:, None, :], s, -np.inf)
  order = np.argsort(-s, axis=-1, kind="stable")[..., :k]  # ties: lower id first
  vals = np.take_along_axis(s, order, axis=-1)
  return vals, np.where(np.isfinite(vals), order, -1)


def _clustered(n, dim, groups, seed):
  """Arrows around `groups` axes, with random signs (an arrow's sign is arbitrary)."""
  rng = np.random.default_rng(seed)
  axes = rng.standard_normal((groups, dim))
  a = axes[rng.integers(0, groups, n)] + 0.3 * rng.standard_normal((n, dim))
  a *= rng.choice([-1.0, 1.0], (n, 1))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  return a.T.astype(np.float32)  # [I, N]


@pytest.mark.parametrize("n,g,spill", [(97, 10, 1), (200, 7, 1), (97, 10, 2), (60, 2, 2)])
def test_probing_every_cluster_is_the_exact_scan(n, g, spill):
  rng = np.random.default_rng(n)
  arrows = rng.standard_normal((24, n)).astype(np.float32)
  valid = rng.random(n) > 0.1
  idx = ai.build_index(arrows, valid, clusters=g, spill=spill)
  members = idx.members[idx.members >= 0]
  # Each valid arrow in `spill` distinct clusters; ids ascending within a cluster.
  want = sorted(np.flatnonzero(valid).tolist() * spill)
  assert sorted(members.tolist()) == want
  for row in idx.members:
    kept = row[row >= 0]
    assert np.all(np.diff(kept) > 0)
  assert idx.members.shape[1] <= spill * int(np.ceil(1.5 * valid.sum() / g))
  x = rng.standard_normal((2, 3, 24)).astype(np.float32)
  allowed = valid[None, :] & (rng.random((2, n)) > 0.2)
  ev, eids = _exact(arrows, x, allowed, 5)
  for method in ("gather", "loop"):  # the probed blocks copied at once, or read in a loop
    vals, ids = ai.search(idx, jnp.asarray(x), jnp.asarray(allowed), k=5, probe=g, method=method)
    np.testing.assert_array_equal(np.asarray(ids), eids, err_msg=method)
    np.testing.assert_allclose(np.asarray(vals), ev, rtol=1e-5, atol=1e-6, err_msg=method)
  with pytest.raises(ValueError, match="method"):
    ai.search(idx, jnp.asarray(x), jnp.asarray(allowed), k=5, probe=g, method="scan")


def test_identical_arrows_are_found_each_once_with_the_exact_scores():
  """Adapters loaded two or three times have identical arrows: the index (spilled or
  not, either read) returns the exact top-k scores with every id once. Which twin
  comes first may differ from the exact scan: identical rows in other positions of a
  matrix-vector product can round differently in the last bit."""
  rng = np.random.default_rng(3)
  base = rng.standard_normal((16, 20)).astype(np.float32)
  arrows = np.concatenate([base, base[:, ::-1], base[:, :10]], axis=1)  # 50, many twins
  x = rng.standard_normal((1, 6, 16)).astype(np.float32)
  allowed = np.ones((1, 50), bool)
  ev, _ = _exact(arrows, x, allowed, 7)
  for spill in (1, 2):
    idx = ai.build_index(arrows, clusters=6, spill=spill)
    for method in ("gather", "loop"):
      vals, ids = ai.search(idx, jnp.asarray(x), jnp.asarray(allowed), k=7, probe=6, method=method)
      vals, ids = np.asarray(vals), np.asarray(ids)
      np.testing.assert_allclose(vals, ev, rtol=1e-5, atol=1e-6, err_msg=f"{spill} {method}")
      assert all(len(set(r)) == len(r) for r in ids[0])
      mine = np.abs(np.einsum("ti,itk->tk", x[0], arrows[:, ids[0]]))
      np.testing.assert_allclose(mine, vals[0], rtol=1e-5, atol=1e-6)


def test_few_probes_find_the_top_k_of_clustered_arrows():
  arrows = _clustered(2000, 32, 40, seed=0)
  idx = ai.build_index(arrows, clusters=45)
  rng = np.random.default_rng(1)
  # Tokens near some adapter's axis (as a routed input is), signs random.
  x = arrows.T[rng.integers(0, 2000, 64)] + 0.2 * rng.standard_normal((64, 32))
  x = x[None].astype(np.float32)
  allowed = np.ones((1, 2000), bool)
  _, eids = _exact(arrows, x, allowed, 20)
  _, ids = ai.search(idx, jnp.asarray(x), jnp.asarray(allowed), k=20, probe=8)
  ids = np.asarray(ids)
  recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids[0], eids[0])])
  assert recall >= 0.95, recall
  # The sign of an arrow does not move it to another cluster.
  flipped = ai.build_index(arrows * np.where(np.arange(2000) % 2, -1, 1), clusters=45)
  np.testing.assert_array_equal(flipped.members, idx.members)
  # Spilling each arrow into its second-best cluster too finds at least as much of the
  # top-k at the same probe, with no id twice.
  spilled = ai.build_index(arrows, clusters=45, spill=2)
  _, sids = ai.search(spilled, jnp.asarray(x), jnp.asarray(allowed), k=20, probe=8)
  sids = np.asarray(sids)[0]
  assert all(len(set(r)) == len(r) for r in sids)
  srecall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(sids, eids[0])])
  assert srecall >= recall, (srecall, recall)


def test_default_clusters_read_the_fewest_rows():
  """J = sqrt(probe f N) minimises J + probe f N / J, the rows a token reads."""
  n, probe = 100_000, 8
  j = ai.default_clusters(n, probe)
  rows = lambda g: g + probe * 1.5 * n / g  # noqa: E731
  assert j == 1095 and rows(j) <= min(rows(g) for g in (316, 500, 2000, 5000))
  assert ai.default_clusters(3, 8) == 3  # never more clusters than arrows
  with pytest.raises(ValueError, match="spill"):
    ai.build_index(np.eye(4, 6, dtype=np.float32), clusters=2, spill=3)


def test_fewer_slots_than_k_pads_with_nothing():
  arrows = np.eye(4, 6, dtype=np.float32)  # 6 adapters, 2 of them all-zero
  valid = np.abs(arrows).sum(0) > 0
  idx = ai.build_index(arrows, valid, clusters=4)
  x = jnp.ones((1, 1, 4), jnp.float32)
  vals, ids = ai.search(idx, x, jnp.ones((1, 6), bool), k=8, probe=1)
  found = int((np.asarray(ids) >= 0).sum())  # the probed cluster's members, then nothing
  assert ids.shape == (1, 1, 8) and 1 <= found <= idx.capacity
  assert np.all(np.isneginf(np.asarray(vals)[np.asarray(ids) < 0]))


def test_a_library_router_with_the_index_equals_exact_lag_when_it_probes_everything(
  monkeypatch,
):
  """RouterSpec(index_probe=J) through the model equals exact LAG (the same logits)
  when the index path runs (forced here: probing everything never pays off, so the
  router would scan exactly anyway); a decode-sized probe takes the index path by
  itself, and index_prefill makes the prompt's tokens probe too; without an index it
  is an error."""
  from flax import nnx

  from lag_jax.model.transformer import MLP_MODULES, CausalLM
  from lag_jax.routing.hook import RoutedAdapters, routed
  from lag_jax.routing.library import AdapterLibrary
  from lag_jax.routing.routers import RouterSpec
  from lag_jax.testing import tiny_config
  from lag_jax.testing.libraries import random_adapter

  cfg = tiny_config()
  adapters = [random_adapter(cfg, f"a{i}", 4, MLP_MODULES, seed=i) for i in range(23)]
  lib = AdapterLibrary.from_adapters(adapters, cfg)
  indexed = lib.with_index(clusters=5)
  g = indexed.weights.index["up_proj"].members.shape[1]
  assert g == 5
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)

  def run(library, spec):
    hook = RoutedAdapters((routed(library, 2, spec),))
    logits, _ = model(tokens, lora=hook)
    return np.asarray(logits), None

  calls = []
  real_search = ai.search

  def counting(*args, **kw):
    calls.append(args[1].shape)
    return real_search(*args, **kw)

  monkeypatch.setattr(ai, "search", counting)
  exact, _ = run(lib, RouterSpec("lag", k=3))
  assert not calls
  monkeypatch.setattr(ai, "pays_off", lambda *a: True)
  probed, _ = run(indexed, RouterSpec("lag", k=3, index_probe=5))
  assert calls  # the index path ran
  np.testing.assert_allclose(probed, exact, rtol=1e-5, atol=1e-5)
  monkeypatch.undo()
  monkeypatch.setattr(ai, "search", counting)
  calls.clear()
  run(indexed, RouterSpec("lag", k=3, index_probe=5))
  assert not calls  # 7 tokens a request x 5 clusters of 7 > 23 arrows: the exact scan
  # index_prefill: the prompt's tokens probe too (here every cluster: exact LAG).
  everywhere, _ = run(indexed, RouterSpec("lag", k=3, index_probe=5, index_prefill=True))
  assert calls
  np.testing.assert_allclose(everywhere, exact, rtol=1e-5, atol=1e-5)
  calls.clear()
  with pytest.raises(ValueError, match="index_prefill needs index_probe"):
    RouterSpec("lag", index_prefill=True)
  one = jnp.asarray(tokens[:1, :1])
  hook = RoutedAdapters((routed(indexed, 1, RouterSpec("lag", k=3, index_probe=1)),))
  logits, _ = model(one, lora=hook)
  assert calls and np.isfinite(np.asarray(logits)).all()  # 1 token x 1 x 7 < 23
  with pytest.raises(ValueError, match="needs a library with an arrow index"):
    run(lib, RouterSpec("lag", k=3, index_probe=2))
  with pytest.raises(ValueError, match="index_probe must be >= 0"):
    RouterSpec("lag", index_probe=-1)
  with pytest.raises(ValueError, match="arrow index"):
    indexed.save("/nonexistent/never")


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 1e-2), ("int8", 1e-2)])
def test_reduced_precision_arrows_score_close_to_float32(dtype, tol):
  """Probing every cluster with bfloat16 / int8 (per-arrow scale) arrows: scores within
  the storage's rounding of the exact ones, and nearly the same top-k."""
  rng = np.random.default_rng(7)
  arrows = rng.standard_normal((64, 300)).astype(np.float32)
  arrows /= np.linalg.norm(arrows, axis=0, keepdims=True)
  idx = ai.build_index(arrows, clusters=17, arrow_dtype=dtype)
  # bfloat16 arrows are held as their bit patterns (uint16; see ArrowIndex).
  assert idx.member_arrows.dtype == np.dtype(dtype if dtype == "int8" else np.uint16)
  assert (idx.member_scales is not None) == (dtype == "int8")
  x = rng.standard_normal((1, 50, 64)).astype(np.float32)
  allowed = np.ones((1, 300), bool)
  ev, eids = _exact(arrows, x, allowed, 20)
  vals, ids = ai.search(idx, jnp.asarray(x), jnp.asarray(allowed), k=20, probe=17)
  scale = np.linalg.norm(x, axis=-1, keepdims=True)  # |a . x| <= |x|
  np.testing.assert_allclose(np.asarray(vals) / scale, ev / scale, atol=tol)
  gvals, gids = ai.search(
    idx, jnp.asarray(x), jnp.asarray(allowed), k=20, probe=17, method="gather"
  )
  np.testing.assert_allclose(np.asarray(gvals), np.asarray(vals), rtol=1e-5, atol=1e-6)
  agree = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(np.asarray(ids)[0], eids[0])])
  assert agree >= 0.9, agree
  with pytest.raises(ValueError, match="arrow_dtype"):
    ai.build_index(arrows, clusters=3, arrow_dtype="int4")
