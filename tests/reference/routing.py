"""A brute-force float64 numpy reference for the LAG routers, written from the method
(docs/method.md), not from lag_jax's code.

Nothing here uses lag_jax's signatures or library: every adapter is taken from its
raw PEFT factors (A [r, I], B [O, r], scale s), its signature comes from a dense
SVD of s B A in float64, and the routers loop over tokens and adapters in Python.

  scores      |arrow_i . x|, arrow_i = the top right singular vector of s_i B_i A_i
  spectr      ||V_i^T x||, the norm of x projected on the adapter's row space
  delta       s_i B_i A_i x (the raw factors; the spectral form is equal by construction)

Routers (one per request; ties go to the lower adapter id; adapters a request's mask
excludes and all-zero adapters are never used; -1 means "no adapter"):

  none           no delta
  fixed          the request's adapter
  uniform        the mean of the allowed adapters' deltas, all-zero ones counted (chosen -1)
  arrow          the adapter with the largest score
  arrow_softmax  top min(k, n) by score, softmax(score / T) over them, the weighted
                 sum of their deltas; chosen = the top-scored one
  spectr         the adapter with the largest projection norm
  lag            top min(k, n) by score, then the largest projection norm among them
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Singular values at or below this fraction of the largest are null directions.
NULL_TOL = 1e-6


@dataclasses.dataclass
class RefAdapter:
  """One adapter at one module and layer, from its raw factors (float64).

  Attributes:
    a: [r, I] lora_A.
    b: [O, r] lora_B times the LoRA scale.
    arrow: [I] the top right singular vector of b a (zero if b a = 0).
    v: [r', I] an orthonormal basis of the row space of b a (r' = its rank).
    valid: b a is not zero.
  """

  a: np.ndarray
  b: np.ndarray
  arrow: np.ndarray
  v: np.ndarray
  valid: bool

  @classmethod
  def from_factors(cls, a, b, scale: float = 1.0) -> RefAdapter:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64) * float(scale)
    dense = b @ a  # [O, I]: fine for a reference
    _, s, vt = np.linalg.svd(dense, full_matrices=False)
    valid = bool(s[0] > 0)
    keep = s > NULL_TOL * s[0] if valid else np.zeros_like(s, bool)
    arrow = vt[0] if valid else np.zeros(a.shape[1])
    return cls(a=a, b=b, arrow=arrow, v=vt[keep], valid=valid)

  @classmethod
  def zero(cls, out_dim: int, in_dim: int) -> RefAdapter:
    """An adapter that does not cover this module / layer."""
    return cls(
      a=np.zeros((1, in_dim)),
      b=np.zeros((out_dim, 1)),
      arrow=np.zeros(in_dim),
      v=np.zeros((0, in_dim)),
      valid=False,
    )

  def delta(self, x: np.ndarray) -> np.ndarray:
    return self.b @ (self.a @ x)

  def score(self, x: np.ndarray) -> float:
    return abs(float(self.arrow @ x))

  def norm(self, x: np.ndarray) -> float:
    return float(np.linalg.norm(self.v @ x))


_MODULE_CACHE: dict = {}


def ref_module(adapters, config, module: str, layer: int) -> list[RefAdapter]:
  """RefAdapters of LoraAdapters (lag_jax.adapters.LoraAdapter) at one module and layer,
  read from their raw ModuleLora factors. Cached per adapter objects (kept alive by the
  cache, so their ids stay unique) and place."""
  key = (tuple(id(a) for a in adapters), id(config), module, layer)
  if key not in _MODULE_CACHE:
    out_dim, in_dim = config.module_shapes()[module]
    refs = []
    for adapter in adapters:
      found = [m for m in adapter.modules.values() if m.module == module and m.layer == layer]
      if found:
        m = found[0]
        refs.append(RefAdapter.from_factors(m.a, m.b, m.scale))
      else:
        refs.append(RefAdapter.zero(out_dim, in_dim))
    _MODULE_CACHE[key] = (list(adapters), config, refs)
  return _MODULE_CACHE[key][2]


def _ranked(values: dict[int, float]) -> list[int]:
  """Ids by decreasing value, ties to the lower id."""
  return sorted(values, key=lambda i: (-values[i], i))


def _gap(values: dict[int, float], order: list[int], at: int) -> float:
  """Relative gap between the values ranked ``at - 1`` and ``at`` (inf if none)."""
  if at <= 0 or at >= len(order):
    return math.inf
  top = max(abs(values[order[0]]), 1e-300)
  return (values[order[at - 1]] - values[order[at]]) / top


@dataclasses.dataclass
class TokenResult:
  delta: np.ndarray
  chosen: int
  # The smallest relative gap between two values whose order decided this token's
  # routing (inf if none): a near-tie makes float32 and float64 disagree legitimately.
  margin: float = math.inf


def route_token(
  name: str,
  x: np.ndarray,
  lib: list[RefAdapter],
  allowed: np.ndarray,
  k: int = 1,
  temperature: float = 1.0,
  fixed_id: int = -1,
) -> TokenResult:
  """One router at one token: x [I], lib the N adapters, allowed [N] (the mask)."""
  x = np.asarray(x, np.float64)
  out_dim = lib[0].b.shape[0]
  zero = np.zeros(out_dim)
  ok = [i for i in range(len(lib)) if allowed[i] and lib[i].valid]
  if name == "none":
    return TokenResult(zero, -1)
  if name == "fixed":
    if fixed_id >= 0 and fixed_id in ok:
      return TokenResult(lib[fixed_id].delta(x), fixed_id)
    return TokenResult(zero, -1)
  if not ok:
    return TokenResult(zero, -1)
  if name == "uniform":
    # A merge of the allowed adapters: one that is zero here still counts in the mean.
    n_allowed = sum(1 for i in range(len(lib)) if allowed[i])
    return TokenResult(sum(lib[i].delta(x) for i in ok) / n_allowed, -1)
  scores = {i: lib[i].score(x) for i in ok}
  by_score = _ranked(scores)
  if name == "arrow":
    sel = by_score[0]
    return TokenResult(lib[sel].delta(x), sel, _gap(scores, by_score, 1))
  if name == "arrow_softmax":
    cand = by_score[: min(k, len(ok))]
    logits = np.array([scores[i] for i in cand]) / temperature
    w = np.exp(logits - logits.max())
    w /= w.sum()
    delta = sum(wi * lib[i].delta(x) for wi, i in zip(w, cand))
    return TokenResult(
      delta, cand[0], min(_gap(scores, by_score, 1), _gap(scores, by_score, len(cand)))
    )
  if name == "spectr":
    cand, margin = ok, math.inf
  elif name == "lag":
    cand = by_score[: min(k, len(ok))]
    margin = _gap(scores, by_score, len(cand))
  else:
    raise ValueError(f"unknown router {name!r}")
  norms = {i: lib[i].norm(x) for i in cand}
  by_norm = _ranked(norms)
  sel = by_norm[0]
  return TokenResult(lib[sel].delta(x), sel, min(margin, _gap(norms, by_norm, 1)))


def route_batch(specs, router_index, x, lib, mask, fixed_ids):
  """x [B, T, I]; specs: objects with .name, .k, .temperature (e.g. RouterSpec);
  router_index [B], mask [B, N], fixed_ids [B].

  Returns delta [B, T, O] float64, chosen [B, T] int, margin (the smallest over tokens).
  """
  B, T, _ = x.shape
  delta = np.zeros((B, T, lib[0].b.shape[0]))
  chosen = np.full((B, T), -1, np.int64)
  margin = math.inf
  for bi in range(B):
    spec = specs[int(router_index[bi])]
    for t in range(T):
      r = route_token(
        spec.name, x[bi, t], lib, mask[bi], spec.k, spec.temperature, int(fixed_ids[bi])
      )
      delta[bi, t], chosen[bi, t] = r.delta, r.chosen
      margin = min(margin, r.margin)
  return delta, chosen, margin
