"""Request-level routing beyond the paper: the state of vote, request_lag and
confidence gating (docs/method.md says what each does; the routers themselves are in
``routing/core.py``, written once for every form of a library).

These routers add state per request: request_lag's candidates, or the adapter(s) a
vote chose, per layer and module (``RequestState``, leaves [L, B, ...], carried
through the decoder's layer scan with the library).

How ``generate`` runs them (``RoutedAdapters.request_passes``; the contract is
``model.layers.RequestLevelHook``): a library holding a request-level router with no
``state`` yet is *resolving*: its forward pass computes request-level quantities on
the fly and returns them in the telemetry (``split_aux``), from which
``with_request_state`` fixes them for the following passes. With no voting router in
the batch this is one prefill (request_lag's candidates come from that same prefill);
with one, the first prefill only votes (every voting row routes per token with its
router ungated) and a second prefill applies the result, so the KV cache holds keys
and values computed with the winners. Rows that do not use a request-level router
route the same way in both passes. A vote in two rounds (``vote_finalists``) adds a
prefill between them: the first keeps each request's finalists (``finalists``), the
second votes among them alone (the library is resolving again), the last applies the
winners.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from lag_jax.routing import core
from lag_jax.routing.routers import RouterSpec


@struct.dataclass
class RequestState:
  """Request-level routing state of one library, by module, leaves [L, B, ...].

  Attributes:
    cand: [L, B, C] int32, ``request_lag``'s candidates (best pooled score first; -1:
      none), C the largest k of the batch's request_lag routers (1 if none).
    ids: [L, B, M] int32, the vote's adapters (most votes first; -1: none), M the
      largest vote_top_m of the batch's voting routers (1 if none).
    weights: [L, B, M] float32, their vote shares (sum 1 over a request's ids).
    finalists: [L, B, F] int32 between the rounds of a two-round vote: the first
      round's F leading adapters (-1: none; F the largest vote_finalists of the batch),
      among which the next prefill votes; None once every vote is final.
  """

  cand: dict[str, jax.Array]
  ids: dict[str, jax.Array]
  weights: dict[str, jax.Array]
  finalists: dict[str, jax.Array] | None = None

  def pad_batch(self, extra: int) -> RequestState:
    def pad(x, value):
      return jnp.pad(x, ((0, 0), (0, extra), (0, 0)), constant_values=value)

    return RequestState(
      cand={m: pad(v, -1) for m, v in self.cand.items()},
      ids={m: pad(v, -1) for m, v in self.ids.items()},
      weights={m: pad(v, 0.0) for m, v in self.weights.items()},
      finalists=None
      if self.finalists is None
      else {m: pad(v, -1) for m, v in self.finalists.items()},
    )


def state_dims(specs: Sequence[RouterSpec], n: int) -> tuple[int, int]:
  """(C, M): the widths of a library's RequestState for these routers and N = n."""
  C = max([min(s.k, n) for s in specs if s.name == "request_lag"], default=1)
  M = max([min(s.vote_top_m, n) for s in specs if s.votes], default=1)
  return C, M


def finalist_width(specs: Sequence[RouterSpec], n: int) -> int:
  """F: the widest two-round vote's finalists for N = n (0: no two-round vote)."""
  return max([min(s.vote_finalists, n) for s in specs if s.two_rounds], default=0)


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


def route_batch_request(
  specs: tuple[RouterSpec, ...],
  router_index,
  x,
  lib,
  mask,
  fixed_ids,
  layer,
  span,
  state,
):
  """``core.route_module`` on a resident library with the state's width C for these
  routers: (delta [B, T, O], chosen [B, T], dict(votes, cand) while resolving else
  None)."""
  C, _ = state_dims(specs, lib.size)
  return core.route_module(specs, router_index, x, lib, mask, fixed_ids, layer, span, state, C)


def resolve_state(
  specs: tuple[RouterSpec, ...],
  router_index,
  stats: dict[str, dict],
  n: int,
  previous: RequestState | None = None,
) -> RequestState:
  """The RequestState from a resolving pass's stacked quantities (module ->
  dict(votes [L, B, N], cand [L, B, C])): each voting row's winner(s) by its router's
  vote_scope / vote_top_m / vote_modules, and request_lag's candidates as they were.

  A two-round vote's first pass (``previous`` None) gives its rows' F leading
  adapters as ``finalists``; its second pass (``previous`` holds them) gives their
  winners among those, and every other row keeps ``previous``'s state.
  """
  C, M = state_dims(specs, n)
  F = finalist_width(specs, n)
  second = previous is not None and previous.finalists is not None
  modules = tuple(stats)
  any_stat = stats[modules[0]]["votes"]
  L, B = any_stat.shape[:2]
  if second:
    ids, weights = dict(previous.ids), dict(previous.weights)
  else:
    ids = {m: jnp.full((L, B, M), -1, jnp.int32) for m in modules}
    weights = {m: jnp.zeros((L, B, M), jnp.float32) for m in modules}
  finalists = None if second or not F else {m: jnp.full((L, B, F), -1, jnp.int32) for m in modules}
  for i, spec in enumerate(specs):
    if not spec.votes or (second and not spec.two_rounds):
      continue
    pick = (router_index == i)[None, :, None]
    counted = [m for m in modules if spec.vote_modules is None or m in spec.vote_modules]
    # The first round of a two-round vote keeps its finalists (their order: most
    # votes first) and, until the second round decides, their top m as winners.
    widths = [(min(spec.vote_top_m, n), M, ids, weights)]
    if spec.two_rounds and not second:
      widths.append((min(spec.vote_finalists, n), F, finalists, None))
    for m_top, width, out_ids, out_w in widths:
      if spec.vote_scope == "all":
        zero = jnp.zeros((B, n), jnp.float32)
        total = sum((jnp.sum(stats[m]["votes"], axis=0) for m in counted), zero)  # [B, N]
        v_ids, v_w = top_m(total, m_top, width)
        per_module = {m: (v_ids[None], v_w[None]) for m in modules}
      else:
        per_module = {m: top_m(stats[m]["votes"] * (m in counted), m_top, width) for m in modules}
      for m in modules:
        v_ids, v_w = per_module[m]
        out_ids[m] = jnp.where(pick, jnp.broadcast_to(v_ids, (L, B, width)), out_ids[m])
        if out_w is not None:
          out_w[m] = jnp.where(pick, jnp.broadcast_to(v_w, (L, B, width)), out_w[m])
  cand = previous.cand if second else {m: stats[m]["cand"] for m in modules}
  return RequestState(cand=cand, ids=ids, weights=weights, finalists=finalists)
