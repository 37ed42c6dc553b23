"""A low-rank sketch of the arrows: scan N scores in Z dimensions, rescore a pool exactly.

The exact Arrow filter reads all N arrows of I numbers per token and module. Adapters
trained by one recipe on one base model share their arrows' leading directions (on the
N = 1,000 knowledge library one direction holds 36-57% of the arrows' energy in the
middle and last layers), and the arrow index's clusters (``arrow_index``), drawn along
those shared directions, do not follow the small remainder that decides the ranking.
The sketch instead keeps the arrows' Z leading principal directions (the top left
singular vectors of the [I, N] arrow matrix: uncentred, so +a and -a count alike, and
computed from the library alone, no data) and, per token:

  1. scores every adapter in the subspace: |(x U) (U^T arrows)|, N Z numbers read;
  2. keeps the ``pool`` best (P >= k);
  3. rescores those P exactly (|arrow . x|, P I numbers read) and returns their top k.

The rescoring reads the pool's arrows from the sketch's own adapter-major copy of the
arrows (``rows`` [N, I], float32 by default: the rescoring is exact): the library keeps
its arrows input-major ([I, N], what the exact scan's matvec wants), and gathering P
columns from that layout costs a cache line per number, ~16x the bytes: on the offloaded
N = 10^5 benchmark the gather from [I, N] took 21 ms of a B = 16 decode step's module
against 2 ms from [N, I]. The copy costs N I numbers of device memory (as much again as
the arrows; ``rows_dtype='bfloat16'`` half that, with the rescoring in bfloat16;
``None`` none, gathering from the library's layout).

Reads I Z + N Z + P I numbers against N I (``numbers_read``): with Z = 32, I = 576 and
P = 80, 0.17 of the exact scan's bytes at N = 1,000 and 0.06 at N = 10^5 (Z / I bounds
it: the sketch is a constant-factor saving, unlike the index's probe of a few clusters).
``pool`` = N (or Z = the rank of the arrows) gives the exact top-k. Recall of the exact
top-k on real arrows: BENCHMARKS.md ("Arrow filter") and ``routing_scale``'s index_effect
(``index_sketches``).

Shape letters as docs/method.md: B batch, T tokens, I input width, N adapters, Z sketch
dimensions, P pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class ArrowSketch:
  """One layer and module's sketch (or stacked over layers with a leading L axis)."""

  basis: jax.Array  # [I, Z] orthonormal columns: the arrows' leading directions
  sketch: jax.Array  # [Z, N] = basis^T arrows
  rows: jax.Array | None = None  # [N, I] the arrows adapter-major (the pool's gather)

  @property
  def dims(self) -> int:
    return self.basis.shape[-1]


def build_sketch(arrows: np.ndarray, dims: int, rows_dtype: str | None = "float32") -> ArrowSketch:
  """The Z = ``dims`` leading directions of arrows [I, N] (at most min(I, N)), and the
  arrows adapter-major in ``rows_dtype`` (float32, bfloat16, or None: no copy)."""
  a = np.asarray(arrows, np.float32)
  if rows_dtype not in ("float32", "bfloat16", None):
    raise ValueError(
      f"build_sketch: rows_dtype must be float32, bfloat16 or None, got {rows_dtype!r}"
    )
  if dims < 1:
    raise ValueError(f"build_sketch: dims must be >= 1, got {dims}")
  d = min(dims, *a.shape)
  i, n = a.shape
  a64 = a.astype(np.float64)
  if n > i:
    # The top eigenvectors of the [I, I] Gram matrix: the same leading directions as
    # the SVD's, from one matmul (N = 10^5 arrows of I = 1,536: seconds, not minutes).
    # float64 keeps the squared spectrum's small end well above rounding.
    w, v = np.linalg.eigh(a64 @ a64.T)
    u = v[:, np.argsort(w)[::-1][:d]]
  else:
    u = np.linalg.svd(a64, full_matrices=False)[0][:, :d]
  u = u.astype(np.float32)
  rows = None if rows_dtype is None else np.ascontiguousarray(a.T).astype(jnp.dtype(rows_dtype))
  return ArrowSketch(basis=u, sketch=u.T @ a, rows=rows)


def sketch_layers(arrows: dict, dims: int, rows_dtype: str | None = "float32") -> dict:
  """Per module, every layer's sketch stacked (leading L axis): arrows module -> [L, I, N]."""
  out = {}
  for m, a in arrows.items():
    per = [build_sketch(layer, dims, rows_dtype) for layer in np.asarray(a)]
    out[m] = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *per)
  return out


def search(
  sketch: ArrowSketch,
  arrows: jax.Array,
  x: jax.Array,
  allowed: jax.Array,
  k: int,
  pool: int,
  layer: jax.Array | None = None,
):
  """The top-k exact arrow scores among each token's ``pool`` best sketch scores.

  Args:
    sketch: one layer and module's ArrowSketch; the pool's arrows come from its
      ``rows`` where it has them.
    arrows: [I, N] the same layer and module's arrows (the library's layout), or with
      ``layer`` the whole stack [L, I, N]: without ``sketch.rows`` the pool's arrows are
      gathered from it in place (no copy of the layer's [I, N]).
    x: [B, T, I] the module's input.
    allowed: [B, N] bool, the adapters each request may use.
    k: candidates; pool: P >= k adapters rescored exactly per token.
    layer: [] int32, the layer of a stacked ``arrows``.
  Returns:
    (vals [B, T, k] float32 |arrow . x|, -inf where fewer than k adapters are allowed;
    ids [B, T, k] int32 adapter ids, -1 there), ordered as the exact scan's top-k
    (score descending, then lower id first).
  """
  n = arrows.shape[-1]
  if not k <= pool:
    raise ValueError(f"arrow sketch: pool {pool} must be >= k {k}")
  p = min(pool, n)
  approx = jnp.abs(
    jnp.einsum(
      "btd,dn->btn",
      jnp.einsum("bti,id->btd", x, sketch.basis.astype(x.dtype)),
      sketch.sketch.astype(x.dtype),
      preferred_element_type=jnp.float32,
    )
  )
  approx = jnp.where(allowed[:, None, :], approx, -jnp.inf)
  _, ids = jax.lax.top_k(approx, p)  # [B, T, P]
  ok = jnp.take_along_axis(allowed[:, None, :], ids, axis=2)
  # [B, T, P, I]: the pool's arrows
  if sketch.rows is not None:
    rows = sketch.rows[ids].astype(x.dtype)
  else:
    rows = (arrows.T[ids] if layer is None else arrows[layer, :, ids]).astype(x.dtype)
  exact = jnp.abs(jnp.einsum("btpi,bti->btp", rows, x, preferred_element_type=jnp.float32))
  exact = jnp.where(ok, exact, -jnp.inf)
  vals, ids = jax.lax.sort((-exact, ids), dimension=-1, num_keys=2)  # score desc, id asc
  vals, ids = -vals[..., :k], ids[..., :k]
  if k > p:  # fewer adapters than k
    pad = ((0, 0), (0, 0), (0, k - p))
    vals = jnp.pad(vals, pad, constant_values=-jnp.inf)
    ids = jnp.pad(ids, pad, constant_values=-1)
  ids = jnp.where(jnp.isfinite(vals), ids, -1)
  return vals, ids.astype(jnp.int32)


def numbers_read(n: int, i: int, dims: int, pool: int) -> float:
  """Numbers a token reads per module (the basis I Z, the sketch N Z, the pool's arrows
  P I), as a share of the exact scan's N I."""
  return (i * dims + n * dims + min(pool, n) * i) / (n * i)
