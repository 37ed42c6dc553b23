"""Shared-component removal: route on what tells adapters apart (data-free).

Adapters trained with one recipe on one base model share input directions that
carry no knowledge of their own (the chat template, the recipe's own drift). The
routing scores read adapters only through A* x, so a shared direction adds the same
amount to every adapter's score and drowns the differences. Here, per layer and
module, Q shared input directions W [I, Q] are found from the library's factors
alone, and routing sees each adapter with them projected out, P = 1 - W W^T:

  arrows    the top right singular vector of B*_i A*_i P (recomputed)
  SpectR    ||A*_i P x|| (the routers project x; ``routers.routing_input``)
  applied   B*_i A*_i x, unchanged: only the choice of adapter changes.

Two ways to find W (``mode``):

  mean  the top Q right singular vectors of the library's mean adapter
        (1/N) sum_i B*_i A*_i: what "subtract the mean adapter" removes from the
        input side.
  top   the top Q eigenvectors of G = sum_i A*_i^T diag(s_i / s_i1)^2 A*_i: the
        directions that the most adapters read (each adapter counts once, its
        directions by their relative singular values). G's eigenvalue over N is
        the share of the library that reads a direction (``shared_report``).

Shapes (docs/method.md): L layers, N adapters, R rank, I input, O output width, Q
directions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lag_jax.errors import ConfigError

MODES = ("none", "mean", "top")


def parse_mode(spec: str) -> tuple[str, int]:
  """'none' | 'mean:Q' | 'top:Q' (Q >= 1; 'mean' / 'top' alone mean Q = 1)."""
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
def _mean_part(a, b, w):
  """A part of the mean adapter M = sum_n w_n B*_n A*_n: a [n, R, I], b [n, O, R],
  w [n] -> [O, I] (formed as one [O, n R] x [n R, I] matmul). Parts add up."""
  N, R, I = a.shape
  bw = (b * w[:, None, None]).transpose(1, 0, 2).reshape(-1, N * R)  # [O, n R]
  return bw @ a.reshape(N * R, I)


@jax.jit
def _share_part(a, b, w):
  """A part of G = sum_n w_n A*_n^T diag(s_n / s_n1)^2 A*_n: [I, I] (s from B* = U S).
  Parts add up."""
  s = jnp.linalg.norm(b, axis=1)  # [n, R]
  rel = s / jnp.maximum(s[:, :1], 1e-30)
  N, R, I = a.shape
  ar = (a * (rel * jnp.sqrt(w)[:, None])[..., None]).reshape(N * R, I)
  return ar.T @ ar


def _part(mode: str):
  """The additive part of the chosen Gram over some adapters (sum the parts over any
  split of the library, then ``_gram``)."""
  return _mean_part if mode == "mean" else _share_part


def _gram(mode: str, total):
  """The Gram whose top eigenvectors are the shared directions, from the summed parts:
  the mean adapter's right Gram M^T M, or G itself."""
  return total.T @ total if mode == "mean" else total


@jax.jit
def _top_eig(g):
  """Eigenvalues (descending) and eigenvectors [I, I] as columns of a PSD matrix."""
  vals, vecs = jnp.linalg.eigh(g)
  return vals[::-1], vecs[:, ::-1]


@jax.jit
def _residual_arrows(a, b, w_dirs):
  """Arrows of B*_n A*_n P (P = 1 - W W^T): a [N, R, I], b [N, O, R], w_dirs [I, Q]
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
  """What was removed, per module: eig [L, Q'] the leading eigenvalues of the chosen
  Gram (``top``: divided by the adapters counted, i.e. the share of the library that
  reads each direction; ``mean``: the mean adapter's squared singular values)."""

  mode: str
  count: int
  leading: dict[str, np.ndarray]


def remove_shared(library, spec: str, among=None):
  """The library with shared input directions removed from its routing signatures.

  Args:
    library: an ``AdapterLibrary`` (resident), a ``ShardedLibrary`` (each device adds
      its adapters' part of the Gram; the sum crosses devices once per layer and module,
      [I, I] or [O, I], nothing proportional to N) or an ``OffloadedLibrary`` (the
      factors are streamed from the host or the files; with a folder the result is
      cached beside it under a fingerprint of the library).
    spec: 'none' | 'mean:Q' | 'top:Q' (``parse_mode``).
    among: [N] bool, the adapters the directions are computed from (default all
      valid ones): e.g. the part of a library that a run's requests may use.
  Returns:
    (library, SharedReport): for 'none' the library unchanged; else the same kind of
    library whose arrows are the residual adapters' arrows and which carries
    ``shared`` (module -> [L, I, Q] directions) for the routers' SpectR norms. A*, B*
    (what is applied) are the original ones.
  """
  mode, count = parse_mode(spec)
  if mode == "none":
    return library, SharedReport(mode, 0, {})
  offloaded = hasattr(library, "caches")  # lag_jax.routing.offload.OffloadedLibrary
  shared = library.shared if offloaded else library.weights.shared
  if shared is not None:
    raise ValueError("remove_shared: this library already has shared directions removed")
  N = len(library)
  among = np.ones(N, bool) if among is None else np.asarray(among, bool)
  if among.shape != (N,):
    raise ValueError(f"remove_shared: among has shape {among.shape}, expected ({N},)")
  if offloaded:
    from lag_jax.routing.offload import remove_shared_offloaded  # noqa: PLC0415 (cycle)

    return remove_shared_offloaded(library, mode, count, among)
  if getattr(library, "sharding", None) is not None:
    return _remove_sharded(library, mode, count, among)
  w = library.weights

  def factors(m, layer):
    return w.a[m][layer].astype(jnp.float32), w.b[m][layer].astype(jnp.float32)

  def part_sum(m, layer):
    weight = weights_of(among, np.asarray(w.valid[m][layer], bool))
    return _part(mode)(*factors(m, layer), weight)

  def residual(m, layer, top):
    return np.asarray(_residual_arrows(*factors(m, layer), top))

  found = solve(library.modules, _dims(w), mode, count, part_sum, residual)
  arrows = {m: jnp.asarray(np.stack(r), w.arrows[m].dtype) for m, (_, r, _) in found.items()}
  weights = w.replace(arrows=arrows, shared={m: jnp.asarray(d) for m, (d, _, _) in found.items()})
  return dataclasses.replace(library, weights=weights), _report(mode, count, found)


def solve(modules, dims, mode: str, count: int, part_sum, residual):
  """The removal, whatever holds the factors: per module and layer, the top ``count``
  eigenvectors of the Gram from its summed parts, and the residual arrows.

  Args:
    modules: the library's modules; dims: module -> (L, I).
    part_sum: (module, layer) -> the Gram's part summed over every adapter.
    residual: (module, layer, directions [I, Q]) -> that layer's residual arrows.
  Returns:
    module -> (directions [L, I, Q] numpy, the L layers' arrows, leading [L, Q']).
  """
  out = {}
  for m in modules:
    L, I = dims[m]
    if count >= I:
      raise ValueError(f"remove_shared {mode}:{count}: module {m} has only {I} input dims")
    dirs, arrows, lead = [], [], []
    for layer in range(L):
      vals, vecs = _top_eig(_gram(mode, part_sum(m, layer)))
      top = vecs[:, :count]
      dirs.append(np.asarray(top))
      lead.append(np.asarray(vals[: min(count + 4, I)]))
      arrows.append(residual(m, layer, top))
    out[m] = (np.stack(dirs).astype(np.float32), arrows, np.stack(lead))
  return out


def _dims(w) -> dict[str, tuple[int, int]]:
  return {m: (a.shape[0], a.shape[-1]) for m, a in w.a.items()}


def _report(mode, count, found) -> SharedReport:
  return SharedReport(mode, count, {m: lead for m, (_, _, lead) in found.items()})


def weights_of(among, valid):
  """Each counted adapter's weight 1 / (adapters counted): [n] float32."""
  use = among & valid
  return jnp.asarray(use, jnp.float32) / max(int(use.sum()), 1)


def _remove_sharded(library, mode: str, count: int, among):
  """``remove_shared`` on a library split over devices: per layer and module, each
  device's part of the Gram from its own adapters, summed by one psum ([I, I] or
  [O, I]); the residual arrows computed where the adapters live."""
  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

  from lag_jax import distributed  # noqa: PLC0415

  mesh, axis = library.sharding.mesh, library.sharding.axis
  among = np.pad(among, (0, library.padded_size - len(library)))
  P = PartitionSpec

  def on_shards(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

  part = on_shards(lambda a, b, w: jax.lax.psum(_part(mode)(a, b, w), axis), (P(axis),) * 3, P())
  residual_arrows = on_shards(_residual_arrows, (P(axis), P(axis), P()), P(None, axis))
  w = library.weights

  def factors(m, layer):
    return w.a[m][layer].astype(jnp.float32), w.b[m][layer].astype(jnp.float32)

  def part_sum(m, layer):
    weight = np.asarray(weights_of(among, np.asarray(w.valid[m][layer])))
    return part(*factors(m, layer), distributed.put(weight, NamedSharding(mesh, P(axis))))

  def residual(m, layer, top):
    return residual_arrows(*factors(m, layer), top).astype(w.arrows[m].dtype)

  found = solve(library.modules, _dims(w), mode, count, part_sum, residual)
  replicated = NamedSharding(mesh, P())
  weights = w.replace(
    arrows={
      m: jax.device_put(jnp.stack(r), w.arrows[m].sharding) for m, (_, r, _) in found.items()
    },
    shared={m: distributed.put(d, replicated) for m, (d, _, _) in found.items()},
  )
  return dataclasses.replace(library, weights=weights), _report(mode, count, found)
