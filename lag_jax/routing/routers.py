"""Routers: which adapter(s) of a library each token uses at one module (pure jnp).

Every router sees one layer's slice of a library and one module's input, and
returns the summed low-rank delta and, for telemetry, the adapter id it chose per
token (the top-weighted one for mixtures; -1 where no adapter applies).

  none           no adapter
  fixed          one adapter per request (``fixed_ids``): single adapter / oracle
  uniform        the mean of all allowed adapters' deltas
  arrow          LAG paper's hard Arrow: argmax_i |arrow_i . x|
  arrow_softmax  Arrow paper / PEFT: top-k by |arrow_i . x|, softmax(score / T) over
                 them, output = sum_i w_i B*_i A*_i x
  spectr         argmax_i ||A*_i x|| over the whole library (k = N)
  lag            Arrow filter to k candidates, SpectR rerank, one adapter

Beyond the paper (``lag_jax.routing.request``: they need request-level state, so they
run through ``RoutedAdapters``, not ``route``):

  vote           per-token LAG over a prompt span, then the winning adapter (or the
                 top m, mixed by vote share) for every position of the request
  request_lag    the Arrow filter applied once per request (per layer and module) to
                 scores pooled over a prompt span, SpectR per token among those k
  lag / request_lag with ``gate`` or ``layers``: confidence gating, a per-token
                 decision whose margin is small (or at a layer that does not route)
                 falls back to the request's vote winner or to no adapter

Ties are broken towards the lower adapter id everywhere, so ``lag`` with k = 1 is
``arrow`` and ``lag`` with k = N is ``spectr``, selection for selection. Adapters a
request's mask excludes, and invalid (all-zero) adapters, are never chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROUTERS = (
  "none",
  "fixed",
  "uniform",
  "arrow",
  "arrow_softmax",
  "spectr",
  "lag",
  "vote",
  "request_lag",
)
REQUEST_ROUTERS = ("vote", "request_lag")
VOTE_SCOPES = ("all", "module")
VOTE_SCORES = ("count", "score")
GATE_FALLBACKS = ("vote", "none")
PROJECTIONS = ("auto", "gather", "dense", "grouped")
_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """A router and its static settings (part of the compiled shape, hashable).

  Attributes:
    name: one of ROUTERS.
    k: candidates for ``lag`` and ``arrow_softmax`` (per token), for ``request_lag``
      (per request, layer and module) and for the per-token LAG whose decisions
      ``vote`` counts; clamped to the library size N (so k >= N is SpectR, resp. a
      softmax over all adapters).
    temperature: softmax temperature of ``arrow_softmax``.
    projection: how ``lag`` computes its candidates' A* x (same result every way):
      ``gather`` reads only the k candidates' rows per token (decode), ``dense``
      projects onto all N adapters with one matmul ([B*T, I] x [I, N*R]: R times the
      Arrow scores' work, linear in N like them, but a single dense matmul),
      ``grouped`` sorts (token, candidate) pairs by adapter and runs one grouped
      matmul (``jax.lax.ragged_dot_general``: k-proportional work, meant for TPU /
      GPU prefill; XLA:CPU lowers it densely and is hundreds of times slower there),
      ``auto`` gathers when the (token, candidate) pairs B*T*k are fewer than the
      library's N, and otherwise groups on TPU and projects densely elsewhere.
    vote_scope: ``vote`` (and the vote fallback of gated routers): the winner of all
      layers' and modules' decisions together (``all``), or one winner per layer and
      module (``module``).
    vote_score: ``count`` the per-token decisions (majority; ties to the lower id) or
      sum each token's normalised rerank ``score``s ||A*_c x|| / sum_c' ||A*_c' x||
      over its candidates.
    vote_top_m: apply the m adapters with the most votes, mixed by their share of
      the m's votes (1: the winner alone, one LoRA per token).
    vote_layers: the layers whose decisions count in the vote (None: all); with
      vote_scope 'module' the other layers get no votes, hence no adapter.
    gate: ``lag`` / ``request_lag``: where the relative margin (best - second) / best
      of the scores that decided a token (the candidates' ||A* x||; the Arrow scores
      when there is one candidate) is below this, the token falls back (0: off).
    gate_fallback: what a gated token uses: the request's ``vote`` winner(s) (needs a
      vote pass over the prompt first) or ``none`` (no adapter).
    layers: ``lag`` / ``request_lag``: the layers that route per token; the others
      use the fallback (None: all).
  """

  name: str = "lag"
  k: int = 20
  temperature: float = 1.0
  projection: str = "auto"
  vote_scope: str = "all"
  vote_score: str = "count"
  vote_top_m: int = 1
  vote_layers: tuple[int, ...] | None = None
  gate: float = 0.0
  gate_fallback: str = "vote"
  layers: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.name not in ROUTERS:
      raise ValueError(f"router {self.name!r} is unknown; choose from {ROUTERS}")
    if self.k < 1:
      raise ValueError(f"router {self.name!r}: k must be >= 1, got {self.k}")
    if self.temperature <= 0:
      raise ValueError(f"router {self.name!r}: temperature must be > 0")
    if self.projection not in PROJECTIONS:
      raise ValueError(
        f"router {self.name!r}: projection {self.projection!r} is unknown; choose from "
        f"{PROJECTIONS}"
      )
    for field, value, choices in (
      ("vote_scope", self.vote_scope, VOTE_SCOPES),
      ("vote_score", self.vote_score, VOTE_SCORES),
      ("gate_fallback", self.gate_fallback, GATE_FALLBACKS),
    ):
      if value not in choices:
        raise ValueError(
          f"router {self.name!r}: {field} {value!r} is unknown; choose from {choices}"
        )
    if self.vote_top_m < 1:
      raise ValueError(f"router {self.name!r}: vote_top_m must be >= 1, got {self.vote_top_m}")
    if not 0.0 <= self.gate < 1.0:
      raise ValueError(f"router {self.name!r}: gate must be in [0, 1), got {self.gate}")
    for field in ("vote_layers", "layers"):
      value = getattr(self, field)
      if value is not None:
        value = tuple(sorted({int(v) for v in value}))
        if not value or value[0] < 0:
          raise ValueError(f"router {self.name!r}: {field} must be layer indices >= 0, got {value}")
        object.__setattr__(self, field, value)
    if (self.gate > 0 or self.layers is not None) and self.name not in ("lag", "request_lag"):
      raise ValueError(f"router {self.name!r}: gate / layers apply to 'lag' and 'request_lag' only")

  @property
  def gated(self) -> bool:
    """Some tokens may fall back: a margin threshold or a per-layer switch is set."""
    return self.gate > 0 or self.layers is not None

  @property
  def votes(self) -> bool:
    """Needs a vote over the prompt (a first pass): ``vote``, or gated with a vote
    fallback."""
    return self.name == "vote" or (self.gated and self.gate_fallback == "vote")

  @property
  def request_level(self) -> bool:
    """Runs through ``lag_jax.routing.request`` (request-level state or the layer index)."""
    return self.name in REQUEST_ROUTERS or self.gated


@dataclasses.dataclass(frozen=True)
class LayerLibrary:
  """One layer's slice of a library at one module.

  Attributes:
    a: [N, R, I] A* (orthonormal rows; zero rows for padding).
    b: [N, O, R] B* = U S.
    arrows: [I, N] each adapter's top right singular vector, as columns.
    valid: [N] bool, False for adapters that are all zero here.
    shared: [I, S] input directions that routing ignores (``routing/shared.py``:
      SpectR norms are ||A* P x||, P = 1 - W W^T; the arrows were recomputed
      already), or None.
  """

  a: jax.Array
  b: jax.Array
  arrows: jax.Array
  valid: jax.Array
  shared: jax.Array | None = None

  @classmethod
  def of(cls, weights, module: str, layer=None) -> LayerLibrary:
    """A module's slice of a library's weights (``LibraryWeights``): at ``layer``, or
    as given when the layer axis is already scanned away."""
    pick = (lambda x: x) if layer is None else (lambda x: x[layer])  # noqa: E731
    shared = None if weights.shared is None else pick(weights.shared[module])
    return cls(
      a=pick(weights.a[module]),
      b=pick(weights.b[module]),
      arrows=pick(weights.arrows[module]),
      valid=pick(weights.valid[module]),
      shared=shared,
    )


def routing_input(x: jax.Array, lib: LayerLibrary) -> jax.Array:
  """What the SpectR norms see: x [B, T, I] with the library's shared directions
  projected out (x itself for a library without them)."""
  if lib.shared is None:
    return x
  w = lib.shared.astype(x.dtype)
  return x - jnp.einsum("bts,is->bti", jnp.einsum("bti,is->bts", x, w), w)


def _argmax_low_id(values: jax.Array, ids: jax.Array) -> jax.Array:
  """Index (along the last axis) of the max value; ties go to the lower id."""
  best = jnp.max(values, axis=-1, keepdims=True)
  big = jnp.iinfo(jnp.int32).max
  tied = jnp.where(values == best, ids, big)
  return jnp.argmin(tied, axis=-1)


def gather_adapters(a: jax.Array, ids: jax.Array) -> jax.Array:
  """a[ids] for a [N, R, I] and ids [...] -> [..., R, I], as one row gather of A*
  viewed as [N * R, I] rows."""
  N, R, I = a.shape
  rows = ids[..., None] * R + jnp.arange(R, dtype=ids.dtype)  # [..., R]
  return jnp.take(a.reshape(N * R, I), rows, axis=0, mode="clip")


def project_all(x: jax.Array, a: jax.Array) -> jax.Array:
  """A*_n x for every adapter: x [B, T, I], a [N, R, I] -> [B, T, N, R].

  One [B*T, I] x [I, N*R] matmul over A* as stored (rows contiguous); contracting the
  4-D 'nri' form made XLA:CPU transpose the whole library first (5-7x slower).
  """
  N, R, I = a.shape
  z = jnp.einsum("bti,ji->btj", x, a.reshape(N * R, I).astype(x.dtype))
  return z.reshape(*x.shape[:2], N, R)


def project_gathered(x: jax.Array, a: jax.Array, ids: jax.Array) -> jax.Array:
  """A*_id x for each token's ids: x [B, T, I], ids [B, T, C] -> [B, T, C, R].

  The gathered rows are contracted as one flat [C*R, I] matrix per token: the 5-D
  einsum 'bti,btcri->btcr' made XLA:CPU 3-4x slower (benchmarks/routing.py profile).
  """
  B, T, C = ids.shape
  R, I = a.shape[1:]
  rows = gather_adapters(a, ids).astype(x.dtype).reshape(B, T, C * R, I)
  return jnp.einsum("bti,btji->btj", x, rows).reshape(B, T, C, R)


def _apply_selected(z_sel: jax.Array, b: jax.Array, sel: jax.Array) -> jax.Array:
  """B*_sel z_sel: z_sel [B, T, R], sel [B, T] -> [B, T, O] (gathers only sel's B*)."""
  return jnp.einsum("btr,btor->bto", z_sel, b[sel].astype(z_sel.dtype))


def arrow_scores(x: jax.Array, lib: LayerLibrary, allowed: jax.Array) -> jax.Array:
  """|arrow_i . x| for all N: [B, T, N] (float32), -inf where not allowed ([B, N])."""
  s = jnp.abs(
    jnp.einsum("bti,in->btn", x, lib.arrows.astype(x.dtype), preferred_element_type=jnp.float32)
  )
  return jnp.where(allowed[:, None, :], s, _NEG)


def _candidates(scores: jax.Array, k: int):
  """Top-k ids by score, [B, T, C]; lax.top_k breaks ties towards lower ids."""
  vals, ids = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  return vals, ids.astype(jnp.int32)


def _hard(sel, ok, z_sel, lib):
  """Delta of one selected adapter per token; nothing where ``ok`` is False."""
  delta = _apply_selected(z_sel, lib.b, sel)
  return jnp.where(ok[..., None], delta, 0), jnp.where(ok, sel, -1).astype(jnp.int32)


def project_grouped(x: jax.Array, a: jax.Array, cand: jax.Array) -> jax.Array:
  """A*_c x for each token's candidates by one grouped matmul: [B, T, C, R].

  The B*T*C (token, candidate) pairs are sorted by adapter id, so each adapter's
  rows are read once and multiplied with the tokens that chose it as a candidate.
  """
  B, T, I = x.shape
  C = cand.shape[-1]
  N = a.shape[0]
  ids = cand.reshape(-1)
  order = jnp.argsort(ids, stable=True)
  lhs = x.reshape(B * T, I)[order // C]  # [B*T*C, I], grouped by adapter
  sizes = jnp.bincount(ids, length=N).astype(jnp.int32)
  dims = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
  )
  z_sorted = jax.lax.ragged_dot_general(lhs, a.astype(x.dtype), sizes, dims)
  z = jnp.zeros_like(z_sorted).at[order].set(z_sorted)
  return z.reshape(B, T, C, -1)


def _auto_projection(pairs: int, n: int) -> str:
  """gather when the (token, candidate) pairs are fewer than the adapters (decode);
  else the grouped matmul on TPU, which lowers ragged_dot to a grouped-matmul kernel
  (LAG.md: the SGMV pattern), and the dense projection elsewhere (XLA:CPU lowers
  ragged_dot densely: measured 380x slower than dense at N = 100, BENCHMARKS.md)."""
  if n > pairs:
    return "gather"
  return "grouped" if jax.default_backend() == "tpu" else "dense"


def _project_candidates(x, a, cand, projection: str):
  """A* x of each token's candidates, [B, T, C, R], by the chosen method."""
  B, T, C = cand.shape
  if projection == "auto":
    projection = _auto_projection(B * T * C, a.shape[0])
  if projection == "dense":
    return jnp.take_along_axis(project_all(x, a), cand[..., None], axis=2)
  if projection == "grouped":
    return project_grouped(x, a, cand)
  return project_gathered(x, a, cand)


def route_lag(x, lib: LayerLibrary, allowed, k: int, projection: str = "auto"):
  """Arrow filter to k, SpectR rerank among them, apply the winner (k=N: SpectR)."""
  scores = arrow_scores(x, lib, allowed)
  vals, cand = _candidates(scores, k)  # [B, T, C]
  z = _project_candidates(x, lib.a, cand, projection)  # [B, T, C, R]
  zr = (
    z if lib.shared is None else _project_candidates(routing_input(x, lib), lib.a, cand, projection)
  )
  norms = jnp.sum(jnp.square(zr.astype(jnp.float32)), axis=-1)
  norms = jnp.where(jnp.isfinite(vals), norms, -1.0)  # disallowed candidates lose
  best = _argmax_low_id(norms, cand)  # [B, T]
  sel = jnp.take_along_axis(cand, best[..., None], axis=-1)[..., 0]
  z_sel = jnp.take_along_axis(z, best[..., None, None], axis=2)[:, :, 0]
  ok = jnp.isfinite(jnp.take_along_axis(vals, best[..., None], axis=-1)[..., 0])
  return _hard(sel, ok, z_sel, lib)


def route_arrow(x, lib: LayerLibrary, allowed):
  """Hard top-1 Arrow: the adapter with the largest |arrow . x|."""
  scores = arrow_scores(x, lib, allowed)
  ids = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  sel = _argmax_low_id(scores, ids)
  ok = jnp.isfinite(jnp.max(scores, axis=-1))
  z_sel = project_gathered(x, lib.a, sel[..., None])[:, :, 0]
  return _hard(sel, ok, z_sel, lib)


def route_spectr(x, lib: LayerLibrary, allowed):
  """SpectR over the whole library: argmax_i ||A*_i x||."""
  z = project_all(x, lib.a)
  zr = z if lib.shared is None else project_all(routing_input(x, lib), lib.a)
  norms = jnp.sum(jnp.square(zr.astype(jnp.float32)), axis=-1)
  norms = jnp.where(allowed[:, None, :], norms, _NEG)
  ids = jnp.arange(norms.shape[-1], dtype=jnp.int32)
  sel = _argmax_low_id(norms, ids)
  ok = jnp.isfinite(jnp.max(norms, axis=-1))
  z_sel = jnp.take_along_axis(z, sel[..., None, None], axis=2)[:, :, 0]
  return _hard(sel, ok, z_sel, lib)


def route_arrow_softmax(x, lib: LayerLibrary, allowed, k: int, temperature: float):
  """PEFT's Arrow: softmax(top-k |arrow . x| / T) mixture of the k adapters' outputs."""
  vals, cand = _candidates(arrow_scores(x, lib, allowed), k)  # [B, T, C]
  ok = jnp.isfinite(vals[..., 0])
  w = jax.nn.softmax(jnp.where(ok[..., None], vals, 0.0) / temperature, axis=-1)
  w = jnp.where(jnp.isfinite(vals), w, 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
  z = project_gathered(x, lib.a, cand)
  delta = jnp.einsum("btc,btcr,btcor->bto", w.astype(x.dtype), z, lib.b[cand].astype(x.dtype))
  return jnp.where(ok[..., None], delta, 0), jnp.where(ok, cand[..., 0], -1)


def route_uniform(x, lib: LayerLibrary, mask):
  """The uniform merge: the mean of the deltas of every adapter the mask allows.

  An adapter that is zero at this layer / module (it does not cover it) still counts
  in the mean, as in merging the adapters' weights with 1/N each.
  """
  w = mask.astype(jnp.float32)
  count = jnp.sum(w, axis=-1, keepdims=True)
  w = (w / jnp.maximum(count, 1.0)).astype(x.dtype)  # [B, N]
  z = project_all(x, lib.a)
  delta = jnp.einsum("bn,btnr,nor->bto", w, z, lib.b.astype(x.dtype))
  B, T = x.shape[:2]
  chosen = jnp.full((B, T), -1, jnp.int32)
  return delta, chosen


def route_fixed(x, lib: LayerLibrary, allowed, fixed_ids):
  """One adapter per request (fixed_ids [B], -1 for none)."""
  B, T = x.shape[:2]
  ids = jnp.clip(fixed_ids, 0, lib.a.shape[0] - 1)
  ok = (fixed_ids >= 0) & jnp.take_along_axis(allowed, ids[:, None], axis=1)[:, 0]
  z = jnp.einsum("bti,bri->btr", x, gather_adapters(lib.a, ids).astype(x.dtype))
  sel = jnp.broadcast_to(ids[:, None], (B, T))
  return _hard(sel, jnp.broadcast_to(ok[:, None], (B, T)), z, lib)


def route(spec: RouterSpec, x, lib: LayerLibrary, mask, fixed_ids):
  """Dispatches one router.

  Args:
    spec: the router.
    x: [B, T, I] the module's input.
    lib: this layer's slice of the library.
    mask: [B, N] bool, adapters each request may use.
    fixed_ids: [B] int32, the adapter of each request for ``fixed``.
  Returns:
    delta [B, T, O] in x's dtype, chosen [B, T] int32 (-1: none).
  """
  if spec.request_level:
    raise ValueError(
      f"router {spec!r} routes with request-level state; run it through RoutedAdapters "
      "(lag_jax.routing.request), not routers.route"
    )
  allowed = mask & lib.valid[None, :]
  if spec.name == "none":
    B, T = x.shape[:2]
    return jnp.zeros((B, T, lib.b.shape[1]), x.dtype), jnp.full((B, T), -1, jnp.int32)
  if spec.name == "fixed":
    return route_fixed(x, lib, allowed, fixed_ids)
  if spec.name == "uniform":
    return route_uniform(x, lib, mask)
  if spec.name == "arrow":
    return route_arrow(x, lib, allowed)
  if spec.name == "arrow_softmax":
    return route_arrow_softmax(x, lib, allowed, spec.k, spec.temperature)
  if spec.name == "spectr":
    return route_spectr(x, lib, allowed)
  return route_lag(x, lib, allowed, spec.k, spec.projection)


def route_batch(specs: tuple[RouterSpec, ...], router_index, x, lib, mask, fixed_ids):
  """Requests in one batch may use different routers: router_index [B] picks from specs.

  Each distinct router runs once over the batch and rows take their own router's
  result, so switching routers between requests never recompiles.
  """
  if len(specs) == 1:
    return route(specs[0], x, lib, mask, fixed_ids)
  delta, chosen = None, None
  for i, spec in enumerate(specs):
    d, c = route(spec, x, lib, mask, fixed_ids)
    pick = router_index == i
    if delta is None:
      delta, chosen = d, c
    else:
      delta = jnp.where(pick[:, None, None], d, delta)
      chosen = jnp.where(pick[:, None], c, chosen)
  return delta, chosen
