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

**Calibrated sketch.** The plain sketch keeps the directions that hold the most of the
arrows' energy, whatever the inputs do there. But a score's error is the arrow's part
outside the sketch dotted with the input, and the module inputs of a language model are
far from isotropic. Given the second moment C = E[x x^T] of a module's inputs over some
calibration text (``build_sketch(..., moment=C)``; ``calibration.input_moments``), the
sketch instead keeps the Z leading left singular vectors U of C^(1/2) arrows, which
minimise the expected squared score error over such inputs, and scores
(x C^(-1/2) U) (U^T C^(1/2) arrows): the same N Z numbers per token. The calibration
text needs nothing of the adapters' data (the default is real FanOutQA questions and
Wikipedia sentences in the task prompts); on the N = 1,000 knowledge library it raised
the recall of the exact top 20 at Z = 64, P = 320 from 98.2% to 99.3% (ridge 10, the
default; ``RIDGE`` below) and cut the pool 99% recall needs from 458 to 288
(BENCHMARKS.md, "Arrow filter").

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

  # [I, Z] the input's map into the sketch: the arrows' leading directions
  # (orthonormal columns), or C^(-1/2) U for a calibrated sketch
  basis: jax.Array
  sketch: jax.Array  # [Z, N]: basis^T arrows, or U^T C^(1/2) arrows (calibrated)
  rows: jax.Array | None = None  # [N, I] the arrows adapter-major (the pool's gather)

  @property
  def dims(self) -> int:
    return self.basis.shape[-1]


# A calibrated sketch whitens by C + ridge tr(C) / I: directions the calibration inputs
# never reached keep weight instead of an infinite inverse, and a larger ridge leans
# toward the plain sketch. On the N = 1,000 library a ridge of 10^-3 (the first runs')
# found more of the exact top 20 on the prompts' template tokens but fewer on the
# entity tokens, which the generic prompts never show (97.2% against the plain
# sketch's 99.0% at Z = 64, P = 320); 10 keeps the entity tokens' 99.0% and most of the
# gain elsewhere (99.4% against 98.1%; BENCHMARKS.md, "Arrow filter").
RIDGE = 10.0


def whitening(moment: np.ndarray, name: str, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
  """C^(1/2) and C^(-1/2) of a ridged second moment [I, I] (float64)."""
  c = np.asarray(moment, np.float64)
  if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.all(np.isfinite(c)):
    raise ValueError(f"{name}: the input moment must be a finite square [I, I] matrix")
  c = (c + c.T) / 2
  i = c.shape[0]
  scale = np.trace(c) / i
  if not scale > 0:
    raise ValueError(f"{name}: the input moment is zero (no calibration tokens reached it)")
  if not ridge > 0:
    raise ValueError(f"{name}: the ridge must be > 0, got {ridge}")
  w, v = np.linalg.eigh(c + ridge * scale * np.eye(i))
  w = np.clip(w, ridge * scale * 1e-3, None)  # a moment that is not quite PSD
  return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def build_sketch(
  arrows: np.ndarray,
  dims: int,
  rows_dtype: str | None = "float32",
  moment: np.ndarray | None = None,
  ridge: float = RIDGE,
) -> ArrowSketch:
  """The Z = ``dims`` leading directions of arrows [I, N] (at most min(I, N)), and the
  arrows adapter-major in ``rows_dtype`` (float32, bfloat16, or None: no copy). With
  ``moment`` [I, I], the second moment of the module's inputs, the directions are those
  of C^(1/2) arrows (a calibrated sketch, module docstring), C ridged by ``ridge``
  tr(C) / I."""
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
  if moment is not None:
    if np.shape(moment) != (i, i):
      raise ValueError(
        f"build_sketch: the input moment is {np.shape(moment)}, the arrows' input width {i}"
      )
    half, inv_half = whitening(moment, "build_sketch", ridge)
    a64 = half @ a64
  if n > i:
    # The top eigenvectors of the [I, I] Gram matrix: the same leading directions as
    # the SVD's, from one matmul (N = 10^5 arrows of I = 1,536: seconds, not minutes).
    # float64 keeps the squared spectrum's small end well above rounding.
    w, v = np.linalg.eigh(a64 @ a64.T)
    u = v[:, np.argsort(w)[::-1][:d]]
  else:
    u = np.linalg.svd(a64, full_matrices=False)[0][:, :d]
  rows = None if rows_dtype is None else np.ascontiguousarray(a.T).astype(jnp.dtype(rows_dtype))
  if moment is None:
    u = u.astype(np.float32)
    return ArrowSketch(basis=u, sketch=u.T @ a, rows=rows)
  basis = (inv_half @ u).astype(np.float32)
  return ArrowSketch(basis=basis, sketch=(u.T @ a64).astype(np.float32), rows=rows)


def sketch_layers(
  arrows: dict,
  dims: int,
  rows_dtype: str | None = "float32",
  moments: dict | None = None,
  ridge: float | None = None,
) -> dict:
  """Per module, every layer's sketch stacked (leading L axis): arrows module -> [L, I, N];
  ``moments`` (calibrated): module -> [L, I, I], its inputs' second moment per layer,
  ridged by ``ridge`` (None: ``RIDGE``)."""
  ridge = RIDGE if ridge is None else ridge
  moments = moments or {}
  missing = sorted(set(arrows) - set(moments))
  if moments and missing:
    raise ValueError(f"arrow sketch: the calibration has no input moments for {missing}")
  out = {}
  for m, a in arrows.items():
    a = np.asarray(a)
    c = None if m not in moments else np.asarray(moments[m])
    if c is not None and c.shape != (a.shape[0], a.shape[1], a.shape[1]):
      raise ValueError(
        f"arrow sketch: module {m!r}'s input moments are {c.shape}, "
        f"expected {(a.shape[0], a.shape[1], a.shape[1])} (layers, input width twice)"
      )
    per = [
      build_sketch(layer, dims, rows_dtype, None if c is None else c[j], ridge)
      for j, layer in enumerate(a)
    ]
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
