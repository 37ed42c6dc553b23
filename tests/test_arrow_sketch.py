"""The arrow sketch (lag_jax/routing/arrow_sketch.py) against a brute-force numpy scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lag_jax.routing import arrow_sketch as sk

search = jax.jit(sk.search, static_argnames=("k", "pool"))


def exact_top(x, arrows, allowed, k):
  """Brute force: per token, |arrow . x| over the allowed adapters, score descending,
  lower id first; -1 / -inf past the allowed ones."""
  B, T, _ = x.shape
  vals = np.full((B, T, k), -np.inf, np.float32)
  ids = np.full((B, T, k), -1, np.int32)
  for b in range(B):
    for t in range(T):
      s = np.abs(arrows.T.astype(np.float64) @ x[b, t])
      order = [j for j in sorted(range(len(s)), key=lambda j: (-s[j], j)) if allowed[b, j]]
      for r, j in enumerate(order[:k]):
        vals[b, t, r], ids[b, t, r] = s[j], j
  return vals, ids


def unit_columns(rng, i, n):
  a = rng.standard_normal((i, n)).astype(np.float32)
  return a / np.linalg.norm(a, axis=0)


def test_full_pool_is_the_exact_scan_with_masks_and_ties():
  rng = np.random.default_rng(0)
  I, N, k = 24, 40, 6
  arrows = unit_columns(rng, I, N)
  arrows[:, 7] = -arrows[:, 3]  # an exact tie (sign-invariant): the lower id first
  x = rng.standard_normal((2, 3, I)).astype(np.float32)
  x[0, 0] = arrows[:, 3] * 5  # makes the tie the top score
  allowed = np.ones((2, N), bool)
  allowed[1, ::2] = False
  want_v, want_i = exact_top(x, arrows, allowed, k)
  s = sk.build_sketch(arrows, 4)
  vals, ids = search(s, jnp.asarray(arrows), jnp.asarray(x), jnp.asarray(allowed), k=k, pool=N)
  np.testing.assert_array_equal(np.asarray(ids), want_i)
  np.testing.assert_allclose(np.asarray(vals), want_v, rtol=1e-5, atol=1e-6)
  assert list(np.asarray(ids)[0, 0, :2]) == [3, 7]


def test_low_rank_arrows_are_exact_with_the_smallest_pool():
  """Arrows in a D-dimensional subspace: the sketch scores are the exact ones, so a pool
  of k already holds the exact top-k (up to rounding at near-ties: none here)."""
  rng = np.random.default_rng(1)
  I, N, Z, k = 32, 60, 5, 8
  arrows = np.linalg.qr(rng.standard_normal((I, Z)))[0] @ rng.standard_normal((Z, N))
  arrows = (arrows / np.linalg.norm(arrows, axis=0)).astype(np.float32)
  x = rng.standard_normal((1, 16, I)).astype(np.float32)
  allowed = np.ones((1, N), bool)
  s = sk.build_sketch(arrows, Z)
  assert s.dims == Z
  _, ids = search(s, jnp.asarray(arrows), jnp.asarray(x), jnp.asarray(allowed), k=k, pool=k)
  np.testing.assert_array_equal(np.asarray(ids), exact_top(x, arrows, allowed, k)[1])


def test_leading_directions_match_a_dense_svd_both_ways():
  """N > I takes the Gram matrix's eigenvectors, N <= I the SVD: either way the basis
  spans the dense SVD's Z leading left singular vectors (projectors compared; a clear
  gap after the Z-th value, so the subspace is well defined), orthonormal, and the
  sketch is basis^T arrows."""
  rng = np.random.default_rng(7)
  for I, N in ((20, 90), (40, 25)):
    Z = 6
    q1 = np.linalg.qr(rng.standard_normal((I, min(I, N))))[0]
    q2 = np.linalg.qr(rng.standard_normal((N, min(I, N))))[0]
    s_true = np.geomspace(10.0, 0.1, min(I, N))
    s_true[Z:] *= 0.3  # the gap
    arrows = (q1 * s_true @ q2.T).astype(np.float32)
    got = sk.build_sketch(arrows, Z)
    u = np.linalg.svd(arrows.astype(np.float64))[0][:, :Z]
    b = np.asarray(got.basis, np.float64)
    np.testing.assert_allclose(b.T @ b, np.eye(Z), atol=1e-6)
    np.testing.assert_allclose(b @ b.T, u @ u.T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.sketch), b.T @ arrows, rtol=1e-5, atol=1e-5)


def test_recall_grows_with_the_pool_and_dims():
  """On full-rank arrows a small sketch misses some of the top-k; a larger pool or more
  dimensions find more, and every returned score is exact."""
  rng = np.random.default_rng(2)
  I, N, k = 48, 200, 10
  shared = rng.standard_normal(I)
  arrows = unit_columns(rng, I, N) + 0.8 * (shared / np.linalg.norm(shared))[:, None]
  arrows = (arrows / np.linalg.norm(arrows, axis=0)).astype(np.float32)
  x = (rng.standard_normal((1, 64, I)) + 2 * shared).astype(np.float32)
  allowed = np.ones((1, N), bool)
  want = exact_top(x, arrows, allowed, k)[1][0]

  def recall(d, p):
    vals, ids = search(
      sk.build_sketch(arrows, d),
      jnp.asarray(arrows),
      jnp.asarray(x),
      jnp.asarray(allowed),
      k=k,
      pool=p,
    )
    got = np.asarray(ids)[0]
    np.testing.assert_allclose(  # the scores returned are the exact ones
      np.asarray(vals)[0], np.abs(np.einsum("tki,ti->tk", arrows.T[got], x[0])), rtol=1e-5
    )
    return np.mean([len(set(w) & set(g)) / k for w, g in zip(want, got)])

  small, pooled, wide = recall(2, k), recall(2, 8 * k), recall(24, k)
  assert small < 0.9
  assert pooled > small and wide > small
  assert recall(2, N) == 1.0


def test_fewer_allowed_than_k_and_bad_settings():
  rng = np.random.default_rng(3)
  arrows = unit_columns(rng, 8, 5)
  x = rng.standard_normal((1, 1, 8)).astype(np.float32)
  allowed = np.array([[True, False, True, False, False]])
  args = (sk.build_sketch(arrows, 2), jnp.asarray(arrows), jnp.asarray(x), jnp.asarray(allowed))
  vals, ids = search(*args, k=4, pool=4)
  assert sorted(np.asarray(ids)[0, 0, :2]) == [0, 2] and list(np.asarray(ids)[0, 0, 2:]) == [-1, -1]
  assert np.isinf(np.asarray(vals)[0, 0, 2:]).all()
  with pytest.raises(ValueError, match="pool 3 must be >= k 4"):
    sk.search(*args, k=4, pool=3)
  with pytest.raises(ValueError, match="dims must be >= 1"):
    sk.build_sketch(arrows, 0)


def test_layers_stack_and_numbers_read():
  rng = np.random.default_rng(4)
  arrows = {"up_proj": np.stack([unit_columns(rng, 16, 30) for _ in range(3)])}
  s = sk.sketch_layers(arrows, 4)["up_proj"]
  assert s.basis.shape == (3, 16, 4) and s.sketch.shape == (3, 4, 30)
  assert sk.numbers_read(1000, 576, 32, 80) == pytest.approx((576 * 32 + 32000 + 80 * 576) / 576000)


def test_a_library_router_with_the_sketch_equals_exact_lag_with_a_full_pool(monkeypatch):
  """RouterSpec(index_sketch=Z, index_probe=N) through the model equals exact LAG (the
  same logits) with index_prefill; without it the prompt scans exactly and one-token
  decode steps take the sketch; a small pool changes some decisions yet stays finite;
  the wrong kind of index, or none, is an error."""
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
  sketched = lib.with_sketch(3)
  assert sketched.weights.index["up_proj"].basis.shape[-1] == 3
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)

  def run(library, spec, toks=tokens):
    logits, _ = model(toks, lora=RoutedAdapters((routed(library, 2, spec),)))
    return np.asarray(logits)

  calls = []
  real = sk.search

  def counting(*args, **kw):
    calls.append(args[2].shape)
    return real(*args, **kw)

  monkeypatch.setattr(sk, "search", counting)
  exact = run(lib, RouterSpec("lag", k=3))
  full = run(sketched, RouterSpec("lag", k=3, index_sketch=3, index_probe=23, index_prefill=True))
  assert calls
  np.testing.assert_allclose(full, exact, rtol=1e-5, atol=1e-5)
  calls.clear()
  prompt = run(sketched, RouterSpec("lag", k=3, index_sketch=3, index_probe=3))
  assert not calls  # a 7-token prompt scans exactly
  np.testing.assert_allclose(prompt, exact, rtol=1e-5, atol=1e-5)
  one = tokens[:, :1]
  small = run(sketched, RouterSpec("lag", k=3, index_sketch=3, index_probe=3), one)
  assert calls and np.isfinite(small).all()  # a decode-sized call takes the sketch
  with pytest.raises(ValueError, match="needs a library with an arrow sketch"):
    run(lib.with_index(clusters=5), RouterSpec("lag", k=3, index_sketch=3, index_probe=5))
  with pytest.raises(ValueError, match="needs a library with an arrow index"):
    run(sketched, RouterSpec("lag", k=3, index_probe=5))
  with pytest.raises(ValueError, match="must be >= k"):
    RouterSpec("lag", k=4, index_sketch=3, index_probe=2)
  with pytest.raises(ValueError, match="needs index_probe > 0"):
    RouterSpec("lag", k=4, index_sketch=3)


def test_lag_sketch_method_name():
  from lag_jax.eval.methods import method_from_name

  m = method_from_name("LAG+sketch(k=4;pool=40;sketch=16)")
  assert dict(m.knowledge_options) == {"index_probe": 40, "index_sketch": 16}
  assert dict(m.task_options) == {}  # the sketch is the knowledge library's
  default = method_from_name("LAG+sketch(k=20)")
  assert dict(default.knowledge_options) == {"index_probe": 80, "index_sketch": 32}


def test_stacked_arrows_with_a_layer_equal_the_layer_slice():
  """search(..., layer=l) on the [L, I, N] stack (the decoder's in-place form) returns
  what it returns on the layer's own [I, N]."""
  rng = np.random.default_rng(5)
  stack = np.stack([unit_columns(rng, 16, 30) for _ in range(3)])  # [L, I, N]
  x = jnp.asarray(rng.standard_normal((2, 1, 16)).astype(np.float32))
  allowed = jnp.ones((2, 30), bool)
  s = sk.build_sketch(stack[1], 4, rows_dtype=None)  # the pool gathered from the arrows
  assert s.rows is None
  flat = search(s, jnp.asarray(stack[1]), x, allowed, k=5, pool=12)
  stacked = search(s, jnp.asarray(stack), x, allowed, k=5, pool=12, layer=jnp.int32(1))
  for a, b in zip(flat, stacked, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_adapter_major_rows_rescore_as_the_arrows_do():
  """The sketch's own [N, I] copy of the arrows (float32, the default) gives the same
  ids and scores as gathering from the library's [I, N]; a bfloat16 copy rescores in
  bfloat16 (scores within its rounding, the pool the same)."""
  rng = np.random.default_rng(6)
  arrows = unit_columns(rng, 24, 50)
  x = jnp.asarray(rng.standard_normal((2, 3, 24)).astype(np.float32))
  allowed = np.ones((2, 50), bool)
  allowed[0, 5:9] = False
  allowed = jnp.asarray(allowed)
  a = jnp.asarray(arrows)
  got = {d: sk.build_sketch(arrows, 6, rows_dtype=d) for d in ("float32", "bfloat16", None)}
  assert got["float32"].rows.shape == (50, 24) and got["float32"].rows.dtype == jnp.float32
  assert got["bfloat16"].rows.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got["float32"].rows), arrows.T)
  want_v, want_i = search(got[None], a, x, allowed, k=5, pool=15)
  v32, i32 = search(got["float32"], a, x, allowed, k=5, pool=15)
  np.testing.assert_array_equal(np.asarray(i32), np.asarray(want_i))
  np.testing.assert_array_equal(np.asarray(v32), np.asarray(want_v))
  v16, _ = search(got["bfloat16"], a, x, allowed, k=5, pool=15)
  # bfloat16 rounds each number of a unit arrow by at most 2^-9 relative, so each score
  # moves by at most 2^-9 ||x|| (Cauchy-Schwarz), and so does the best one.
  bound = 2.0**-9 * np.linalg.norm(np.asarray(x), axis=-1) * 1.001 + 1e-6
  assert np.all(np.abs(np.asarray(v16)[..., 0] - np.asarray(want_v)[..., 0]) <= bound)
  with pytest.raises(ValueError, match="rows_dtype"):
    sk.build_sketch(arrows, 6, rows_dtype="int8")


def _ridged_roots(c):
  """(C + 1e-3 tr(C) / I)^(+-1/2) by a dense eigendecomposition (the sketch's ridge)."""
  i = c.shape[0]
  w, v = np.linalg.eigh(c + sk.RIDGE * np.trace(c) / i * np.eye(i))
  return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def test_a_calibrated_sketch_is_the_truncated_svd_in_the_input_metric():
  """basis @ sketch (the arrows as the sketch scores them) equals C^(-1/2) times the
  rank-Z truncated SVD of C^(1/2) arrows (dense numpy SVD), for N > I (Gram path) and
  N <= I; with C a multiple of the identity it is the plain sketch."""
  rng = np.random.default_rng(11)
  for I, N in ((16, 70), (30, 20)):
    Z = 5
    arrows = unit_columns(rng, I, N)
    g = rng.standard_normal((I, I)) * np.geomspace(3.0, 0.05, I)
    c = g @ g.T / I
    got = sk.build_sketch(arrows, Z, moment=c)
    half, inv_half = _ridged_roots(c)
    u, s, vt = np.linalg.svd(half @ arrows.astype(np.float64), full_matrices=False)
    want = inv_half @ (u[:, :Z] * s[:Z]) @ vt[:Z]
    have = np.asarray(got.basis, np.float64) @ np.asarray(got.sketch, np.float64)
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)
    plain = sk.build_sketch(arrows, Z)
    iso = sk.build_sketch(arrows, Z, moment=2.5 * np.eye(I))
    np.testing.assert_allclose(
      np.asarray(iso.basis) @ np.asarray(iso.sketch),
      np.asarray(plain.basis) @ np.asarray(plain.sketch),
      atol=1e-5,
    )


def test_calibration_raises_recall_where_the_inputs_are_anisotropic():
  """Inputs that live mostly in a few directions the arrows do not lead in: a sketch
  calibrated on other inputs of the same kind finds more of the exact top-k than the
  plain one at the same Z and pool; a full pool is exact either way."""
  rng = np.random.default_rng(12)
  I, N, k, Z, P = 48, 300, 10, 6, 30
  scales = np.geomspace(4.0, 0.2, I)
  arrows = unit_columns(rng, I, N) * scales[:, None]  # leading in the first inputs
  arrows = (arrows / np.linalg.norm(arrows, axis=0)).astype(np.float32)
  mix = np.linalg.qr(rng.standard_normal((I, I)))[0]

  def inputs(m):
    return (rng.standard_normal((m, I)) * scales[::-1]) @ mix.T  # another few directions

  calib = inputs(4000)
  x = inputs(128).astype(np.float32)[None]
  allowed = np.ones((1, N), bool)
  want = exact_top(x, arrows, allowed, k)[1][0]

  def recall(s, p):
    vals, ids = search(s, jnp.asarray(arrows), jnp.asarray(x), jnp.asarray(allowed), k=k, pool=p)
    got = np.asarray(ids)[0]
    return np.mean([len(set(w) & set(g)) / k for w, g in zip(want, got)])

  plain = sk.build_sketch(arrows, Z)
  cal = sk.build_sketch(arrows, Z, moment=calib.T @ calib / len(calib), ridge=1e-3)
  r_plain, r_cal = recall(plain, P), recall(cal, P)
  assert r_cal > r_plain + 0.1, (r_plain, r_cal)
  assert recall(cal, N) == 1.0


def test_calibration_moments_must_fit_the_arrows():
  rng = np.random.default_rng(13)
  arrows = {"up_proj": np.stack([unit_columns(rng, 8, 12) for _ in range(2)])}
  with pytest.raises(ValueError, match="up_proj.*input moments are"):
    sk.sketch_layers(arrows, 3, moments={"up_proj": np.ones((2, 9, 9))})
  with pytest.raises(ValueError, match="no input moments for \\['up_proj'\\]"):
    sk.sketch_layers(arrows, 3, moments={"down_proj": np.ones((2, 8, 8))})
  with pytest.raises(ValueError, match="moment is zero"):
    sk.build_sketch(arrows["up_proj"][0], 3, moment=np.zeros((8, 8)))
  with pytest.raises(ValueError, match="finite square"):
    sk.build_sketch(arrows["up_proj"][0], 3, moment=np.full((8, 8), np.nan))
  ok = sk.sketch_layers(arrows, 3, moments={"up_proj": np.stack([np.eye(8)] * 2)})
  assert ok["up_proj"].basis.shape == (2, 8, 3)


def test_a_large_ridge_leans_to_the_plain_sketch():
  """The ridge blends the input moment with the identity: a huge one gives the plain
  sketch's scores; it must be > 0."""
  rng = np.random.default_rng(14)
  arrows = unit_columns(rng, 10, 40)
  g = rng.standard_normal((10, 10)) * np.geomspace(5.0, 0.1, 10)
  c = g @ g.T
  plain = sk.build_sketch(arrows, 3)
  wide = sk.build_sketch(arrows, 3, moment=c, ridge=1e6)
  near = sk.build_sketch(arrows, 3, moment=c, ridge=1e-3)
  approx = {
    name: np.asarray(s.basis) @ np.asarray(s.sketch)
    for name, s in (("plain", plain), ("wide", wide), ("near", near))
  }
  np.testing.assert_allclose(approx["wide"], approx["plain"], atol=1e-4)
  assert np.abs(approx["near"] - approx["plain"]).max() > 1e-2
  with pytest.raises(ValueError, match="ridge must be > 0"):
    sk.build_sketch(arrows, 3, moment=c, ridge=0.0)


def test_a_library_calibrated_sketch_and_its_ridge():
  """with_sketch(moments=...) builds each layer's sketch from that layer's moment; a
  ridge of 0 is an error, not the default."""
  from lag_jax.model.transformer import MLP_MODULES
  from lag_jax.routing.library import AdapterLibrary
  from lag_jax.testing import tiny_config
  from lag_jax.testing.libraries import random_adapter

  cfg = tiny_config()
  lib = AdapterLibrary.from_adapters(
    [random_adapter(cfg, f"a{i}", 4, MLP_MODULES, seed=i) for i in range(9)], cfg
  )
  rng = np.random.default_rng(15)
  moments = {}
  for m in lib.modules:
    L, I = lib.weights.arrows[m].shape[:2]
    g = rng.standard_normal((L, I, I))
    moments[m] = g @ g.transpose(0, 2, 1)
  got = lib.with_sketch(2, moments=moments, ridge=1e-3).weights.index
  for m in lib.modules:
    for layer in range(moments[m].shape[0]):
      want = sk.build_sketch(
        np.asarray(lib.weights.arrows[m][layer]), 2, moment=moments[m][layer], ridge=1e-3
      )
      np.testing.assert_allclose(np.asarray(got[m].sketch[layer]), want.sketch, atol=1e-5)
  with pytest.raises(ValueError, match="ridge must be > 0"):
    lib.with_sketch(2, moments=moments, ridge=0.0)
