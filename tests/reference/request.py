"""A brute-force float64 numpy reference for the request-level routers (vote,
request_lag, confidence gating), written from docs/method.md and lag_jax/routing/request.py's
docstring, on reference.routing's RefAdapters (raw PEFT factors, dense SVDs).

One layer and module at a time; a request's tokens x [T, I]; ``lib`` the N RefAdapters;
``allowed`` [N] the request's mask. Ties go to the lower adapter id everywhere.

  lag_token        the paper's LAG decision: top min(k, N) by |arrow . x|, the largest
                   ||V^T x|| among them; its margin (best - second) / best over the
                   candidates' norms, or over the arrow scores when min(k, N) = 1
  votes            over the span's tokens: +1 for each decision (count), + its margin
                   (margin), or + each candidate's norm / the sum of the token's
                   candidates' norms (score)
  top_m            the m adapters with the most votes, weights = their vote shares
  pooled_cand      request_lag's filter: the top k by the mean |arrow . x| over the span
  rerank_token     SpectR among a request's candidates; margin as lag's (1 with one)
  second round     a two-round vote's (vote_finalists F >= 2) second resolving pass:
                   every span token's rerank_token among the request's first F
                   finalists, tallied as ``votes``; each token takes its decision
  mixture          sum_m w_m s_m B_m A_m x
"""

from __future__ import annotations

import math

import numpy as np

from reference import routing as ref


def _ok(lib, allowed):
  return [i for i in range(len(lib)) if allowed[i] and lib[i].valid]


def margin_of(values: dict[int, float]) -> float:
  if len(values) < 2:
    return 1.0
  first, second = sorted(values.values(), reverse=True)[:2]
  return 0.0 if first <= 0 else (first - second) / first


def lag_token(x, lib, allowed, k):
  """dict(sel, cand, norms, margin, tie): tie = the smallest relative gap that decided."""
  ok = _ok(lib, allowed)
  if not ok:
    return dict(sel=-1, cand=[], norms={}, margin=1.0, tie=math.inf)
  scores = {i: lib[i].score(x) for i in ok}
  by_score = ref._ranked(scores)
  cand = by_score[: min(k, len(ok))]
  norms = {i: lib[i].norm(x) for i in cand}
  by_norm = ref._ranked(norms)
  margin = margin_of(norms) if min(k, len(lib)) >= 2 else margin_of(scores)
  tie = min(ref._gap(scores, by_score, len(cand)), ref._gap(norms, by_norm, 1))
  return dict(sel=by_norm[0], cand=cand, norms=norms, margin=margin, tie=tie)


def rerank_token(x, lib, allowed, cand):
  ok = [i for i in cand if i >= 0 and allowed[i] and lib[i].valid]
  if not ok:
    return dict(sel=-1, cand=[], norms={}, margin=1.0, tie=math.inf)
  norms = {i: lib[i].norm(x) for i in ok}
  by_norm = ref._ranked(norms)
  margin = margin_of(norms) if len(cand) >= 2 else 1.0
  return dict(sel=by_norm[0], cand=ok, norms=norms, margin=margin, tie=ref._gap(norms, by_norm, 1))


def add_votes(votes, decision, score: str, weight: float = 1.0):
  """Adds one token's decision to votes [N]."""
  if decision["sel"] < 0 or weight == 0:
    return
  if score == "count":
    votes[decision["sel"]] += weight
    return
  if score == "margin":
    votes[decision["sel"]] += weight * decision["margin"]
    return
  total = sum(decision["norms"].values())
  for i, n in decision["norms"].items():
    votes[i] += weight * (n / total if total > 0 else 0.0)


def pooled_cand(xs, lib, allowed, span, k):
  """(cand [k] with -1 padding, tie gap) for a request's tokens xs [T, I], span [T]."""
  ok = _ok(lib, allowed)
  tokens = [t for t in range(len(xs)) if span[t]]
  pooled = {i: sum(lib[i].score(xs[t]) for t in tokens) / max(len(tokens), 1) for i in ok}
  order = ref._ranked(pooled)
  k = min(k, len(lib))
  cand = order[:k] + [-1] * (k - min(k, len(order)))
  return cand, ref._gap(pooled, order, min(k, len(order)))


def top_m(votes, m: int, width: int):
  """ids, weights [width]: the m largest positive votes (ties to the lower id)."""
  order = sorted(range(len(votes)), key=lambda i: (-votes[i], i))[:m]
  order = [i for i in order if votes[i] > 0]
  total = sum(votes[i] for i in order)
  ids = order + [-1] * (width - len(order))
  w = [votes[i] / total for i in order] + [0.0] * (width - len(order))
  return np.array(ids), np.array(w)


def mixture(x, lib, allowed, ids, weights):
  """(delta [O], chosen) of a request's adapters ids / weights."""
  delta = np.zeros(lib[0].b.shape[0])
  for i, w in zip(ids, weights, strict=True):
    if i >= 0 and allowed[i]:
      delta += w * lib[i].delta(x)
  first = int(ids[0])
  chosen = first if first >= 0 and allowed[first] and lib[first].valid else -1
  return delta, chosen


def ref_route_request(spec, xs, lib, allowed, layer, span, state, fixed_id=-1):
  """One request (xs [T, I]) through ``spec`` as lag_jax.routing.request defines it.

  state: None while resolving, else dict(cand [K], ids [M], weights [M]) of this layer
  and module, with finalists [F] between a two-round vote's rounds. Returns
  dict(delta [T, O], chosen [T], votes [N] or None, cand or None, tie: the smallest
  gap that decided something, gate_gap: the smallest |margin - gate|).
  """
  T = len(xs)
  out = dict(
    delta=np.zeros((T, lib[0].b.shape[0])),
    chosen=np.full(T, -1),
    votes=None,
    cand=None,
    tie=math.inf,
    gate_gap=math.inf,
  )
  if not spec.request_level:
    d, c, tie = ref.route_batch([spec], [0], xs[None], lib, allowed[None], [fixed_id])
    out.update(delta=d[0], chosen=c[0], tie=tie)
    return out
  resolving = state is None
  counted = spec.vote_layers is None or layer in spec.vote_layers
  if spec.name == "vote" and not resolving and spec.two_rounds and "finalists" in state:
    finalists = [int(c) for c in state["finalists"][: min(spec.vote_finalists, len(lib))]]
    votes = np.zeros(len(lib))
    for t in range(T):
      dec = rerank_token(xs[t], lib, allowed, finalists)
      out["tie"] = min(out["tie"], dec["tie"])
      if span[t] and counted:
        add_votes(votes, dec, spec.vote_score)
      sel = dec["sel"]
      out["chosen"][t] = sel
      if sel >= 0:
        out["delta"][t] = lib[sel].delta(xs[t])
    out["votes"] = votes
    return out
  if spec.name == "vote" and not resolving:
    for t in range(T):
      out["delta"][t], out["chosen"][t] = mixture(
        xs[t], lib, allowed, state["ids"], state["weights"]
      )
    return out
  votes = np.zeros(len(lib))
  req_cand = None
  if spec.name == "request_lag":
    if resolving:
      req_cand, tie = pooled_cand(xs, lib, allowed, span, spec.k)
      out["cand"], out["tie"] = req_cand, tie
    else:
      req_cand = [int(c) for c in state["cand"][: min(spec.k, len(lib))]]
  first_pass = resolving and spec.votes
  for t in range(T):
    if spec.name == "vote" or req_cand is None:
      dec = lag_token(xs[t], lib, allowed, spec.k)
    else:
      dec = rerank_token(xs[t], lib, allowed, req_cand)
    out["tie"] = min(out["tie"], dec["tie"])
    sel = dec["sel"]
    delta = lib[sel].delta(xs[t]) if sel >= 0 else np.zeros_like(out["delta"][t])
    if first_pass:
      if span[t] and counted:
        add_votes(votes, dec, spec.vote_score)
    elif spec.gated:
      confident = spec.layers is None or layer in spec.layers
      if spec.gate > 0:
        out["gate_gap"] = min(out["gate_gap"], abs(dec["margin"] - spec.gate))
        confident = confident and dec["margin"] >= spec.gate
      if not confident:
        if spec.gate_fallback == "vote":
          delta, sel = mixture(xs[t], lib, allowed, state["ids"], state["weights"])
        else:
          delta, sel = np.zeros_like(delta), -1
    out["delta"][t], out["chosen"][t] = delta, sel
  if first_pass:
    out["votes"] = votes
  return out
