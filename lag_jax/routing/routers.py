"""Routers and their settings: which adapter(s) of a library each token uses at one
module. The routers are written once in ``routing/core.py`` for every form of a
library; this module names them (``RouterSpec``) and keeps the resident entry points.

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

Beyond the paper (request-level state, ``lag_jax.routing.request``; they run through
``RoutedAdapters``, not ``route``):

  vote           per-token LAG over a prompt span, then the winning adapter (or the
                 top m, mixed by vote share) for every position of the request; with
                 ``vote_finalists`` F >= 2 in two rounds: the first vote's F leading
                 adapters, then a second vote among those F alone (SpectR per token)
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

import jax.numpy as jnp

from lag_jax.routing import core

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
VOTE_SCORES = ("count", "score", "margin")
GATE_FALLBACKS = ("vote", "none")
PROJECTIONS = ("auto", "gather", "dense", "grouped")


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
    vote_score: ``count`` the per-token decisions (majority; ties to the lower id),
      sum each token's normalised rerank ``score``s ||A*_c x|| / sum_c' ||A*_c' x||
      over its candidates, or weight each decision by its relative ``margin``
      (best - second) / best over the candidates' norms (the gate's margin): a token
      that several adapters explain alike (a first name many people share) counts
      little, one that singles out an adapter counts fully.
    vote_top_m: apply the m adapters with the most votes, mixed by their share of
      the m's votes (1: the winner alone, one LoRA per token).
    vote_layers: the layers whose decisions count in the vote (None: all); with
      vote_scope 'module' the other layers get no votes, hence no adapter.
    vote_modules: the modules whose decisions count in the vote (None: all the
      library holds); with vote_scope 'module' the others get no adapter.
    vote_finalists: ``vote`` in two rounds when F >= 2: the first vote (per-token LAG,
      as above) keeps its F leading adapters; a second prefill then decides every span
      token among those F alone (the largest ||A* x||, no Arrow filter) and tallies
      those decisions with the same vote_score, layers and modules; its winner(s)
      apply. A token that both finalists explain alike (a first name two people
      share) then weighs little with vote_score 'margin' or 'score', and the tokens
      that tell them apart decide. 0 or 1: one round.
    gate: ``lag`` / ``request_lag``: where the relative margin (best - second) / best
      of the scores that decided a token (the candidates' ||A* x||; the Arrow scores
      when there is one candidate) is below this, the token falls back (0: off).
    gate_fallback: what a gated token uses: the request's ``vote`` winner(s) (needs a
      vote pass over the prompt first) or ``none`` (no adapter).
    layers: ``lag`` / ``request_lag``: the layers that route per token; the others
      use the fallback (None: all).
    index_probe: ``lag`` (and the LAG decisions of ``vote`` / ``request_lag``): 0
      scans every arrow (exact); P > 0 scans only the members of the P clusters of the
      library's arrow index whose centroids score highest (sublinear in N;
      ``AdapterLibrary.with_index``; probing every cluster is the exact filter). Where
      probing would read more arrows than the exact scan (a prefill of T tokens with
      T * probe * W >= N; counted per request, so batching does not change it), the
      exact scan runs instead: decode steps probe.
    index_prefill: with index_probe, probe at every token, prompts included, even
      where the exact scan would read fewer arrows (the same filter at prefill and
      decode; it measures the index's decisions on the prompt's tokens).
    index_sketch: Z > 0: the library carries an arrow sketch of Z dimensions instead
      of the clustered index (``AdapterLibrary.with_sketch``, routing/arrow_sketch.py)
      and index_probe is its pool: per token every adapter is scored in the arrows' Z
      leading directions and the index_probe best (>= k) are rescored exactly. Decode
      steps use it; a prefill scans exactly unless index_prefill.
  """

  name: str = "lag"
  k: int = 20
  temperature: float = 1.0
  projection: str = "auto"
  vote_scope: str = "all"
  vote_score: str = "count"
  vote_top_m: int = 1
  vote_layers: tuple[int, ...] | None = None
  vote_modules: tuple[str, ...] | None = None
  vote_finalists: int = 0
  gate: float = 0.0
  gate_fallback: str = "vote"
  layers: tuple[int, ...] | None = None
  index_probe: int = 0
  index_prefill: bool = False
  index_sketch: int = 0

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
    if self.index_probe < 0:
      raise ValueError(f"router {self.name!r}: index_probe must be >= 0, got {self.index_probe}")
    if self.index_prefill and not self.index_probe:
      raise ValueError(f"router {self.name!r}: index_prefill needs index_probe > 0")
    if self.index_sketch < 0 or (self.index_sketch and not self.index_probe):
      raise ValueError(
        f"router {self.name!r}: index_sketch {self.index_sketch} needs index_probe > 0 "
        "(the pool rescored exactly)"
      )
    if self.index_sketch and self.index_probe < self.k:
      raise ValueError(
        f"router {self.name!r}: the sketch's pool (index_probe {self.index_probe}) must be "
        f">= k ({self.k})"
      )
    if self.vote_top_m < 1:
      raise ValueError(f"router {self.name!r}: vote_top_m must be >= 1, got {self.vote_top_m}")
    if self.vote_finalists < 0:
      raise ValueError(
        f"router {self.name!r}: vote_finalists must be >= 0, got {self.vote_finalists}"
      )
    if self.vote_finalists > 1 and self.name != "vote":
      raise ValueError(f"router {self.name!r}: vote_finalists applies to 'vote' only")
    if self.vote_finalists > 1 and self.vote_top_m > self.vote_finalists:
      raise ValueError(
        f"router {self.name!r}: vote_top_m {self.vote_top_m} exceeds vote_finalists "
        f"{self.vote_finalists} (the winners come from the finalists)"
      )
    if self.vote_modules is not None:
      modules = tuple(sorted({str(m) for m in self.vote_modules}))
      if not modules:
        raise ValueError(f"router {self.name!r}: vote_modules names no module")
      object.__setattr__(self, "vote_modules", modules)
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
  def two_rounds(self) -> bool:
    """A vote in two rounds (``vote_finalists`` >= 2): a third prefill."""
    return self.name == "vote" and self.vote_finalists > 1

  @property
  def request_level(self) -> bool:
    """Runs through ``lag_jax.routing.request`` (request-level state or the layer index)."""
    return self.name in REQUEST_ROUTERS or self.gated


# One layer's slice of a resident library at one module (``core.Resident``).
LayerLibrary = core.Resident


def route(spec: RouterSpec, x, lib: LayerLibrary, mask, fixed_ids):
  """One per-token router on one layer's slice of a resident library.

  Args:
    spec: the router.
    x: [B, T, I] the module's input.
    lib: this layer's slice of the library.
    mask: [B, N] bool, adapters each request may use.
    fixed_ids: [B] int32, the adapter of each request for ``fixed``.
  Returns:
    delta [B, T, O] in x's dtype, chosen [B, T] int32 (-1: none).
  """
  return route_batch((spec,), jnp.zeros(x.shape[:1], jnp.int32), x, lib, mask, fixed_ids)


def route_batch(specs: tuple[RouterSpec, ...], router_index, x, lib, mask, fixed_ids):
  """Requests in one batch may use different routers: router_index [B] picks from specs.

  Each distinct router runs once over the batch and rows take their own router's
  result, so switching routers between requests never recompiles. Request-level
  routers need their layer index and state: ``core.route_module``.
  """
  for spec in specs:
    if spec.request_level:
      raise ValueError(
        f"router {spec!r} routes with request-level state; run it through RoutedAdapters "
        "(or core.route_module with the layer and state), not routers.route_batch"
      )
  delta, chosen, _ = core.route_module(specs, router_index, x, lib, mask, fixed_ids)
  return delta, chosen
