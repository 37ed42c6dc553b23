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
  I, N, D, k = 32, 60, 5, 8
  arrows = np.linalg.qr(rng.standard_normal((I, D)))[0] @ rng.standard_normal((D, N))
  arrows = (arrows / np.linalg.norm(arrows, axis=0)).astype(np.float32)
  x = rng.standard_normal((1, 16, I)).astype(np.float32)
  allowed = np.ones((1, N), bool)
  s = sk.build_sketch(arrows, D)
  assert s.dims == D
  _, ids = search(s, jnp.asarray(arrows), jnp.asarray(x), jnp.asarray(allowed), k=k, pool=k)
  np.testing.assert_array_equal(np.asarray(ids), exact_top(x, arrows, allowed, k)[1])


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
  vals, ids = search(
    sk.build_sketch(arrows, 2),
    jnp.asarray(arrows),
    jnp.asarray(x),
    jnp.asarray(allowed),
    k=4,
    pool=4,
  )
  assert sorted(np.asarray(ids)[0, 0, :2]) == [0, 2] and list(np.asarray(ids)[0, 0, 2:]) == [-1, -1]
  assert np.isinf(np.asarray(vals)[0, 0, 2:]).all()
  with pytest.raises(ValueError, match="pool 3 must be >= k 4"):
    sk.search(
      sk.build_sketch(arrows, 2),
      jnp.asarray(arrows),
      jnp.asarray(x),
      jnp.asarray(allowed),
      k=4,
      pool=3,
    )
  with pytest.raises(ValueError, match="dims must be >= 1"):
    sk.build_sketch(arrows, 0)


def test_layers_stack_and_numbers_read():
  rng = np.random.default_rng(4)
  arrows = {"up_proj": np.stack([unit_columns(rng, 16, 30) for _ in range(3)])}
  s = sk.sketch_layers(arrows, 4)["up_proj"]
  assert s.basis.shape == (3, 16, 4) and s.sketch.shape == (3, 4, 30)
  assert sk.numbers_read(1000, 576, 32, 80) == pytest.approx((576 * 32 + 32000 + 80 * 576) / 576000)
