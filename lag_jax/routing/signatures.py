"""Spectral alignment of LoRA adapters (docs/method.md, "Offline"), as pure jnp functions.

For one adapter at one module, with the scale folded into b (b = s B):

  U S V^T = b a          (thin SVD, never forming the O x I product)
  B* = U S   [O, R]      A* = V^T   [R, I]      arrow = A*[0]   [I]

B* A* = s B A exactly. We QR-factor b and a^T, take the SVD of the R x R core and
rotate back, all in float32. Signs are made canonical (the largest-magnitude entry
of every row of A* is positive) so that signatures are deterministic; routing
scores use absolute values and norms, so no result depends on the choice.

Directions whose singular value is below ``RELATIVE_TOL`` times the largest are
zeroed (rank padding and rank-deficient adapters); an adapter whose largest
singular value is 0 (a fresh LoRA has B = 0) gets zero rows and is marked invalid:
the routers never select it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Singular values below this fraction of the largest are treated as exactly zero.
RELATIVE_TOL = 1e-6


def spectral_align(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One adapter at one module.

  Args:
    a: [R, I] LoRA A.
    b: [O, R] LoRA B with the scale folded in.
  Returns:
    a_star [R, I] (orthonormal rows, zero rows for null directions),
    b_star [O, R] (= U S), s [R] singular values, descending.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  qb, rb = jnp.linalg.qr(b)  # [O, R], [R, R]
  # A data dependency that orders the two QRs: jaxlib 0.10's CPU runtime can
  # deadlock when two batched LAPACK calls run at once on a small intra-op pool.
  a = a + 0.0 * (qb[:1, :1] + rb[:1, :1])
  qa, ra = jnp.linalg.qr(a.T)  # [I, R], [R, R]
  uc, s, vct = jnp.linalg.svd(rb @ ra.T)  # b a = qb (rb ra^T) qa^T
  u = qb @ uc  # [O, R]
  v = qa @ vct.T  # [I, R]
  # Canonical sign: the largest-magnitude entry of each right singular vector > 0.
  pivot = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=0)[None], axis=0)[0]
  sign = jnp.where(pivot < 0, -1.0, 1.0)
  keep = s > RELATIVE_TOL * s[0]
  a_star = jnp.where(keep[:, None], (v * sign).T, 0.0)
  b_star = jnp.where(keep[None, :], u * sign * s, 0.0)
  return a_star, b_star, jnp.where(keep, s, 0.0)


@jax.jit
def spectral_align_stacked(a: jax.Array, b: jax.Array):
  """Batched over any leading axes (e.g. [N, L]): a [..., R, I], b [..., O, R].

  Returns a_star [..., R, I], b_star [..., O, R], s [..., R], and valid [...] (the
  adapter has a non-zero singular value there).
  """
  lead = a.shape[:-2]
  fa = a.reshape((-1, *a.shape[-2:]))
  fb = b.reshape((-1, *b.shape[-2:]))
  a_star, b_star, s = jax.vmap(spectral_align)(fa, fb)
  valid = s[:, 0] > 0
  return (
    a_star.reshape(a.shape),
    b_star.reshape(b.shape),
    s.reshape((*lead, -1)),
    valid.reshape(lead),
  )


def arrows_of(a_star: jax.Array) -> jax.Array:
  """The arrow (top right singular vector) of each adapter: a_star[..., 0, :]."""
  return a_star[..., 0, :]
