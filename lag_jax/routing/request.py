"""Request-level routing beyond the paper: vote, request_lag and confidence gating.

Per-token routing is weak with small models (LAG.md, "Measured here"), while a vote of
the same per-token decisions over the question picks the gold adapter. These routers
(``routers.RouterSpec``; all jittable, batchable and mixable with the per-token ones
through ``router_index``) add state per request: each request's candidates, or the
adapter(s) its vote chose, per layer and module (``RequestState``, leaves
[L, B, ...], carried through the decoder's layer scan with the library).

  vote         pass 1: prefill with per-token LAG (k) and count its decisions (or sum
               its normalised rerank scores) over each request's prompt span; then the
               winner (or the top m, mixed by vote share) per library (``vote_scope``
               'all') or per layer and module ('module'). Pass 2: prefill again with
               the winners applied to every position, so the KV cache holds keys and
               values computed with them; decode applies them too: 2 prefills, then
               decode at one-LoRA cost (m LoRAs for top m).
  request_lag  the Arrow filter once per request, layer and module: the k adapters with
               the largest mean |arrow . x| over the span's tokens; then SpectR per
               token among those k, in prefill and decode. Pooled per layer and module,
               not over layers: arrows of different modules and layers live in
               different input spaces with different score scales, and pooling per
               layer keeps it one pass (the candidates of layer l come from layer l's
               own inputs in the same prefill). Per-token cost 2 h r k, independent of N.
  gating       ``lag`` / ``request_lag`` with ``gate`` (a margin threshold) or
               ``layers`` (the layers that route): tokens below the margin, and every
               token of the other layers, use the fallback: the request's vote winner
               (a vote pass first, as for ``vote``) or no adapter.

How ``generate`` runs them (``RoutedAdapters.request_passes``): a library holding a
request-level router with no ``state`` yet is *resolving*: its forward pass computes
request-level quantities on the fly and returns them in the telemetry
(``split_aux``), from which ``with_request_state`` fixes them for the following
passes. With no voting router in the batch this is one prefill (request_lag's
candidates come from that same prefill); with one, the first prefill only votes
(every voting row routes per token with its router ungated) and a second prefill
applies the result. Rows that do not use a request-level router route the same way in
both passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from lag_jax.routing import routers
from lag_jax.routing.routers import LayerLibrary, RouterSpec

_NEG = -jnp.inf


@struct.dataclass
class RequestState:
  """Request-level routing state of one library, by module, leaves [L, B, ...].

  Attributes:
    cand: [L, B, K] int32, ``request_lag``'s candidates (best pooled score first; -1:
      none), K the largest k of the batch's request_lag routers (1 if none).
    ids: [L, B, M] int32, the vote's adapters (most votes first; -1: none), M the
      largest vote_top_m of the batch's voting routers (1 if none).
    weights: [L, B, M] float32, their vote shares (sum 1 over a request's ids).
  """

  cand: dict[str, jax.Array]
  ids: dict[str, jax.Array]
  weights: dict[str, jax.Array]

  def pad_batch(self, extra: int) -> RequestState:
    def pad(x, value):
      return jnp.pad(x, ((0, 0), (0, extra), (0, 0)), constant_values=value)

    return RequestState(
      cand={m: pad(v, -1) for m, v in self.cand.items()},
      ids={m: pad(v, -1) for m, v in self.ids.items()},
      weights={m: pad(v, 0.0) for m, v in self.weights.items()},
    )


def state_dims(specs: Sequence[RouterSpec], n: int) -> tuple[int, int]:
  """(K, M): the widths of a library's RequestState for these routers and N = n."""
  K = max([min(s.k, n) for s in specs if s.name == "request_lag"], default=1)
  M = max([min(s.vote_top_m, n) for s in specs if s.votes], default=1)
  return K, M


# --- Per-token building blocks ------------------------------------------------------


def _margin(values, valid):
  """Relative gap (best - second) / best of [..., C] values where ``valid``; 1 where
  fewer than two are valid (nothing to confuse), 0 where the best is 0."""
  if values.shape[-1] < 2:
    return jnp.ones(values.shape[:-1], jnp.float32)
  top2 = jax.lax.top_k(jnp.where(valid, values, _NEG), 2)[0]
  first, second = top2[..., 0], top2[..., 1]
  gap = (first - jnp.where(jnp.isfinite(second), second, 0.0)) / jnp.maximum(first, 1e-30)
  return jnp.where(jnp.isfinite(second), jnp.where(first > 0, gap, 0.0), 1.0)


def lag_select(x, lib: LayerLibrary, allowed, k: int, projection: str, want_margin: bool):
  """The paper's LAG decision (``routers.route_lag``, op for op) and what votes and
  gates need: (sel [B, T], ok, z_sel [B, T, R], cand [B, T, C], n2 [B, T, C] (squared
  norms, -1 for disallowed candidates), margin [B, T] or None)."""
  scores = routers.arrow_scores(x, lib, allowed)
  vals, cand = routers._candidates(scores, k)  # [B, T, C]
  z = routers._project_candidates(x, lib.a, cand, projection)  # [B, T, C, R]
  zr = z
  if lib.shared is not None:
    zr = routers._project_candidates(routers.routing_input(x, lib), lib.a, cand, projection)
  n2 = jnp.sum(jnp.square(zr.astype(jnp.float32)), axis=-1)
  n2 = jnp.where(jnp.isfinite(vals), n2, -1.0)
  best = routers._argmax_low_id(n2, cand)
  sel = jnp.take_along_axis(cand, best[..., None], axis=-1)[..., 0]
  z_sel = jnp.take_along_axis(z, best[..., None, None], axis=2)[:, :, 0]
  ok = jnp.isfinite(jnp.take_along_axis(vals, best[..., None], axis=-1)[..., 0])
  margin = None
  if want_margin:
    if cand.shape[-1] >= 2:
      margin = _margin(jnp.sqrt(jnp.maximum(n2, 0.0)), n2 >= 0)
    else:  # k = 1 is Arrow: its decision is the arrow scores' top 1
      margin = _margin(scores, jnp.isfinite(scores))
  return sel, ok, z_sel, cand, n2, margin


def pooled_candidates(x, lib: LayerLibrary, allowed, span, k: int):
  """request_lag's filter: the k allowed adapters with the largest mean |arrow . x|
  over each request's span tokens. span [B, T] float (1: counts); returns
  (cand [B, k] int32, -1 where fewer are allowed; pooled scores [B, N])."""
  s = routers.arrow_scores(x, lib, allowed)  # [B, T, N], -inf where not allowed
  s = jnp.where(jnp.isfinite(s), s, 0.0)
  count = jnp.maximum(jnp.sum(span, axis=1), 1.0)  # [B]
  pooled = jnp.einsum("bt,btn->bn", span, s) / count[:, None]
  pooled = jnp.where(allowed, pooled, _NEG)
  vals, cand = jax.lax.top_k(pooled, min(k, pooled.shape[-1]))
  return jnp.where(jnp.isfinite(vals), cand, -1).astype(jnp.int32), pooled


def rerank(x, lib: LayerLibrary, allowed, cand, want_margin: bool):
  """SpectR per token among each request's candidates cand [B, C] (-1: none):
  (sel [B, T], ok, z_sel [B, T, R], cand [B, T, C], n2 [B, T, C], margin or None)."""
  B, T, I = x.shape
  C = cand.shape[-1]
  R = lib.a.shape[1]
  ids = jnp.clip(cand, 0, lib.a.shape[0] - 1)
  ok_c = (cand >= 0) & jnp.take_along_axis(allowed, ids, axis=1)  # [B, C]
  rows = routers.gather_adapters(lib.a, ids).astype(x.dtype).reshape(B, C * R, I)
  z = jnp.einsum("bti,bji->btj", x, rows).reshape(B, T, C, R)
  zr = z
  if lib.shared is not None:
    zr = jnp.einsum("bti,bji->btj", routers.routing_input(x, lib), rows).reshape(B, T, C, R)
  n2 = jnp.where(ok_c[:, None, :], jnp.sum(jnp.square(zr.astype(jnp.float32)), axis=-1), -1.0)
  cand_t = jnp.broadcast_to(cand[:, None, :], (B, T, C))
  best = routers._argmax_low_id(n2, cand_t)
  sel = jnp.take_along_axis(cand_t, best[..., None], axis=-1)[..., 0]
  z_sel = jnp.take_along_axis(z, best[..., None, None], axis=2)[:, :, 0]
  ok = jnp.take_along_axis(n2, best[..., None], axis=-1)[..., 0] >= 0
  margin = None
  if want_margin:
    margin = _margin(jnp.sqrt(jnp.maximum(n2, 0.0)), n2 >= 0) if C >= 2 else jnp.ones((B, T))
  return jnp.where(ok, sel, 0), ok, z_sel, cand_t, n2, margin


def tally(spec: RouterSpec, sel, ok, cand, n2, span, layer, n: int):
  """One layer and module's votes [B, N] over the span: a count of the decisions, or
  the sum of each token's normalised rerank scores over its candidates."""
  B = sel.shape[0]
  w = span * ok.astype(span.dtype)  # [B, T]
  if spec.vote_layers is not None:
    w = w * jnp.isin(layer, jnp.asarray(spec.vote_layers, jnp.int32)).astype(w.dtype)
  rows = jnp.arange(B)[:, None]
  if spec.vote_score == "count":
    return jnp.zeros((B, n), jnp.float32).at[rows, jnp.clip(sel, 0, n - 1)].add(w)
  norms = jnp.sqrt(jnp.maximum(n2, 0.0)) * (n2 >= 0)  # [B, T, C]
  share = norms / jnp.maximum(jnp.sum(norms, axis=-1, keepdims=True), 1e-30)
  return (
    jnp.zeros((B, n), jnp.float32)
    .at[rows[:, :, None], jnp.clip(cand, 0, n - 1)]
    .add(w[..., None] * share)
  )


def top_m(votes, m: int, width: int):
  """The m adapters with the most votes ([..., N] -> ids, weights [..., width]): ids
  -1 and weight 0 past the adapters with votes; weights are vote shares (sum 1)."""
  vals, ids = jax.lax.top_k(votes, m)
  has = vals > 0
  ids = jnp.where(has, ids, -1).astype(jnp.int32)
  w = jnp.where(has, vals, 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
  pad = [(0, 0)] * (votes.ndim - 1) + [(0, width - m)]
  return jnp.pad(ids, pad, constant_values=-1), jnp.pad(w, pad)


def apply_mixture(x, lib: LayerLibrary, allowed, ids, weights):
  """sum_m w_m B*_m A*_m x with each request's ids / weights [B, M] (-1: none): delta
  [B, T, O] and chosen [B, T] (the first id, -1 where it does not apply here). With
  M = 1 it is ``routers.route_fixed`` exactly (the weight is 1 or the id -1)."""
  if ids.shape[-1] == 1:
    return routers.route_fixed(x, lib, allowed, ids[:, 0])
  B, T, I = x.shape
  M = ids.shape[-1]
  R = lib.a.shape[1]
  idc = jnp.clip(ids, 0, lib.a.shape[0] - 1)
  ok = (ids >= 0) & jnp.take_along_axis(allowed, idc, axis=1)  # [B, M]
  w = jnp.where(ok, weights, 0.0).astype(x.dtype)
  rows = routers.gather_adapters(lib.a, idc).astype(x.dtype).reshape(B, M * R, I)
  z = jnp.einsum("bti,bji->btj", x, rows).reshape(B, T, M, R)
  delta = jnp.einsum("btmr,bm,bmor->bto", z, w, lib.b[idc].astype(x.dtype))
  chosen = jnp.where(ok[:, 0], ids[:, 0], -1).astype(jnp.int32)
  return delta, jnp.broadcast_to(chosen[:, None], (B, T))


# --- One layer and module, a batch of requests -------------------------------------


def _route_one(spec, x, lib, allowed, layer, span, state, K: int):
  """(delta, chosen, votes [B, N] or None, cand [B, K] or None) for one router."""
  B, T = x.shape[:2]
  N = lib.a.shape[0]
  resolving = state is None
  if spec.name == "vote":
    if not resolving:
      d, c = apply_mixture(x, lib, allowed, state["ids"], state["weights"])
      return d, c, None, None
    sel, ok, z_sel, cand, n2, _ = lag_select(x, lib, allowed, spec.k, spec.projection, False)
    d, c = routers._hard(sel, ok, z_sel, lib)
    return d, c, tally(spec, sel, ok, cand, n2, span, layer, N), None
  # lag or request_lag, gated or not.
  first_pass = resolving and spec.votes  # votes need the ungated decisions
  want_margin = spec.gate > 0 and not first_pass
  cand_out = None
  if spec.name == "request_lag":
    k = min(spec.k, N)
    if resolving:
      req_cand, _ = pooled_candidates(x, lib, allowed, span, k)
      cand_out = jnp.pad(req_cand, ((0, 0), (0, K - k)), constant_values=-1)
    else:
      req_cand = state["cand"][:, :k]
    sel, ok, z_sel, cand, n2, margin = rerank(x, lib, allowed, req_cand, want_margin)
  else:
    sel, ok, z_sel, cand, n2, margin = lag_select(
      x, lib, allowed, spec.k, spec.projection, want_margin
    )
  d, c = routers._hard(sel, ok, z_sel, lib)
  if first_pass:
    return d, c, tally(spec, sel, ok, cand, n2, span, layer, N), cand_out
  if spec.gated:
    confident = jnp.ones((B, T), bool)
    if spec.gate > 0:
      confident = margin >= spec.gate
    if spec.layers is not None:
      confident = confident & jnp.isin(layer, jnp.asarray(spec.layers, jnp.int32))
    if spec.gate_fallback == "vote":
      fd, fc = apply_mixture(x, lib, allowed, state["ids"], state["weights"])
    else:
      fd, fc = jnp.zeros_like(d), jnp.full((B, T), -1, jnp.int32)
    d = jnp.where(confident[..., None], d, fd)
    c = jnp.where(confident, c, fc)
  return d, c, None, cand_out


def route_batch_request(
  specs: tuple[RouterSpec, ...],
  router_index,
  x,
  lib: LayerLibrary,
  mask,
  fixed_ids,
  layer,
  span,
  state,
):
  """``routers.route_batch`` for a tuple of routers with request-level ones.

  Args:
    specs, router_index, x, lib, mask, fixed_ids: as in ``routers.route_batch``.
    layer: [] int32, this layer's index.
    span: [B, T] bool, the prompt span of each request (resolving only; None: all).
    state: this layer and module's dict(cand [B, K], ids [B, M], weights [B, M]), or
      None while resolving.
  Returns:
    delta [B, T, O], chosen [B, T], and while resolving the request-level quantities
    dict(votes [B, N] float32, cand [B, K] int32) (zeros / -1 for rows whose router
    has none), else None.
  """
  B, T = x.shape[:2]
  N = lib.a.shape[0]
  K, _ = state_dims(specs, N)
  resolving = state is None
  if resolving:
    span = jnp.ones((B, T), jnp.float32) if span is None else span.astype(jnp.float32)
  allowed = mask & lib.valid[None, :]
  delta = chosen = None
  votes = jnp.zeros((B, N), jnp.float32)
  cand = jnp.full((B, K), -1, jnp.int32)
  for i, spec in enumerate(specs):
    if spec.request_level:
      d, c, v, cd = _route_one(spec, x, lib, allowed, layer, span, state, K)
    else:
      d, c = routers.route(spec, x, lib, mask, fixed_ids)
      v = cd = None
    pick = router_index == i
    if delta is None:
      delta, chosen = d, c
    else:
      delta = jnp.where(pick[:, None, None], d, delta)
      chosen = jnp.where(pick[:, None], c, chosen)
    if resolving and v is not None:
      votes = jnp.where(pick[:, None], v, votes)
    if resolving and cd is not None:
      cand = jnp.where(pick[:, None], cd, cand)
  if not resolving:
    return delta, chosen, None
  return delta, chosen, {"votes": votes, "cand": cand}


def resolve_state(
  specs: tuple[RouterSpec, ...], router_index, stats: dict[str, dict], n: int
) -> RequestState:
  """The RequestState from a resolving pass's stacked quantities (module ->
  dict(votes [L, B, N], cand [L, B, K])): each voting row's winner(s) by its router's
  vote_scope / vote_top_m, and request_lag's candidates as they were."""
  K, M = state_dims(specs, n)
  modules = tuple(stats)
  any_stat = stats[modules[0]]["votes"]
  L, B = any_stat.shape[:2]
  ids = {m: jnp.full((L, B, M), -1, jnp.int32) for m in modules}
  weights = {m: jnp.zeros((L, B, M), jnp.float32) for m in modules}
  for i, spec in enumerate(specs):
    if not spec.votes:
      continue
    m_top = min(spec.vote_top_m, n)
    pick = (router_index == i)[None, :, None]
    if spec.vote_scope == "all":
      total = sum(jnp.sum(stats[m]["votes"], axis=0) for m in modules)  # [B, N]
      v_ids, v_w = top_m(total, m_top, M)
      per_module = {m: (v_ids[None], v_w[None]) for m in modules}
    else:
      per_module = {m: top_m(stats[m]["votes"], m_top, M) for m in modules}
    for m in modules:
      v_ids, v_w = per_module[m]
      ids[m] = jnp.where(pick, jnp.broadcast_to(v_ids, (L, B, M)), ids[m])
      weights[m] = jnp.where(pick, jnp.broadcast_to(v_w, (L, B, M)), weights[m])
  return RequestState(cand={m: stats[m]["cand"] for m in modules}, ids=ids, weights=weights)
