"""The routing core: every router written once, over a placement of the factors.

A router sees one layer's slice of a library at one module and that module's input,
and returns the summed low-rank delta and, for telemetry, the adapter id it chose per
token. What differs between a library on one device, one split over devices and one
whose factors stay on the host is only *where A* and B* live*; that is a
``Placement`` (this module's ``Resident``; ``sharded.Sharded``; ``offload.Offloaded``),
a small strategy object that runs at trace time. The routers below are written once
in terms of its operations:

  top_k(values, k)      the global top-k of [..., n] local values (ids global): a
                        local lax.top_k, or local top-k + an all-gather of the k
                        (score, id) pairs + a global top-k
  merge(vals, ids, k)   the global top-k of candidates each place found itself
  a_rows / b_rows(ids)  the factors of adapters by global id: gathered, gathered
                        from the owner's shard, or fetched into the device cache
  owner(ids)            where this place holds an id's factors (None: everywhere)
  owner_max(v, ids)     a value the owner computed, everywhere (identity, or pmax)
  any / total           a flag / a sum over places (identity, or pmax / psum)
  scan(fn, carry)       a reduction over every adapter's factors: one chunk (the
                        whole library or shard), or chunks streamed from the host
  finish(delta)         the delta from every place's share (identity, or one psum)

Shape letters (``docs/method.md``): B requests, T tokens, I a module's input and O its
output width, R rank, N adapters of the library, n of them held here, C candidates per
token or request, M adapters a vote applies, L layers, Q shared input directions.

Ties go to the lower adapter id everywhere, so ``lag`` with k = 1 is ``arrow`` and
``lag`` with k = N is ``spectr``, selection for selection; adapters a request's mask
excludes, and invalid (all-zero) adapters, are never chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -jnp.inf


# --- Shared arithmetic ---------------------------------------------------------------


def argmax_low_id(values: jax.Array, ids: jax.Array) -> jax.Array:
  """Index (along the last axis) of the max value; ties go to the lower id."""
  best = jnp.max(values, axis=-1, keepdims=True)
  big = jnp.iinfo(jnp.int32).max
  tied = jnp.where(values == best, ids, big)
  return jnp.argmin(tied, axis=-1)


def gather_adapters(a: jax.Array, ids: jax.Array) -> jax.Array:
  """a[ids] for a [n, R, I] and ids [...] -> [..., R, I], as one row gather of A*
  viewed as [n * R, I] rows (ids clipped into range)."""
  n, R, I = a.shape
  rows = ids[..., None] * R + jnp.arange(R, dtype=ids.dtype)  # [..., R]
  return jnp.take(a.reshape(n * R, I), rows, axis=0, mode="clip")


def project_all(x: jax.Array, a: jax.Array) -> jax.Array:
  """A*_n x for every adapter: x [B, T, I], a [n, R, I] -> [B, T, n, R].

  One [B*T, I] x [I, n*R] matmul over A* as stored (rows contiguous); contracting the
  4-D 'nri' form made XLA:CPU transpose the whole library first (BENCHMARKS.md, profile).
  """
  n, R, I = a.shape
  z = jnp.einsum("bti,ji->btj", x, a.reshape(n * R, I).astype(x.dtype))
  return z.reshape(*x.shape[:2], n, R)


def contract(x: jax.Array, rows: jax.Array) -> jax.Array:
  """A* x for gathered rows: per token [B, T, C, R, I] or per request [B, C, R, I]
  -> [B, T, C, R].

  The rows are contracted as one flat [C*R, I] matrix per token (or request): the 5-D
  einsum 'bti,btcri->btcr' made XLA:CPU several times slower (BENCHMARKS.md, profile).
  """
  B, T = x.shape[:2]
  C, R, I = rows.shape[-3:]
  flat = rows.astype(x.dtype).reshape(*rows.shape[:-3], C * R, I)
  spec = "bti,bji->btj" if rows.ndim == 4 else "bti,btji->btj"
  return jnp.einsum(spec, x, flat).reshape(B, T, C, R)


def project_grouped(x: jax.Array, a: jax.Array, cand: jax.Array) -> jax.Array:
  """A*_c x for each token's candidates by one grouped matmul: [B, T, C, R].

  The B*T*C (token, candidate) pairs are sorted by adapter id, so each adapter's
  rows are read once and multiplied with the tokens that chose it as a candidate.
  """
  B, T, I = x.shape
  C = cand.shape[-1]
  n = a.shape[0]
  ids = cand.reshape(-1)
  order = jnp.argsort(ids, stable=True)
  lhs = x.reshape(B * T, I)[order // C]  # [B*T*C, I], grouped by adapter
  sizes = jnp.bincount(ids, length=n).astype(jnp.int32)
  dims = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
  )
  z_sorted = jax.lax.ragged_dot_general(lhs, a.astype(x.dtype), sizes, dims)
  z = jnp.zeros_like(z_sorted).at[order].set(z_sorted)
  return z.reshape(B, T, C, -1)


def auto_projection(pairs: int, n: int) -> str:
  """gather when the (token, candidate) pairs are fewer than the adapters held (decode);
  else the grouped matmul on TPU, which lowers ragged_dot to a grouped-matmul kernel
  (the SGMV pattern), and the dense projection elsewhere (XLA:CPU lowers ragged_dot
  densely: hundreds of times slower than dense, BENCHMARKS.md)."""
  if n > pairs:
    return "gather"
  return "grouped" if jax.default_backend() == "tpu" else "dense"


def remove_directions(x: jax.Array, shared: jax.Array | None) -> jax.Array:
  """What the SpectR norms see: x [B, T, I] with the shared directions [I, Q]
  projected out (x itself when there are none; ``routing/shared.py``)."""
  if shared is None:
    return x
  w = shared.astype(x.dtype)
  return x - jnp.einsum("btq,iq->bti", jnp.einsum("bti,iq->btq", x, w), w)


def margin(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Relative gap (best - second) / best of [..., C] values where ``valid``; 1 where
  fewer than two are valid (nothing to confuse), 0 where the best is 0."""
  if values.shape[-1] < 2:
    return jnp.ones(values.shape[:-1], jnp.float32)
  top2 = jax.lax.top_k(jnp.where(valid, values, _NEG), 2)[0]
  first, second = top2[..., 0], top2[..., 1]
  gap = (first - jnp.where(jnp.isfinite(second), second, 0.0)) / jnp.maximum(first, 1e-30)
  return jnp.where(jnp.isfinite(second), jnp.where(first > 0, gap, 0.0), 1.0)


# --- Placements -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resident:
  """Every adapter's factors of this layer and module, on this device.

  Attributes:
    a: [N, R, I] A* (orthonormal rows; zero rows for rank padding).
    b: [N, O, R] B* = U S.
    arrows: [I, N] each adapter's top right singular vector, as columns.
    valid: [N] bool, False for adapters that are all zero here.
    shared: [I, Q] input directions that routing ignores, or None.
    index: the arrows' ArrowIndex (routing/arrow_index.py), or None.
    arrow_layer: [] int32 or None. With it, ``arrows`` is the library's whole stack
      [L, I, N] and this the layer: the scores read that layer in place, in chunks
      (XLA:CPU copies a layer-scanned slice before a dot, three passes over the bytes).
  """

  a: jax.Array
  b: jax.Array
  arrows: jax.Array
  valid: jax.Array
  shared: jax.Array | None = None
  index: object | None = None
  arrow_layer: jax.Array | None = None

  @classmethod
  def of(cls, weights, module: str, layer=None) -> Resident:
    """A module's slice of a library's weights (``LibraryWeights``): at ``layer``, or
    as given when the layer axis is already scanned away."""
    pick = (lambda x: x) if layer is None else (lambda x: x[layer])  # noqa: E731
    shared = None if weights.shared is None else pick(weights.shared[module])
    index = getattr(weights, "index", None)
    index = None if index is None else jax.tree.map(pick, index[module])
    return cls(
      a=pick(weights.a[module]),
      b=pick(weights.b[module]),
      arrows=pick(weights.arrows[module]),
      valid=pick(weights.valid[module]),
      shared=shared,
      index=index,
    )

  @property
  def n(self) -> int:
    """Adapters held here (what the projection rule compares the pairs with)."""
    return self.arrows.shape[-1]

  @property
  def size(self) -> int:
    """N, the adapters of the whole library (ids are in [0, N))."""
    return self.n

  @property
  def out_dim(self) -> int:
    return self.b.shape[1]

  @property
  def rank(self) -> int:
    return self.a.shape[1]

  def top_k(self, values, k: int):
    """(vals, ids) [..., min(k, N)] of the largest values (ties: lower id first)."""
    vals, ids = jax.lax.top_k(values, min(k, values.shape[-1]))
    return vals, ids.astype(jnp.int32)

  def merge(self, vals, ids, k: int):
    del k
    return vals, ids

  def owner(self, ids):
    del ids
    return None

  def owner_max(self, values, ids):
    """values [..., C] computed where ``owner(ids)``, made whole everywhere."""
    del ids
    return values

  def any(self, flag):
    return flag

  def total(self, x):
    return x

  def finish(self, delta):
    return delta

  def allowed_at(self, allowed, ids):
    """allowed [B, n] looked up at global ids [B, C] (False for -1)."""
    here = jnp.take_along_axis(allowed, jnp.clip(ids, 0, self.n - 1), axis=1)
    return (ids >= 0) & here

  def a_rows(self, ids, need):
    del need
    return gather_adapters(self.a, ids)

  def b_rows(self, ids, need):
    del need
    return self.b[jnp.clip(ids, 0, self.n - 1)]

  def all_a(self):
    """Every held adapter's A*, [n, R, I], in id order (for dense projections)."""
    return self.a

  def local(self, ids):
    """Indices into ``all_a()`` of global ids."""
    return ids

  def scan(self, fn, carry, allowed, with_b: bool):
    """fn(carry, a [c, R, I], b [c, O, R] or None, ids [c], allowed [B, c]) over every
    held adapter; here one chunk, the whole library."""
    ids = jnp.arange(self.n, dtype=jnp.int32)
    return fn(carry, self.a, self.b if with_b else None, ids, allowed)


class OnDevice:
  """The routing form of a library held whole on one device (or partitioned by XLA):
  ``route`` is the hook's entry at one module. Stateless; one shared instance."""

  def route(self, specs, router_index, x, w, module, mask, fixed_ids, caches, **kw):
    del caches
    stacked = kw.pop("stacked_arrows", None)
    if stacked is None:
      pl = Resident.of(w, module)
    else:  # the layer's arrows read in place from the stack (hook.RoutedLibrary.per_layer)
      pl = Resident.of(w.replace(arrows={**w.arrows, module: stacked}), module)
      pl = dataclasses.replace(pl, arrow_layer=kw["layer"])
    return route_module(specs, router_index, x, pl, mask, fixed_ids, **kw)

  def __repr__(self):
    return "ON_DEVICE"


ON_DEVICE = OnDevice()


# --- Decisions ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
  """A per-token choice of one adapter and what votes and gates read from it.

  Attributes:
    sel: [B, T] int32 the chosen adapter (global id).
    ok: [B, T] bool, something allowed was chosen.
    z_sel: [B, T, R] its A* x (valid where this place owns ``sel``).
    cand: [B, T, C] the candidates reranked.
    n2: [B, T, C] their squared norms ||A* P x||^2 (-1 for disallowed ones).
    margin: [B, T] the decision's relative margin, or None.
  """

  sel: jax.Array
  ok: jax.Array
  z_sel: jax.Array
  cand: jax.Array
  n2: jax.Array
  margin: jax.Array | None


def arrow_scores(x, pl, allowed) -> jax.Array:
  """|arrow_i . x| for the held adapters: [B, T, n] (float32), -inf where not allowed."""
  if pl.arrow_layer is not None:
    s = jnp.abs(stacked_arrow_dots(x, pl.arrows, pl.arrow_layer))
  else:
    s = jnp.abs(
      jnp.einsum("bti,in->btn", x, pl.arrows.astype(x.dtype), preferred_element_type=jnp.float32)
    )
  return jnp.where(allowed[:, None, :], s, _NEG)


def stacked_arrow_dots(x, arrows, layer, rows: int = 192) -> jax.Array:
  """x . arrows[layer] ([B, T, I] . [I, N] -> [B, T, N] float32) read in place from the
  stack [L, I, N]: a loop over chunks of at most ``rows`` input rows, each sliced and
  contracted while it is in cache, instead of one copy of the layer's [I, N]."""
  L, I, N = arrows.shape
  ci = max(d for d in range(1, min(rows, I) + 1) if I % d == 0)
  B, T = x.shape[:2]

  def body(c, acc):
    block = jax.lax.dynamic_slice(arrows, (layer, c * ci, 0), (1, ci, N))[0]
    xc = jax.lax.dynamic_slice_in_dim(x, c * ci, ci, axis=2)
    return acc + jnp.einsum(
      "bti,in->btn", xc, block.astype(x.dtype), preferred_element_type=jnp.float32
    )

  return jax.lax.fori_loop(0, I // ci, body, jnp.zeros((B, T, N), jnp.float32))


def _project_tokens(pl, xs, cand, need, projection: str):
  """A* x of each token's candidates cand [B, T, C] for every x of ``xs``: [B, T, C, R]
  each, by the chosen projection (the same numbers every way)."""
  B, T, C = cand.shape
  if projection == "auto":
    projection = auto_projection(B * T * C, pl.n)
  if projection == "dense":
    a, local = pl.all_a(), pl.local(cand)
    return [jnp.take_along_axis(project_all(x, a), local[..., None], axis=2) for x in xs]
  if projection == "grouped":
    a, local = pl.all_a(), pl.local(cand)
    return [project_grouped(x, a, local) for x in xs]
  rows = pl.a_rows(cand, need)  # [B, T, C, R, I]
  return [contract(x, rows) for x in xs]


def _rerank(pl, x, xr, cand, ok_c, project, want_margin: bool) -> Decision:
  """SpectR among candidates cand [B, T, C] (ok_c: allowed ones): the largest
  ||A* P x||, ties to the lower id."""
  zs = project([x] if xr is None else [x, xr])
  z, zr = zs[0], zs[-1]
  n2 = jnp.sum(jnp.square(zr.astype(jnp.float32)), axis=-1)
  n2 = pl.owner_max(n2, cand)  # each candidate's norm, from the place that holds it
  n2 = jnp.where(ok_c, n2, -1.0)  # disallowed candidates lose
  best = argmax_low_id(n2, cand)[..., None]
  sel = jnp.take_along_axis(cand, best, axis=-1)[..., 0]
  z_sel = jnp.take_along_axis(z, best[..., None], axis=2)[:, :, 0]
  ok = jnp.take_along_axis(ok_c, best, axis=-1)[..., 0]
  m = None
  if want_margin:
    m = margin(jnp.sqrt(jnp.maximum(n2, 0.0)), n2 >= 0) if cand.shape[-1] >= 2 else None
  return Decision(sel, ok, z_sel, cand, n2, m)


def lag_decision(
  pl,
  x,
  xr,
  allowed,
  k: int,
  projection: str,
  want_margin=False,
  probe: int = 0,
  probe_always: bool = False,
  sketch: int = 0,
) -> Decision:
  """The paper's LAG: Arrow filter to k candidates, SpectR rerank among them.

  ``probe`` > 0: the Arrow filter scans only the arrows of the ``probe`` best clusters
  of the library's arrow index (routing/arrow_index.py; all of them: the exact filter),
  where that reads fewer arrows than the exact scan, or everywhere with
  ``probe_always``. With ``sketch`` > 0 the library carries an arrow sketch instead
  (routing/arrow_sketch.py) and ``probe`` is its pool rescored exactly: used at decode
  (one token), or everywhere with ``probe_always``.
  """
  from lag_jax.routing import arrow_index, arrow_sketch

  index = None
  if probe:
    index = getattr(pl, "index", None)
    kind = arrow_sketch.ArrowSketch if sketch else arrow_index.ArrowIndex
    if not isinstance(index, kind):
      raise ValueError(
        f"index_probe > 0{' with index_sketch' if sketch else ''} needs a library with "
        + (
          "an arrow sketch (AdapterLibrary.with_sketch)"
          if sketch
          else "an arrow index (AdapterLibrary.with_index or OffloadedLibrary.with_index)"
        )
        + f"; this library has {'none' if index is None else type(index).__name__}"
      )
    # Decode probes; a long prefill scans exactly (cheaper there, and exact).
    long = x.shape[1] > 1 if sketch else not arrow_index.pays_off(index, x.shape[1], probe, pl.n)
    if long and not probe_always:
      index = None
  if index is not None:

    def top(c):
      if sketch:  # without the sketch's own rows, the pool's read from the stack in place
        args = (index, pl.arrows, x, allowed, min(c, pl.n), probe, pl.arrow_layer)
        vals, ids = arrow_sketch.search(*args)
      else:
        vals, ids = arrow_index.search(index, x, allowed, min(c, pl.n), probe)
      return vals, jnp.maximum(ids, 0)  # -1 (nothing found) is masked by vals = -inf

  else:
    scores = arrow_scores(x, pl, allowed)

    def top(c):
      return pl.top_k(scores, c)

  vals, cand = top(k)  # [B, T, C]
  need = jnp.isfinite(vals)
  d = _rerank(
    pl,
    x,
    xr,
    cand,
    need,
    lambda xs: _project_tokens(pl, xs, cand, need, projection),
    want_margin,
  )
  if want_margin and d.margin is None:  # k = 1 is Arrow: its margin is the filter's top 2
    top2, _ = top(2)
    d = dataclasses.replace(d, margin=margin(top2, jnp.isfinite(top2)))
  return d


def rerank_decision(pl, x, xr, allowed, cand, want_margin=False) -> Decision:
  """SpectR per token among each request's candidates cand [B, C] (-1: none)."""
  B, T = x.shape[:2]
  ok_c = pl.allowed_at(allowed, cand)  # [B, C]
  rows = pl.a_rows(cand, ok_c)  # [B, C, R, I]: per request, not per token
  cand_t = jnp.broadcast_to(cand[:, None, :], (B, T, cand.shape[-1]))
  ok_t = jnp.broadcast_to(ok_c[:, None, :], cand_t.shape)
  d = _rerank(pl, x, xr, cand_t, ok_t, lambda xs: [contract(v, rows) for v in xs], want_margin)
  if want_margin and d.margin is None:
    d = dataclasses.replace(d, margin=jnp.ones((B, T), jnp.float32))
  return d


def apply_hard(pl, d: Decision):
  """B*_sel z_sel per token (nothing where not ok): (delta share [B, T, O], chosen)."""
  b = pl.b_rows(d.sel, d.ok)  # [B, T, O, R]
  delta = jnp.einsum("btr,btor->bto", d.z_sel, b.astype(d.z_sel.dtype))
  keep = d.ok if pl.owner(d.sel) is None else d.ok & pl.owner(d.sel)
  return jnp.where(keep[..., None], delta, 0), jnp.where(d.ok, d.sel, -1).astype(jnp.int32)


def apply_mixture(pl, x, allowed, ids, weights):
  """sum_m w_m B*_m A*_m x with each request's ids / weights [B, M] (-1: none): delta
  share [B, T, O] and chosen [B, T] (the first id, -1 where it does not apply here).
  With M = 1 and weight 1 this is the ``fixed`` router."""
  B, T = x.shape[:2]
  ok = pl.allowed_at(allowed, ids)  # [B, M]
  w = jnp.where(ok, weights, 0.0)
  if pl.owner(ids) is not None:
    w = jnp.where(pl.owner(ids), w, 0.0)  # each place adds its own adapters' share
  z = contract(x, pl.a_rows(ids, ok))  # [B, T, M, R]
  b = pl.b_rows(ids, ok).astype(x.dtype)  # [B, M, O, R]
  delta = jnp.einsum("btmr,bm,bmor->bto", z, w.astype(x.dtype), b)
  chosen = jnp.where(ok[:, 0], ids[:, 0], -1).astype(jnp.int32)
  return delta, jnp.broadcast_to(chosen[:, None], (B, T))


def route_arrow(pl, x, allowed):
  """Hard top-1 Arrow: the adapter with the largest |arrow . x|."""
  vals, sel = pl.top_k(arrow_scores(x, pl, allowed), 1)
  ok = jnp.isfinite(vals)
  z_sel = contract(x, pl.a_rows(sel, ok))[:, :, 0]
  return apply_hard(pl, Decision(sel[..., 0], ok[..., 0], z_sel, sel, vals, None))


def route_spectr(pl, x, xr, allowed):
  """SpectR over the whole library: argmax_i ||A*_i P x||, a running arg-max over the
  placement's chunks (the earlier, lower id keeps ties)."""
  B, T = x.shape[:2]

  def body(carry, a, b, ids, here):
    del b
    best, best_id, best_z = carry
    z = project_all(x, a)  # [B, T, c, R]
    zr = z if xr is None else project_all(xr, a)
    norms = jnp.sum(jnp.square(zr.astype(jnp.float32)), axis=-1)
    norms = jnp.where(here[:, None, :], norms, _NEG)
    j = argmax_low_id(norms, ids)
    v = jnp.take_along_axis(norms, j[..., None], axis=-1)[..., 0]
    zj = jnp.take_along_axis(z, j[..., None, None], axis=2)[:, :, 0]
    better = v > best
    return (
      jnp.where(better, v, best),
      jnp.where(better, ids[j], best_id),
      jnp.where(better[..., None], zj, best_z),
    )

  init = (
    jnp.full((B, T), _NEG, jnp.float32),
    jnp.zeros((B, T), jnp.int32),
    jnp.zeros((B, T, pl.rank), x.dtype),
  )
  best, sel, z_sel = pl.scan(body, init, allowed, with_b=False)
  vals, ids = pl.merge(best[..., None], sel[..., None], 1)
  ok = jnp.isfinite(vals[..., 0])
  return apply_hard(pl, Decision(ids[..., 0], ok, z_sel, ids, vals, None))


def route_arrow_softmax(pl, x, allowed, k: int, temperature: float):
  """PEFT's Arrow: softmax(top-k |arrow . x| / T) mixture of the k adapters' outputs."""
  vals, cand = pl.top_k(arrow_scores(x, pl, allowed), k)  # [B, T, C]
  need = jnp.isfinite(vals)
  ok = need[..., 0]
  w = jax.nn.softmax(jnp.where(ok[..., None], vals, 0.0) / temperature, axis=-1)
  w = jnp.where(need, w, 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
  if pl.owner(cand) is not None:
    w = jnp.where(pl.owner(cand), w, 0.0)  # each place adds its own candidates' share
  z = contract(x, pl.a_rows(cand, need))
  b = pl.b_rows(cand, need).astype(x.dtype)
  delta = jnp.einsum("btc,btcr,btcor->bto", w.astype(x.dtype), z, b)
  return jnp.where(ok[..., None], delta, 0), jnp.where(ok, cand[..., 0], -1).astype(jnp.int32)


def route_uniform(pl, x, mask):
  """The uniform merge: the mean of the deltas of every adapter the mask allows.

  An adapter that is zero at this layer / module (it does not cover it) still counts
  in the mean, as in merging the adapters' weights with 1/N each.
  """
  count = pl.total(jnp.sum(mask.astype(jnp.float32), axis=-1, keepdims=True))  # [B, 1]
  scale = 1.0 / jnp.maximum(count, 1.0)

  def body(delta, a, b, ids, here):
    del ids
    w = (here.astype(jnp.float32) * scale).astype(x.dtype)  # [B, c]
    z = project_all(x, a)
    return delta + jnp.einsum("bn,btnr,nor->bto", w, z, b.astype(x.dtype))

  init = jnp.zeros((*x.shape[:2], pl.out_dim), x.dtype)
  delta = pl.scan(body, init, mask, with_b=True)
  return delta, jnp.full(x.shape[:2], -1, jnp.int32)


def route_none(pl, x):
  B, T = x.shape[:2]
  return jnp.zeros((B, T, pl.out_dim), x.dtype), jnp.full((B, T), -1, jnp.int32)


# --- Request-level quantities ---------------------------------------------------------


def pooled_candidates(pl, x, allowed, span, k: int):
  """request_lag's filter: the k allowed adapters with the largest mean |arrow . x|
  over each request's span tokens. span [B, T] float (1: counts); returns cand [B, C]
  int32, -1 where fewer are allowed."""
  s = arrow_scores(x, pl, allowed)  # [B, T, n], -inf where not allowed
  s = jnp.where(jnp.isfinite(s), s, 0.0)
  count = jnp.maximum(jnp.sum(span, axis=1), 1.0)  # [B]
  pooled = jnp.einsum("bt,btn->bn", span, s) / count[:, None]
  vals, cand = pl.top_k(jnp.where(allowed, pooled, _NEG), k)
  return jnp.where(jnp.isfinite(vals), cand, -1).astype(jnp.int32)


def tally(spec, d: Decision, span, layer, n: int):
  """One layer and module's votes [B, N] over the span: a count of the decisions, the
  decisions weighted by their relative margins, or the sum of each token's normalised
  rerank scores over its candidates. Every place
  computes the same votes from the same (global) decisions."""
  B = d.sel.shape[0]
  w = span * d.ok.astype(span.dtype)  # [B, T]
  if spec.vote_layers is not None:
    w = w * jnp.isin(layer, jnp.asarray(spec.vote_layers, jnp.int32)).astype(w.dtype)
  rows = jnp.arange(B)[:, None]
  if spec.vote_score in ("count", "margin"):
    if spec.vote_score == "margin":
      w = w * d.margin.astype(w.dtype)
    return jnp.zeros((B, n), jnp.float32).at[rows, jnp.clip(d.sel, 0, n - 1)].add(w)
  norms = jnp.sqrt(jnp.maximum(d.n2, 0.0)) * (d.n2 >= 0)  # [B, T, C]
  share = norms / jnp.maximum(jnp.sum(norms, axis=-1, keepdims=True), 1e-30)
  return (
    jnp.zeros((B, n), jnp.float32)
    .at[rows[:, :, None], jnp.clip(d.cand, 0, n - 1)]
    .add(w[..., None] * share)
  )


# --- One layer and module, a batch of requests ------------------------------------------


def spec_lag_decision(spec, pl, x, xr, allowed, want_margin: bool = False) -> Decision:
  """``lag_decision`` with a router's k, projection and arrow-index settings."""
  return lag_decision(
    pl,
    x,
    xr,
    allowed,
    spec.k,
    spec.projection,
    want_margin,
    probe=spec.index_probe,
    probe_always=spec.index_prefill,
    sketch=spec.index_sketch,
  )


def route_one(spec, pl, x, xr, allowed, mask, fixed_ids, layer, span, state, C: int):
  """One router over the batch: (delta share, chosen, votes [B, N] or None, request
  candidates [B, C] or None). ``state`` is this layer and module's request-level state
  (None while resolving, or for routers that have none)."""
  name = spec.name
  if name == "none":
    return (*route_none(pl, x), None, None)
  if name == "fixed":
    ids = fixed_ids[:, None]
    return (*apply_mixture(pl, x, allowed, ids, jnp.ones(ids.shape, jnp.float32)), None, None)
  if name == "uniform":
    return (*route_uniform(pl, x, mask), None, None)
  if name == "arrow":
    return (*route_arrow(pl, x, allowed), None, None)
  if name == "arrow_softmax":
    return (*route_arrow_softmax(pl, x, allowed, spec.k, spec.temperature), None, None)
  if name == "spectr":
    return (*route_spectr(pl, x, xr, allowed), None, None)
  resolving = state is None
  if name == "vote" and not resolving:
    if spec.two_rounds and "finalists" in state:
      # A two-round vote's second round: every token decides among the request's
      # finalists alone (SpectR over them), and those decisions are tallied.
      F = min(spec.vote_finalists, pl.size)
      d = rerank_decision(
        pl, x, xr, allowed, state["finalists"][:, :F], spec.vote_score == "margin"
      )
      return (*apply_hard(pl, d), tally(spec, d, span, layer, pl.size), None)
    return (*apply_mixture(pl, x, allowed, state["ids"], state["weights"]), None, None)
  if not spec.request_level:  # the paper's LAG
    return (*apply_hard(pl, spec_lag_decision(spec, pl, x, xr, allowed)), None, None)
  # vote's first pass, request_lag, gated lag.
  first_pass = resolving and spec.votes  # votes need the ungated decisions
  # Gates read the margin on the second pass; margin-weighted votes on the first.
  want_margin = (spec.gate > 0 and not first_pass) or (first_pass and spec.vote_score == "margin")
  cand_out = None
  if name == "request_lag":
    k = min(spec.k, pl.size)
    if resolving:
      req_cand = pooled_candidates(pl, x, allowed, span, k)
      cand_out = jnp.pad(req_cand, ((0, 0), (0, C - req_cand.shape[-1])), constant_values=-1)
    else:
      req_cand = state["cand"][:, :k]
    d = rerank_decision(pl, x, xr, allowed, req_cand, want_margin)
  else:
    d = spec_lag_decision(spec, pl, x, xr, allowed, want_margin)
  delta, chosen = apply_hard(pl, d)
  if first_pass:
    return delta, chosen, tally(spec, d, span, layer, pl.size), cand_out
  if spec.gated:
    B, T = x.shape[:2]
    confident = jnp.ones((B, T), bool)
    if spec.gate > 0:
      confident = d.margin >= spec.gate
    if spec.layers is not None:
      confident = confident & jnp.isin(layer, jnp.asarray(spec.layers, jnp.int32))
    if spec.gate_fallback == "vote":
      fd, fc = apply_mixture(pl, x, allowed, state["ids"], state["weights"])
    else:
      fd, fc = jnp.zeros_like(delta), jnp.full((B, T), -1, jnp.int32)
    delta = jnp.where(confident[..., None], delta, fd)
    chosen = jnp.where(confident, chosen, fc)
  return delta, chosen, None, cand_out


def route_module(
  specs, router_index, x, pl, mask, fixed_ids, layer=None, span=None, state=None, C: int = 1
):
  """Every router of a batch at one layer and module; each row takes its own.

  Args:
    specs: the batch's routers (``RouterSpec``; static).
    router_index: [B] int32, each request's router.
    x: [B, T, I] the module's input.
    pl: the placement of this layer and module's factors.
    mask: [B, n] bool, the adapters each request may use (those held here).
    fixed_ids: [B] int32, each request's adapter for ``fixed`` (-1: none).
    layer: [] int32, the layer index (request-level routers only).
    span: [B, T] bool, each request's pooled prompt tokens while resolving (None: all).
    state: this layer and module's dict(cand [B, C], ids [B, M], weights [B, M]) once
      the request-level state is known; None before (resolving) or without one. With
      finalists [B, F] too it is the second round of a two-round vote (resolving
      again: its rows vote among their finalists, the others apply their state).
    C: the width of request_lag's candidates in the state.
  Returns:
    delta [B, T, O] (in x's dtype), chosen [B, T] int32 (-1: none), and while resolving
    request-level routers dict(votes [B, N] float32, cand [B, C] int32) (zeros / -1 for
    rows whose router has none), else None.
  """
  B, T = x.shape[:2]
  request_level = any(s.request_level for s in specs)
  resolving = request_level and (state is None or "finalists" in state)
  if resolving:
    span = jnp.ones((B, T), jnp.float32) if span is None else span.astype(jnp.float32)
  allowed = mask & pl.valid[None, :]
  xr = None if pl.shared is None else remove_directions(x, pl.shared)
  delta = chosen = None
  votes = jnp.zeros((B, pl.size), jnp.float32) if resolving else None
  cand = jnp.full((B, C), -1, jnp.int32) if resolving else None
  for i, spec in enumerate(specs):
    d, c, v, cd = route_one(spec, pl, x, xr, allowed, mask, fixed_ids, layer, span, state, C)
    pick = router_index == i
    if delta is None:
      delta, chosen = d, c
    else:
      delta = jnp.where(pick[:, None, None], d, delta)
      chosen = jnp.where(pick[:, None], c, chosen)
    if v is not None:
      votes = jnp.where(pick[:, None], v, votes)
    if cd is not None:
      cand = jnp.where(pick[:, None], cd, cand)
  # One reduction for every router of the batch: each place holds its own share.
  delta = pl.finish(delta)
  return delta, chosen, ({"votes": votes, "cand": cand} if resolving else None)
