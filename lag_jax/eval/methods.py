"""Evaluation methods: where knowledge comes from and how the task library is used
(the paper's methods, the routers beyond it), parsed from their names."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence

from lag_jax.errors import ConfigError
from lag_jax.routing import RouterSpec
from lag_jax.routing.shared import parse_mode


@dataclasses.dataclass(frozen=True)
class Method:
  """How one method sources knowledge and task skills.

  Attributes:
    name: as reported.
    knowledge: 'none' | 'oracle' | 'prag' (BM25-top document's adapter) | a router name.
    task: 'none' | 'oracle' | a router name.
    rag: put the BM25-top document in the prompt.
    gold_page: put the question's gold document in the prompt (the in-context
      ceiling of a knowledge adapter: the same model reading the page it was trained on).
    k: candidates for 'lag' / 'arrow_softmax' (and the request-level routers).
    span: the prompt tokens the knowledge library's request-level routing counts:
      'question' (the task input), 'user' (the user's message: instruction, input,
      RAG context) or 'prompt' (every token, chat template included).
    task_span: the same for the task library.
    knowledge_options, task_options: further RouterSpec fields as (name, value)
      pairs, e.g. (('vote_score', 'score'),); layers='edges' routes in the first and
      last third of the layers (the middle ones route worst).
    removal: shared input directions removed from the knowledge library's signatures
      for this method ('none' | 'mean:Q' | 'top:Q', lag_jax/routing/shared.py);
      '' = the run's setting (the job's ``shared_removal``).
  """

  name: str
  knowledge: str = "none"
  task: str = "none"
  rag: bool = False
  gold_page: bool = False
  k: int = 20
  span: str = "question"
  task_span: str = "user"
  knowledge_options: tuple = ()
  task_options: tuple = ()
  removal: str = ""

  @property
  def needs_retrieval(self) -> bool:
    """The BM25-top page in the prompt (RAG) or its adapter (PRAG) is part of it."""
    return self.rag or self.knowledge == "prag"


def standard_methods(k: int = 20, with_spectr: bool = True) -> list[Method]:
  """The paper's methods plus the uniform merge (SpectR where N makes it affordable)
  and a control, "Task only" (the right task adapter, no knowledge adapter): what the
  oracle scores without the knowledge library, i.e. from format and the base model's
  own memory; and "Page+Task", the ceiling of knowledge injection: the gold page in
  the prompt with the right task adapter."""
  out = [
    Method("Instr"),
    Method("Oracle", "oracle", "oracle"),
    Method("Task only", "none", "oracle"),
    Method("Page+Task", "none", "oracle", gold_page=True),
    Method("Arrow", "arrow", "arrow"),
    Method(f"LAG(k={k})", "lag", "lag", k=k),
    Method("Uniform", "uniform", "uniform"),
    Method("RAG", rag=True),
    Method("PRAG", knowledge="prag"),
    Method("P-LAG", "prag", "lag", k=k),
    Method("R-LAG", "none", "lag", rag=True, k=k),
  ]
  if with_spectr:
    out.insert(4, Method("SpectR", "spectr", "spectr"))
  return out


SPANS = ("question", "user", "prompt")

# Routers beyond the paper, on both libraries: name -> (router, RouterSpec options,
# Method fields).
BEYOND = {
  "Vote": ("vote", (), ()),
  "Vote-score": ("vote", (("vote_score", "score"),), ()),
  "Vote-margin": ("vote", (("vote_score", "margin"),), ()),
  "Vote-layer": ("vote", (("vote_scope", "module"),), ()),
  "Vote-top2": ("vote", (("vote_top_m", 2),), ()),
  # Two rounds: the first vote's 2 leading adapters, then a vote between them alone.
  "Vote-final2": ("vote", (("vote_finalists", 2),), ()),
  "Vote-user": ("vote", (), (("span", "user"),)),
  "Vote-prompt": ("vote", (), (("span", "prompt"), ("task_span", "prompt"))),
  "ReqLAG": ("request_lag", (), ()),
  "ReqLAG+gate": ("request_lag", (("gate", 0.1),), ()),
  "LAG+gate": ("lag", (("gate", 0.1),), ()),
  "LAG+gate-none": ("lag", (("gate", 0.1), ("gate_fallback", "none")), ()),
  "LAG+edges": ("lag", (("layers", "edges"),), ()),
  # The Arrow filter through the library's arrow index (routing/arrow_index.py): the
  # probe=P best clusters of about sqrt(N) are scanned instead of every arrow.
  "LAG+index": ("lag", (("index_probe", 8),), ()),
  # The Arrow filter through the arrows' low-rank sketch (routing/arrow_sketch.py):
  # every adapter scored in sketch=Z dimensions, the pool=P best rescored exactly.
  "LAG+sketch": ("lag", (("index_probe", 80), ("index_sketch", 32)), ()),
  # With RAG (the BM25-top page in the prompt) or PRAG (its adapter) for knowledge and
  # the router for the task library, as the paper's R-LAG / P-LAG.
  "R-Vote": ("vote", (), (("knowledge", "none"), ("rag", True))),
  "P-Vote": ("vote", (), (("knowledge", "prag"),)),
  "R-ReqLAG": ("request_lag", (), (("knowledge", "none"), ("rag", True))),
  "P-ReqLAG": ("request_lag", (), (("knowledge", "prag"),)),
}
# Short option names in method names -> RouterSpec fields.
_OPTION_FIELDS = {
  "score": "vote_score",
  "scope": "vote_scope",
  "m": "vote_top_m",
  "vote_layers": "vote_layers",
  "vote_modules": "vote_modules",
  "finalists": "vote_finalists",
  "gate": "gate",
  "fallback": "gate_fallback",
  "layers": "layers",
  "probe": "index_probe",
  "pool": "index_probe",
  "sketch": "index_sketch",
  "index_prefill": "index_prefill",
}


def beyond_methods(k: int = 20, retrieval: bool = True) -> list[Method]:
  """Every BEYOND method at k (the request-level routers; not in ``standard_methods``);
  ``retrieval``: with the R- / P- ones."""
  names = [n for n in BEYOND if retrieval or not n.startswith(("R-", "P-"))]
  return [method_from_name(f"{name}(k={k})", k) for name in names]


def method_from_name(name: str, k: int = 20) -> Method:
  """A request-level method from its name: ``Base`` or ``Base(opt=v;opt=v)`` with Base
  a BEYOND key and options k, span, task_span (question | user | prompt), score
  (count | score | margin), scope (all | module), m, gate, fallback (vote | none), layers and
  vote_layers ('0-9+20-29', or 'edges': the first and last third), vote_modules
  (the knowledge library's modules whose decisions count, e.g. 'down_proj' or
  'gate_proj+down_proj'), finalists (a vote in two rounds: the first's F leading
  adapters, then a vote among them), probe (clusters
  of the arrow index scanned; LAG+index), pool and sketch (LAG+sketch: the pool
  rescored exactly, the sketch's dimensions), index_prefill (1: probe at the prompt's
  tokens too), removal (the
  knowledge library's shared-direction removal: none | mean:Q | top:Q); e.g.
  ``LAG+gate(k=4;gate=0.2;fallback=none)`` or
  ``Vote-score(k=4;removal=top:4)``. Options are separated by ';' since method
  lists are comma-separated.

  Raises:
    ValueError: an unknown base or option.
  """
  head, _, rest = name.partition("(")
  if head not in BEYOND:
    raise ValueError(f"method {name!r}: {head!r} is not one of {sorted(BEYOND)}")
  router, options, fields = BEYOND[head]
  options = dict(options)
  kw = {"k": k, **dict(fields)}
  for item in filter(None, (p.strip() for p in rest.rstrip(")").split(";"))):
    key, _, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if key == "k":
      kw["k"] = int(value)
    elif key in ("span", "task_span"):
      kw[key] = value
    elif key == "removal":
      parse_mode(value)  # checks it now
      kw["removal"] = value
    elif key in _OPTION_FIELDS:
      options[_OPTION_FIELDS[key]] = _option_value(_OPTION_FIELDS[key], value)
    else:
      raise ValueError(
        f"method {name!r}: unknown option {key!r}; options: k, span, task_span, removal, "
        f"{', '.join(_OPTION_FIELDS)}"
      )
  for key in ("span", "task_span"):
    if key in kw and kw[key] not in SPANS:
      raise ValueError(f"method {name!r}: {key} {kw[key]!r} is not one of {SPANS}")
  opts = tuple(sorted(options.items()))
  kw = {"knowledge": router, "task": router, **kw}
  # The arrow index is the knowledge library's (the task library has a few adapters);
  # vote_modules name the knowledge library's modules (the task library's differ).
  knowledge_only = ("index_probe", "index_prefill", "index_sketch", "vote_modules")
  task_opts = tuple((f, v) for f, v in opts if f not in knowledge_only)
  method = Method(name, knowledge_options=opts, task_options=task_opts, **kw)
  router_spec(router, method.k, opts, 3)  # checks the options now
  return method


def _option_value(field: str, value: str):
  if field in ("vote_top_m", "index_probe", "index_sketch", "vote_finalists"):
    return int(value)
  if field == "index_prefill":
    if value not in ("0", "1"):
      raise ValueError(f"option index_prefill: expected 0 or 1, got {value!r}")
    return value == "1"
  if field == "vote_modules":
    return tuple(m.strip() for m in value.split("+") if m.strip())
  if field == "gate":
    return float(value)
  if field in ("layers", "vote_layers"):
    if value == "edges":
      return value
    out = []
    for part in value.split("+"):
      lo, _, hi = part.partition("-")
      out += list(range(int(lo), int(hi or lo) + 1))
    return tuple(out)
  return value


def router_spec(router: str, k: int, options: tuple, num_layers: int) -> RouterSpec:
  """RouterSpec with a method's options; layers 'edges' = the first and last third."""
  kw = dict(options)
  for field in ("layers", "vote_layers"):
    if kw.get(field) == "edges":
      third = max(num_layers // 3, 1)
      kw[field] = tuple(range(third)) + tuple(range(num_layers - third, num_layers))
  return RouterSpec(router, k=k, **kw)


def select_methods(
  methods: Sequence[Method], wanted: Sequence[str], k: int, retrieval: bool = True
) -> list[Method]:
  """The evaluate job's ``methods`` field: standard ones by name or by the part before
  '(' (in their order), then request-level ones (``method_from_name``; a bare name gets
  k) in the order given.

  Args:
    methods: the standard methods this run offers (e.g. without SpectR at large N, or
      without RAG and its kin when there is no retrieval).
    wanted: method names.
    retrieval: whether RAG / PRAG (and the R- / P- request-level methods) can run.
  Raises:
    ConfigError: a name that is no method (the message lists the valid names), bad
      options, a duplicate, or a method this run cannot offer (and why): never a
      silent skip.
  """
  wanted = list(wanted)
  if not wanted:
    raise ConfigError("config field 'methods' names no method")
  dupes = sorted({n for n in wanted if wanted.count(n) > 1})
  if dupes:
    raise ConfigError(f"config field 'methods' names {dupes} more than once")
  every = {m.name.split("(")[0]: m for m in standard_methods(k)}
  offered = {m.name for m in methods}
  chosen, beyond = set(), []
  for name in wanted:
    base = name.split("(")[0]
    if base in every:
      standard = every[base]
      if name not in (base, standard.name):
        raise ConfigError(
          f"config field 'methods': {name!r}: the standard method {base} takes its "
          f"settings from the config (e.g. --config.k); write {base!r}"
        )
      if standard.name not in offered:
        why = (
          "it needs retrieval (config field 'retrieval' is off)"
          if standard.needs_retrieval
          else "not offered for this library (SpectR: more adapters than 'spectr_max_n')"
        )
        raise ConfigError(f"config field 'methods': {name!r} cannot run here: {why}")
      chosen.add(standard.name)
    elif base in BEYOND:
      try:
        method = method_from_name(name if "(" in name else f"{name}(k={k})", k)
      except ValueError as e:
        raise ConfigError(f"config field 'methods': {e}") from None
      if method.needs_retrieval and not retrieval:
        raise ConfigError(
          f"config field 'methods': {name!r} needs retrieval (config field 'retrieval' is off)"
        )
      beyond.append(method)
    else:
      valid = [*every, *BEYOND]
      near = difflib.get_close_matches(base, valid, n=1, cutoff=0.5)
      raise ConfigError(
        f"config field 'methods': unknown method {name!r}"
        + (f" (did you mean {near[0]!r}?)" if near else "")
        + f"; valid names: {', '.join(valid)} (request-level ones take options, e.g. "
        "'Vote(k=4;score=score)')"
      )
  return [m for m in methods if m.name in chosen] + beyond
