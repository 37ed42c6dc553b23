"""Shared-component removal: route on what tells adapters apart (data-free).

Adapters trained with one recipe on one base model share input directions that
carry no knowledge of their own (the chat template, the recipe's own drift). The
routing scores read adapters only through A* x, so a shared direction adds the same
amount to every adapter's score and drowns the differences. Here, per layer and
module, S shared input directions W [I, S] are found from the library's factors
alone, and routing sees each adapter with them projected out, P = 1 - W W^T:

  arrows    the top right singular vector of B*_i A*_i P (recomputed)
  SpectR    ||A*_i P x|| (the routers project x; ``routers.routing_input``)
  applied   B*_i A*_i x, unchanged: only the choice of adapter changes.

Two ways to find W (``mode``):

  mean  the top S right singular vectors of the library's mean adapter
        (1/N) sum_i B*_i A*_i: what "subtract the mean adapter" removes from the
        input side.
  top   the top S eigenvectors of G = sum_i A*_i^T diag(s_i / s_i1)^2 A*_i: the
        directions that the most adapters read (each adapter counts once, its
        directions by their relative singular values). G's eigenvalue over N is
        the share of the library that reads a direction (``shared_report``).

Shapes: L layers, N adapters, R rank, I input, O output width, S directions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lag_jax.errors import ConfigError

MODES = ("none", "mean", "top")


def parse_mode(spec: str) -> tuple[str, int]:
  """'none' | 'mean:S' | 'top:S' (S >= 1; 'mean' / 'top' alone mean S = 1)."""
  head, _, count = (spec or "none").partition(":")
  if head not in MODES:
    raise ConfigError(f"shared_removal {spec!r}: mode {head!r} is not one of {MODES}")
  if head == "none":
    if count:
      raise ConfigError(f"shared_removal {spec!r}: 'none' takes no count")
    return "none", 0
  try:
    s = int(count or 1)
  except ValueError:
    raise ConfigError(f"shared_removal {spec!r}: the count after ':' must be an integer") from None
  if s < 1:
    raise ConfigError(f"shared_removal {spec!r}: the count must be >= 1")
  return head, s


@jax.jit
def _mean_gram(a, b, w):
  """Right Gram M^T M of the mean adapter M = sum_n w_n B*_n A*_n: a [N, R, I],
  b [N, O, R], w [N] -> [I, I] (M formed once as one [O, N R] x [N R, I] matmul)."""
  N, R, I = a.shape
  bw = (b * w[:, None, None]).transpose(1, 0, 2).reshape(-1, N * R)  # [O, N R]
  m = bw @ a.reshape(N * R, I)
  return m.T @ m


@jax.jit
def _share_gram(a, b, w):
  """G = sum_n w_n A*_n^T diag(s_n / s_n1)^2 A*_n: [I, I] (s from B* = U S)."""
  s = jnp.linalg.norm(b, axis=1)  # [N, R]
  rel = s / jnp.maximum(s[:, :1], 1e-30)
  N, R, I = a.shape
  ar = (a * (rel * jnp.sqrt(w)[:, None])[..., None]).reshape(N * R, I)
  return ar.T @ ar


@jax.jit
def _top_eig(g):
  """Eigenvalues (descending) and eigenvectors [I, I] as columns of a PSD matrix."""
  vals, vecs = jnp.linalg.eigh(g)
  return vals[::-1], vecs[:, ::-1]


@jax.jit
def _residual_arrows(a, b, w_dirs):
  """Arrows of B*_n A*_n P (P = 1 - W W^T): a [N, R, I], b [N, O, R], w_dirs [I, S]
  -> [I, N] (unit columns, zero where nothing is left), canonical signs.

  B* = U S with orthonormal U, so the right singular vectors of B* A* P are those of
  S A* P [R, I]: the top eigenvector e of its R x R Gram gives the arrow (S A* P)^T e.
  """
  s = jnp.linalg.norm(b, axis=1)  # [N, R]
  ap = a - jnp.einsum("nrs,is->nri", jnp.einsum("nri,is->nrs", a, w_dirs), w_dirs)
  k = ap * s[..., None]
  gram = jnp.einsum("nri,nqi->nrq", k, k)
  _, vecs = jnp.linalg.eigh(gram)
  top = vecs[..., -1]  # [N, R]
  arrow = jnp.einsum("nr,nri->ni", top, k)
  norm = jnp.linalg.norm(arrow, axis=-1, keepdims=True)
  tiny = norm <= 1e-6 * jnp.maximum(
    jnp.max(jnp.linalg.norm(k, axis=-1), axis=-1, keepdims=True), 1e-30
  )
  arrow = jnp.where(tiny, 0.0, arrow / jnp.maximum(norm, 1e-30))
  pivot = jnp.take_along_axis(arrow, jnp.argmax(jnp.abs(arrow), axis=-1)[:, None], axis=-1)
  return (arrow * jnp.where(pivot < 0, -1.0, 1.0)).T


@dataclasses.dataclass(frozen=True)
class SharedReport:
  """What was removed, per module: eig [L, S'] the leading eigenvalues of the chosen
  Gram (``top``: divided by the adapters counted, i.e. the share of the library that
  reads each direction; ``mean``: the mean adapter's squared singular values)."""

  mode: str
  count: int
  leading: dict[str, np.ndarray]


def remove_shared(library, spec: str, among=None):
  """The library with shared input directions removed from its routing signatures.

  Args:
    library: an ``AdapterLibrary`` (resident).
    spec: 'none' | 'mean:S' | 'top:S' (``parse_mode``).
    among: [N] bool, the adapters the directions are computed from (default all
      valid ones): e.g. the part of a library that a run's requests may use.
  Returns:
    (library, SharedReport): for 'none' the library unchanged; else a library whose
    arrows are the residual adapters' arrows and whose weights carry ``shared``
    (module -> [L, I, S] directions) for the routers' SpectR norms. A*, B* (what is
    applied) are the original ones.
  """
  mode, count = parse_mode(spec)
  if mode == "none":
    return library, SharedReport(mode, 0, {})
  if library.weights.shared is not None:
    raise ValueError("remove_shared: this library already has shared directions removed")
  w = library.weights
  N = len(library)
  among = np.ones(N, bool) if among is None else np.asarray(among, bool)
  if among.shape != (N,):
    raise ValueError(f"remove_shared: among has shape {among.shape}, expected ({N},)")
  arrows, shared, leading = {}, {}, {}
  for m in library.modules:
    L, _, _, I = w.a[m].shape
    if count >= I:
      raise ValueError(f"remove_shared {spec!r}: module {m} has only {I} input dims")
    dirs = np.zeros((L, I, count), np.float32)
    new_arrows = np.zeros((L, I, N), np.float32)
    lead = np.zeros((L, min(count + 4, I)), np.float32)
    for layer in range(L):
      a = jnp.asarray(w.a[m][layer], jnp.float32)
      b = jnp.asarray(w.b[m][layer], jnp.float32)
      use = among & np.asarray(w.valid[m][layer], bool)
      weight = jnp.asarray(use, jnp.float32) / max(int(use.sum()), 1)
      gram = (_mean_gram if mode == "mean" else _share_gram)(a, b, weight)
      vals, vecs = _top_eig(gram)
      dirs[layer] = np.asarray(vecs[:, :count])
      lead[layer] = np.asarray(vals[: lead.shape[1]])
      new_arrows[layer] = np.asarray(_residual_arrows(a, b, vecs[:, :count]))
    arrows[m] = jnp.asarray(new_arrows, w.arrows[m].dtype)
    shared[m] = jnp.asarray(dirs)
    leading[m] = lead
  weights = w.replace(arrows=arrows, shared=shared)
  return dataclasses.replace(library, weights=weights), SharedReport(mode, count, leading)
