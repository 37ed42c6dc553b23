"""A sublinear arrow index: score cluster centroids, then scan only the best clusters.

Arrow's filter reads every adapter's arrow for every token (the n*h term of the cost
model): at N = 10^5 that is the whole decode step. The index clusters one layer and
module's arrows and, per token, scans only the members of the ``probe`` clusters whose
centroids score highest; probing every cluster gives the exact top-k.

Sign invariance: an arrow's sign is arbitrary (|arrow . x| is what routes), so +a and -a
belong together. Clustering is spherical k-means on the axis each arrow spans: an arrow
joins the centroid c with the largest |a . c|, and a centroid is the top eigenvector of
its members' sum of a a^T (one power iteration per round, from the previous centroid).
Clusters are capped at ``capacity`` members (static shapes for the TPU: every cluster is
a padded block), assigned greedily by affinity. With ``spill`` = 2 an arrow also joins its
second-best cluster (twice the members' bytes), which recovers arrows that sit between
two clusters; the search drops the duplicate candidates.

How many clusters: a token reads J centroids and ``probe`` blocks of W ~ f N / J members
(f the capacity factor), J + probe f N / J rows, least at J = sqrt(probe f N)
(``default_clusters``): about 1,100 at N = 10^5 with probe 8, which reads 2.2% of the
arrows. Fewer, larger clusters (J = sqrt(N)) read more and find less: a centroid stands
for a cluster's members only as well as one direction can stand for all of them.

Arrays, per layer and module (leading L axis in a library):
  centroids [J, I] unit vectors; members [J, W] int32 adapter ids (-1: padding);
  member_arrows [J, W, I] the members' arrows in cluster order (what a probe reads).
Shape letters as docs/method.md: B batch, T tokens, I input width, N adapters,
J clusters, W members per cluster (capacity); ``probe`` clusters are scanned per token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_NEG = -jnp.inf


@struct.dataclass
class ArrowIndex:
  """One layer and module's index (or stacked over layers with a leading L axis)."""

  centroids: jax.Array  # [J, I]
  members: jax.Array  # [J, W] int32, -1 padding
  # [J, W, I] float32, int8, or uint16: bfloat16 arrows held as their bit patterns
  # (XLA:CPU converts a bfloat16 array read in a loop to float32 whole, at every call).
  member_arrows: jax.Array
  member_scales: jax.Array | None = None  # [J, W] float32 with int8 arrows

  @property
  def clusters(self) -> int:
    return self.members.shape[-2]

  @property
  def capacity(self) -> int:
    return self.members.shape[-1]


def default_clusters(n: int, probe: int = 8, capacity_factor: float = 1.5) -> int:
  """J = sqrt(probe * capacity_factor * N), at most N: the fewest rows a token reads
  (J centroids + probe clusters of capacity_factor * N / J members)."""
  return max(1, min(n, int(round(math.sqrt(probe * capacity_factor * n)))))


def build_index(
  arrows: np.ndarray,
  valid: np.ndarray | None = None,
  clusters: int | None = None,
  *,
  capacity: int | None = None,
  capacity_factor: float = 1.5,
  rounds: int = 25,
  seed: int = 0,
  arrow_dtype: str = "float32",
  spill: int = 1,
) -> ArrowIndex:
  """Clusters the arrows of one layer and module.

  Args:
    arrows: [I, N] (the library's layout: one arrow per column).
    valid: [N] bool; invalid adapters (all-zero here) join no cluster.
    clusters: J (default ``default_clusters(N)``, for probe 8).
    capacity: members at most per cluster and pass (default ceil(capacity_factor * N /
      J); a library's layers share one so that they stack); W = spill * capacity.
    capacity_factor: see capacity.
    rounds: k-means rounds at most (it stops when under 0.1% of the arrows move; 8
      rounds left N = 10^5 unconverged: 97-99% recall by seed, against 99.7% at 20).
    seed: the initial centroids' draw.
    arrow_dtype: how the members' arrows are stored, i.e. what a probe reads:
      "float32", "bfloat16" (half the bytes) or "int8" (a quarter, with one float32
      scale per arrow: max |a| / 127).
    spill: 1 or 2, the clusters each arrow joins (its best ones, distinct).
  Returns:
    The ArrowIndex (numpy-backed; jnp.asarray it or stack it as needed).
  """
  a = np.asarray(arrows, np.float32).T  # [N, I]
  n, dim = a.shape
  ok = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  ids = np.flatnonzero(ok)
  g = clusters or default_clusters(len(ids) or 1)
  cap = capacity or max(1, math.ceil(capacity_factor * max(len(ids), 1) / g))
  if cap * g < len(ids):
    raise ValueError(f"build_index: {g} clusters of {cap} cannot hold {len(ids)} arrows")
  if spill not in (1, 2):
    raise ValueError(f"build_index: spill must be 1 or 2, got {spill}")
  if spill > g:
    raise ValueError(f"build_index: spill {spill} needs at least {spill} clusters, got {g}")
  x = a[ids]
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x / np.maximum(norms, 1e-12)
  rng = np.random.default_rng(seed)
  # Initial centroids: g distinct arrows (random unit vectors for clusters beyond the
  # arrows a layer has: they stay empty).
  cent = rng.standard_normal((g, dim)).astype(np.float32)
  cent /= np.linalg.norm(cent, axis=1, keepdims=True)
  take = min(g, len(x))
  cent[:take] = x[rng.choice(len(x), take, replace=False)]
  previous = None
  for _ in range(rounds):
    assign = _balanced_assign(np.abs(x @ cent.T), cap)
    if previous is not None and np.mean(assign != previous) < 1e-3:
      break  # converged: under 0.1% of the arrows moved
    previous = assign
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(g + 1))
    for c in range(g):
      mem = x[order[bounds[c] : bounds[c + 1]]]
      if not len(mem):
        continue
      # Top eigenvector of sum a a^T, one power step from the current centroid.
      v = mem.T @ (mem @ cent[c])
      nv = np.linalg.norm(v)
      cent[c] = v / nv if nv > 1e-12 else mem[0]
  affinity = np.abs(x @ cent.T)
  passes = [_balanced_assign(affinity, cap)]
  if spill == 2:  # the second-best cluster: the first is taken out of the running
    affinity[np.arange(len(x)), passes[0]] = -np.inf
    passes.append(_balanced_assign(affinity, cap))
  assign = np.concatenate(passes)
  who = np.tile(ids, spill)
  order = np.lexsort((who, assign))  # by cluster, then by id (the search's tie order)
  counts = np.bincount(assign, minlength=g)
  width = cap * spill
  members = np.full((g, width), -1, np.int32)
  slot = np.arange(len(assign)) - np.repeat(np.cumsum(counts) - counts, counts)
  members[assign[order], slot] = who[order]
  member_arrows = np.where(members[..., None] >= 0, a[np.maximum(members, 0)], 0.0)
  member_arrows, scales = quantize(member_arrows.astype(np.float32), arrow_dtype)
  return ArrowIndex(
    centroids=cent.astype(np.float32),
    members=members,
    member_arrows=member_arrows,
    member_scales=scales,
  )


def index_layers(
  arrows: dict,
  valid: dict,
  clusters: int | None = None,
  *,
  probe: int = 8,
  capacity_factor: float = 1.5,
  spill: int = 1,
  seed: int = 0,
  arrow_dtype: str = "float32",
) -> dict:
  """A library's index: per module, every layer's ArrowIndex stacked (leading L axis).

  Args:
    arrows: module -> [L, I, N] arrows; valid: module -> [L, N] bool.
    clusters: J for every layer and module (default ``default_clusters(N, probe)``).
    probe, capacity_factor, spill, seed, arrow_dtype: as ``build_index`` (probe: the
      probe the default J is sized for). All layers share J and the capacity, so they stack.
  """
  out = {}
  for m, a in arrows.items():
    a = np.asarray(a)
    ok = np.asarray(valid[m])
    n = a.shape[-1]
    g = min(clusters or default_clusters(n, probe, capacity_factor), n)
    cap = max(1, math.ceil(capacity_factor * n / g))
    per = [
      build_index(a[i], ok[i], g, capacity=cap, seed=seed, arrow_dtype=arrow_dtype, spill=spill)
      for i in range(a.shape[0])
    ]
    out[m] = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *per)
  return out


ARROW_DTYPES = ("float32", "bfloat16", "int8")


def quantize(arrows: np.ndarray, dtype: str):
  """(stored arrows, per-arrow scales or None) of float32 arrows [..., I]."""
  if dtype == "float32":
    return arrows, None
  if dtype == "bfloat16":  # stored as bit patterns, read back by _decode
    return np.asarray(arrows.astype(jnp.bfloat16)).view(np.uint16), None
  if dtype == "int8":
    scale = np.abs(arrows).max(axis=-1) / 127.0
    q = np.round(arrows / np.maximum(scale, 1e-30)[..., None])
    return np.clip(q, -127, 127).astype(np.int8), scale.astype(np.float32)
  raise ValueError(f"arrow_dtype {dtype!r}: choose from {ARROW_DTYPES}")


def _balanced_assign(affinity: np.ndarray, cap: int, first: int = 8) -> np.ndarray:
  """Each row to its best column with room (capacity ``cap``), strongest pairs first.

  Rows look at their ``first`` best columns; only a row that finds them all full ranks
  the rest (a full argsort of [N, J] would dominate the build at N = 10^5)."""
  n, g = affinity.shape
  f = min(first, g)
  top = np.argpartition(-affinity, f - 1, axis=1)[:, :f] if f < g else np.tile(np.arange(g), (n, 1))
  top = np.take_along_axis(top, np.argsort(-np.take_along_axis(affinity, top, 1), axis=1), 1)
  best = affinity[np.arange(n), top[:, 0]]
  assign = np.full(n, -1, np.int64)
  load = np.zeros(g, np.int64)
  for i in np.argsort(-best, kind="stable"):
    for c in top[i]:
      if load[c] < cap and affinity[i, c] > -np.inf:  # -inf: a column ruled out
        break
    else:
      room = [c for c in np.argsort(-affinity[i], kind="stable") if load[c] < cap]
      room = [c for c in room if affinity[i, c] > -np.inf]
      if not room:
        raise ValueError(f"build_index: no cluster has room for arrow {i} (capacity {cap})")
      c = room[0]
    assign[i] = c
    load[c] += 1
  return assign


def pays_off(index: ArrowIndex, tokens: int, probe: int, n: int) -> bool:
  """Whether probing reads fewer arrows than the exact scan: a request's ``tokens`` (T
  of this call) times ``probe`` clusters of W members against N. Decode steps (T = 1)
  probe; a prefill of many tokens reads each token's clusters separately, which costs
  more than one dense scan, and scans exactly (never less accurate). Per request, not
  per batch: which tokens a request routes through the index does not depend on the
  requests batched with it."""
  J, W = index.members.shape[-2:]
  return tokens * min(probe, J) * W < n


def _decode(arrows: jax.Array, dtype) -> jax.Array:
  """Stored arrows (float32, int8, or bfloat16 bit patterns in uint16) as ``dtype``."""
  if arrows.dtype == jnp.uint16:
    arrows = jax.lax.bitcast_convert_type(arrows, jnp.bfloat16)
  return arrows.astype(dtype)


def _block_scores(blocks: jax.Array, x: jax.Array, top_c: jax.Array, method: str):
  """[B, T, P, W] float32 arrow . x over each token's probed blocks ([J, W, I])."""
  if method == "gather":
    return jnp.einsum(
      "btpwi,bti->btpw", _decode(blocks[top_c], x.dtype), x, preferred_element_type=jnp.float32
    )
  B, T, P = top_c.shape
  J, W, I = blocks.shape
  which = top_c.reshape(B * T * P)
  xs = jnp.repeat(x.reshape(B * T, I), P, axis=0)  # each (token, probe)'s input

  def body(j, out):
    block = jax.lax.dynamic_index_in_dim(blocks, which[j], 0, keepdims=False)  # [W, I]
    score = jnp.dot(_decode(block, x.dtype), xs[j], preferred_element_type=jnp.float32)
    return out.at[j].set(score)

  out = jax.lax.fori_loop(0, B * T * P, body, jnp.zeros((B * T * P, W), jnp.float32))
  return out.reshape(B, T, P, W)


SEARCH_METHODS = ("auto", "gather", "loop")


def search(
  index: ArrowIndex, x: jax.Array, allowed: jax.Array, k: int, probe: int, method: str = "auto"
):
  """The top-k arrow scores among the members of each token's ``probe`` best clusters.

  Args:
    index: one layer and module's ArrowIndex.
    x: [B, T, I] the module's input.
    allowed: [B, N] bool, the adapters each request may use.
    k: candidates.
    probe: P clusters scanned per token (all of them: the exact top-k).
    method: how the probed blocks are read. "gather" copies every token's P blocks into
      one [B, T, P, W, I] array and contracts it in one einsum (one batched op: the
      accelerator form); "loop" reads the blocks one at a time in a loop, each
      contracted where it lies (XLA:CPU materialises a gather, three passes over the
      bytes: 6x faster at B = 16 here). "auto": loop on CPU, gather elsewhere.
  Returns:
    (vals [B, T, k] float32 |arrow . x|, -inf where fewer than k allowed members were
    scanned; ids [B, T, k] int32 adapter ids, -1 there). Exact ties: the lower id first.
  """
  if method not in SEARCH_METHODS:
    raise ValueError(f"search: method {method!r}, choose from {SEARCH_METHODS}")
  if method == "auto":
    method = "loop" if jax.default_backend() == "cpu" else "gather"
  J, W = index.members.shape
  P = min(probe, J)
  cs = jnp.abs(
    jnp.einsum(
      "bti,ji->btj", x, index.centroids.astype(x.dtype), preferred_element_type=jnp.float32
    )
  )
  _, top_c = jax.lax.top_k(cs, P)  # [B, T, probe]
  ids = index.members[top_c]  # [B, T, probe, W]
  s = jnp.abs(_block_scores(index.member_arrows, x, top_c, method))  # [B, T, probe, W]
  if index.member_scales is not None:  # int8 arrows: one scale per arrow
    s = s * index.member_scales[top_c]
  B, T = x.shape[:2]
  ids = ids.reshape(B, T, P * W)
  s = s.reshape(B, T, P * W)
  ok = (ids >= 0) & jnp.take_along_axis(
    allowed[:, None, :], jnp.clip(ids, 0, allowed.shape[-1] - 1), axis=2
  )
  s = jnp.where(ok, s, _NEG)
  # The best 2k in one top-k (a spilled arrow's two copies both fit), ordered by (score
  # desc, id asc) with a sort of those 2k only (sorting all P W candidates by id cost
  # as much as the probe at B = 16), copies dropped, then the best k: the exact scan's
  # order. (An exact tie at the k-th score among more than 2k candidates would be
  # broken by cluster order, not id: only identical arrows tie exactly.)
  window = min(2 * k, P * W)
  vals, pos = jax.lax.top_k(s, window)
  ids = jnp.take_along_axis(ids, pos, axis=-1)
  vals, ids = jax.lax.sort((-vals, ids), dimension=-1, num_keys=2)
  vals = -vals
  repeat = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], -1)
  vals = jnp.where(repeat & (ids >= 0), _NEG, vals)
  if k > window:  # fewer slots than candidates: pad with nothing
    pad = ((0, 0), (0, 0), (0, k - window))
    vals, ids = jnp.pad(vals, pad, constant_values=_NEG), jnp.pad(ids, pad, constant_values=-1)
  vals, pos = jax.lax.top_k(vals, k)  # stable: equal scores stay in id order
  out = jnp.take_along_axis(ids, pos, axis=-1)
  out = jnp.where(jnp.isfinite(vals), out, -1)
  return vals, out.astype(jnp.int32)
