"""The evaluation harness: every method on the same prompts, batched, scored alike.

A *method* says where knowledge comes from (no adapter, the gold adapter, a router
over the knowledge library, the BM25-top document's adapter, or the BM25-top
document in the prompt) and how the task library is used (none, the right task
adapter, or a router). Prompts, decoding (greedy) and answer extraction are the
same for every method; only adapters and, for RAG, the prompt's context differ.

Routing accuracy is read from the generation's routing telemetry: for every prompt
token, layer and knowledge module, the adapter LAG chose, compared with the
question's gold knowledge adapter, split by token type (the gold entity's name in
the question, the rest of the question, the chat template, generated tokens). Per
request: the adapter chosen most often over the question's tokens (all layers and
knowledge modules) against the gold one; for a vote-routed request, its winner.

Routers beyond the paper (``lag_jax.routing.request``) are methods too
(``beyond_methods``, ``method_from_name``): Vote, ReqLAG, LAG+gate and variants, with
options in the name, e.g. ``Vote(k=4;score=score;span=user)``. Their votes and pooled
filters count the question's tokens by default (``Method.span``), the task library's
the user turn (the instruction names the task).
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Sequence

import numpy as np
from absl import logging

from lag_jax.data.records import Document, KiltExample
from lag_jax.errors import ConfigError
from lag_jax.eval import metrics
from lag_jax.generation import generate
from lag_jax.model.transformer import CausalLM
from lag_jax.routing import AdapterLibrary, RoutedAdapters, RouterSpec, routed
from lag_jax.routing.spans import token_mask
from lag_jax.text.tokenizer import Tokenizer

# One instruction per task family; {input} is the KILT input.
TASK_PROMPTS = {
  "qa": "Answer the question with a short phrase, no explanation.\n\nQuestion: {input}",
  "slot": (
    "Give the value of the relation for the subject, as a short phrase.\n\n"
    "Subject [SEP] relation: {input}"
  ),
  "fact": (
    "Is the claim true or false? Answer SUPPORTS if it is true and REFUTES if it "
    "is false.\n\nClaim: {input}"
  ),
  "link": (
    "Which Wikipedia page does the entity between [START_ENT] and [END_ENT] refer "
    "to? Answer with the page title only.\n\n{input}"
  ),
  "chat": "Continue the conversation with one informative sentence.\n\n{input}",
}
RAG_PREFIX = "Context: {text}\n\n"
FAMILY_OF_TASK = {"qa": "QA", "slot": "Slot", "fact": "Fact", "link": "Link", "chat": "Chat"}
TOKEN_TYPES = ("entity", "question", "template", "generated")


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
  "Vote-layer": ("vote", (("vote_scope", "module"),), ()),
  "Vote-top2": ("vote", (("vote_top_m", 2),), ()),
  "Vote-user": ("vote", (), (("span", "user"),)),
  "Vote-prompt": ("vote", (), (("span", "prompt"), ("task_span", "prompt"))),
  "ReqLAG": ("request_lag", (), ()),
  "ReqLAG+gate": ("request_lag", (("gate", 0.1),), ()),
  "LAG+gate": ("lag", (("gate", 0.1),), ()),
  "LAG+gate-none": ("lag", (("gate", 0.1), ("gate_fallback", "none")), ()),
  "LAG+edges": ("lag", (("layers", "edges"),), ()),
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
  "gate": "gate",
  "fallback": "gate_fallback",
  "layers": "layers",
}


def beyond_methods(k: int = 20, retrieval: bool = True) -> list[Method]:
  """Every BEYOND method at k (the request-level routers; not in ``standard_methods``);
  ``retrieval``: with the R- / P- ones."""
  names = [n for n in BEYOND if retrieval or not n.startswith(("R-", "P-"))]
  return [method_from_name(f"{name}(k={k})", k) for name in names]


def method_from_name(name: str, k: int = 20) -> Method:
  """A request-level method from its name: ``Base`` or ``Base(opt=v;opt=v)`` with Base
  a BEYOND key and options k, span, task_span (question | user | prompt), score
  (count | score), scope (all | module), m, gate, fallback (vote | none), layers and
  vote_layers ('0-9+20-29', or 'edges': the first and last third); e.g.
  ``LAG+gate(k=4;gate=0.2;fallback=none)``. Options are separated by ';' since method
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
    elif key in _OPTION_FIELDS:
      options[_OPTION_FIELDS[key]] = _option_value(_OPTION_FIELDS[key], value)
    else:
      raise ValueError(
        f"method {name!r}: unknown option {key!r}; options: k, span, task_span, "
        f"{', '.join(_OPTION_FIELDS)}"
      )
  for key in ("span", "task_span"):
    if key in kw and kw[key] not in SPANS:
      raise ValueError(f"method {name!r}: {key} {kw[key]!r} is not one of {SPANS}")
  opts = tuple(sorted(options.items()))
  kw = {"knowledge": router, "task": router, **kw}
  method = Method(name, knowledge_options=opts, task_options=opts, **kw)
  _router_spec(router, method.k, opts, 3)  # checks the options now
  return method


def _option_value(field: str, value: str):
  if field == "vote_top_m":
    return int(value)
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


def _router_spec(router: str, k: int, options: tuple, num_layers: int) -> RouterSpec:
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


@dataclasses.dataclass
class Setting:
  """Everything a method runs against.

  Attributes:
    model, tokenizer: the base model.
    knowledge: the knowledge library (adapter names = document titles).
    task: the task library (adapter names = task family keys, e.g. 'qa'), or None.
    documents: the knowledge source, for RAG (aligned with nothing in particular).
    retrieve: question -> index into ``documents`` of the BM25-top document, or None
      (then RAG / PRAG methods are skipped).
    max_new_tokens, batch_size: decoding settings.
    system_prompt: optional system message.
    rag_max_chars: RAG puts at most this many characters of the page in the prompt.
  """

  model: CausalLM
  tokenizer: Tokenizer
  knowledge: AdapterLibrary
  task: AdapterLibrary | None
  documents: Sequence[Document]
  retrieve: object | None = None
  max_new_tokens: int = 16
  batch_size: int = 16
  system_prompt: str = ""
  rag_max_chars: int = 4000


def render_prompt(
  tokenizer: Tokenizer, ex: KiltExample, context: str | None = None, system_prompt: str = ""
):
  """The chat-templated prompt and the character spans of its parts.

  Returns (text, question_span, entity_span), spans as (start, end) or None.
  """
  user = user_message(ex, context)
  messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
    {"role": "user", "content": user}
  ]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  q_start = text.rfind(ex.input)
  question = (q_start, q_start + len(ex.input)) if q_start >= 0 else None
  entity = None
  if ex.provenance and question is not None:
    e = text.find(ex.provenance[0], q_start)
    if 0 <= e < question[1]:
      entity = (e, e + len(ex.provenance[0]))
  return text, question, entity


def user_message(ex: KiltExample, context: str | None = None) -> str:
  """The user turn's content: the task instruction with the input (and RAG context)."""
  user = TASK_PROMPTS[ex.task].format(input=ex.input)
  return user if context is None else RAG_PREFIX.format(text=context) + user


def prompt_spans(text: str, offsets, question, user: str) -> dict[str, np.ndarray]:
  """[T] bool token masks of a rendered prompt for each of SPANS."""
  start = text.rfind(user)
  user_span = (start, start + len(user)) if start >= 0 else None
  out = {"prompt": np.ones((len(offsets),), bool), "user": token_mask(offsets, [user_span])}
  out["question"] = token_mask(offsets, [question]) if question else out["user"]
  for key in ("user", "question"):
    if not out[key].any():
      out[key] = out["prompt"]
  return out


def _token_types(offsets, question, entity, n_prompt):
  types = np.full((n_prompt,), 2, np.int8)  # template
  for t, (s, e) in enumerate(offsets[:n_prompt]):
    if question and s < question[1] and e > question[0]:
      types[t] = 1
    if entity and s < entity[1] and e > entity[0]:
      types[t] = 0
  return types


@dataclasses.dataclass
class MethodResult:
  """One method's run. request_routing: requests whose most chosen knowledge adapter
  over the question's tokens is the gold one ({'correct', 'total'}); timing: summed
  over batches, prefill_s (all passes), decode_s, decode_steps, prefill_passes."""

  method: str
  predictions: list[str]
  scores: list[dict]
  by_dataset: dict[str, dict[str, float]]
  routing: dict | None
  seconds: float
  request_routing: dict | None = None
  timing: dict | None = None


def stop_tokens(tok) -> tuple[int, ...]:
  """The chat turn's end and the document separator: knowledge adapters are trained on
  texts that end with the separator, and a model that emits it has finished its answer."""
  doc_end = tok.token_to_id("<|endoftext|>")
  return tuple(dict.fromkeys((*tok.eos_token_ids, *(() if doc_end is None else (doc_end,)))))


def score_example(ex: KiltExample, generated: str) -> dict:
  """Per-example scores: EM / F1 / containment for QA and slots, accuracy for facts."""
  pred = metrics.extract_answer(generated)
  if ex.task == "fact":
    return {"acc": metrics.label_accuracy([generated], [ex.answers[0]])}
  s = metrics.qa_score(pred, ex.answers, ex.meta.get("answer_elements"))
  out = {"em": s.em, "f1": s.f1, "contains": s.contains}
  if ex.task in ("slot", "link"):
    out["acc"] = s.em
  return out


# The paper's metric per family: EM for QA, F1 for dialogue, accuracy otherwise.
PRIMARY_METRIC = {"QA": "em", "Chat": "f1", "Fact": "acc", "Slot": "acc", "Link": "acc"}


def dataset_of(ex: KiltExample) -> str:
  return ex.dataset or ex.task


def run_method(
  setting: Setting,
  method: Method,
  examples: Sequence[KiltExample],
  knowledge_ids: Sequence[int],
  task_ids: Sequence[int] | None,
  retrieved: Sequence[int] | None,
) -> MethodResult:
  """Generates and scores ``examples`` with ``method``.

  Args:
    knowledge_ids: gold knowledge adapter id per example (-1: none in the library).
    task_ids: the right task adapter id per example, or None without a task library.
    retrieved: BM25-top document index per example (for RAG / PRAG), or None.
  """
  if retrieved is None and method.needs_retrieval:
    raise ValueError(f"method {method.name!r} needs retrieval (RAG / PRAG): none was given")
  t0 = time.perf_counter()
  tok = setting.tokenizer
  rendered, types, spans = [], [], []
  by_title = {d.title: d for d in setting.documents} if method.gold_page else {}
  for i, ex in enumerate(examples):
    # The retrieved (or gold) page, cut to fit the context window (pages can be long).
    context = None
    if method.rag:
      context = setting.documents[retrieved[i]].text[: setting.rag_max_chars]
    elif method.gold_page:
      gold_doc = by_title.get(ex.provenance[0]) if ex.provenance else None
      if gold_doc is None:
        raise ValueError(f"method {method.name!r}: example {ex.id!r} has no gold page")
      context = gold_doc.text[: setting.rag_max_chars]
    text, q, e = render_prompt(tok, ex, context, setting.system_prompt)
    enc = tok.backend.encode(text, add_special_tokens=False)
    rendered.append(list(enc.ids))
    types.append(_token_types(enc.offsets, q, e, len(enc.ids)))
    spans.append(prompt_spans(text, enc.offsets, q, user_message(ex, context)))

  predictions, scores, routing_hits, request_hits = [], [], [], [0, 0]
  timing = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "prefill_passes": 1}
  # Routing accuracy means something only for routers that choose.
  want_routing = method.knowledge in ROUTING_METHODS
  for start in range(0, len(examples), setting.batch_size):
    sl = slice(start, start + setting.batch_size)
    batch = rendered[sl]
    B = len(batch)
    libs = []
    if method.knowledge != "none":
      libs.append(
        _knowledge_routing(
          setting,
          method,
          B,
          knowledge_ids[sl],
          None if retrieved is None else retrieved[sl],
          [s[method.span] for s in spans[sl]],
        )
      )
    if method.task != "none" and setting.task is not None:
      router = "fixed" if method.task == "oracle" else method.task
      spec = _router_spec(
        router,
        method.k,
        method.task_options if router != "fixed" else (),
        setting.task.num_layers,
      )
      fixed = list(task_ids[sl]) if method.task == "oracle" else None
      span = [s[method.task_span] for s in spans[sl]] if spec.request_level else None
      libs.append(routed(setting.task, B, spec, fixed_ids=fixed, span=span))
    hook = RoutedAdapters(tuple(libs)) if libs else None
    out = generate(
      setting.model,
      batch,
      max_new_tokens=setting.max_new_tokens,
      stop_tokens=stop_tokens(tok),
      lora=hook,
      return_routing=want_routing,
    )
    timing["prefill_s"] += out.prefill_s
    timing["decode_s"] += out.decode_s
    timing["decode_steps"] += out.num_decode_steps
    timing["prefill_passes"] = out.prefill_passes
    for j, ids in enumerate(out.tokens):
      ex = examples[start + j]
      text = tok.decode(ids, skip_special_tokens=True)
      predictions.append(text)
      scores.append(score_example(ex, text))
    if want_routing:
      routing_hits.append(
        _routing_hits(
          out.routing,
          setting.knowledge.modules,
          types[sl],
          knowledge_ids[sl],
          [len(ids) for ids in out.tokens],
        )
      )
      c, t = _request_hits(out.routing, setting.knowledge.modules, types[sl], knowledge_ids[sl])
      request_hits[0] += c
      request_hits[1] += t
  by_dataset: dict[str, dict[str, float]] = {}
  for ex, s in zip(examples, scores, strict=True):
    d = by_dataset.setdefault(dataset_of(ex), {"n": 0})
    d["n"] += 1
    for key, v in s.items():
      d[key] = d.get(key, 0.0) + v
  for d in by_dataset.values():
    for key in list(d):
      if key != "n":
        d[key] /= d["n"]
  routing = _merge_hits(routing_hits) if routing_hits else None
  seconds = time.perf_counter() - t0
  logging.info("%s: %d examples in %.1fs", method.name, len(examples), seconds)
  request_routing = {"correct": request_hits[0], "total": request_hits[1]} if routing_hits else None
  return MethodResult(
    method.name, predictions, scores, by_dataset, routing, seconds, request_routing, timing
  )


ROUTING_METHODS = ("arrow", "arrow_softmax", "spectr", "lag", "vote", "request_lag")


def _knowledge_routing(setting, method, B, gold, retrieved, span=None):
  lib = setting.knowledge
  if method.knowledge == "oracle":
    return routed(lib, B, RouterSpec("fixed"), fixed_ids=list(gold))
  if method.knowledge == "prag":
    # The BM25-top document's adapter; documents without an adapter apply none.
    ids = [
      lib.names.index(setting.documents[r].title) if setting.documents[r].title in lib.names else -1
      for r in retrieved
    ]
    return routed(lib, B, RouterSpec("fixed"), fixed_ids=ids)
  spec = _router_spec(method.knowledge, method.k, method.knowledge_options, lib.num_layers)
  return routed(lib, B, spec, span=span if spec.request_level else None)


def _request_hits(routing, knowledge_modules, types, gold) -> tuple[int, int]:
  """(requests whose most chosen knowledge adapter over the question's tokens, all
  layers and knowledge modules, is the gold one (ties to the lower id); requests with
  a gold adapter)."""
  correct = total = 0
  for b, g in enumerate(gold):
    if g < 0:
      continue
    total += 1
    question = types[b] <= 1  # entity or question tokens
    if not question.any():
      question = np.ones_like(question)
    chosen = np.concatenate(
      [
        per_lib[0][b, :, : len(types[b])][:, question].reshape(-1)
        for module, per_lib in routing.items()
        if module in knowledge_modules
      ]
    )
    chosen = chosen[chosen >= 0]
    if chosen.size and int(np.argmax(np.bincount(chosen))) == g:
      correct += 1
  return correct, total


def _routing_hits(routing, knowledge_modules, types, gold, n_generated):
  """Counts of (correct, total) routing decisions by layer, module and token type.

  routing: module -> (ids [B, L, S] per library holding the module, in order),
  position-indexed; the knowledge library is always the first library.
  """
  hits = {}
  for module, per_lib in routing.items():
    if module not in knowledge_modules:
      continue
    ids = per_lib[0]
    B, L, _ = ids.shape
    correct = np.zeros((L, len(TOKEN_TYPES)), np.int64)
    total = np.zeros((L, len(TOKEN_TYPES)), np.int64)
    for b in range(B):
      if gold[b] < 0:
        continue
      n_prompt = len(types[b])
      t_types = np.concatenate([types[b], np.full(max(n_generated[b] - 1, 0), 3, np.int8)])
      chosen = ids[b, :, : len(t_types)]  # [L, T]
      ok = chosen == gold[b]
      for k in range(len(TOKEN_TYPES)):
        sel = t_types == k
        correct[:, k] += ok[:, sel].sum(axis=1)
        total[:, k] += sel.sum()
      del n_prompt
    hits[module] = (correct, total)
  return hits


def _merge_hits(parts):
  out = {}
  for part in parts:
    for module, (c, t) in part.items():
      if module in out:
        out[module] = (out[module][0] + c, out[module][1] + t)
      else:
        out[module] = (c, t)
  return {m: {"correct": c.tolist(), "total": t.tolist()} for m, (c, t) in out.items()}


def routing_accuracy(routing: dict, token_type: str = "entity") -> tuple[float, list[float]]:
  """Overall and per-layer share of decisions picking the gold adapter, for a token type."""
  k = TOKEN_TYPES.index(token_type)
  correct = sum(np.asarray(v["correct"])[:, k] for v in routing.values())
  total = sum(np.asarray(v["total"])[:, k] for v in routing.values())
  per_layer = (correct / np.maximum(total, 1)).tolist()
  return float(correct.sum() / max(total.sum(), 1)), per_layer


def summarize(results: Sequence[MethodResult], families: dict[str, str]) -> dict:
  """Raw metric per dataset and method, and the normalised score against the oracle."""
  oracle = next((r for r in results if r.method == "Oracle"), None)
  table = {}

  def primary(by_dataset):
    return {d: v[PRIMARY_METRIC[families[d]]] for d, v in by_dataset.items()}

  for r in results:
    raw = primary(r.by_dataset)
    row = {"raw": raw, "by_dataset": r.by_dataset, "seconds": r.seconds}
    if oracle is not None:
      o_raw = primary(oracle.by_dataset)
      sizes = {d: v["n"] for d, v in r.by_dataset.items()}
      row["normalized"] = metrics.normalized_scores(
        raw, o_raw, sizes, {d: families[d] for d in raw}
      )
    if r.timing is not None:
      row["timing"] = dict(r.timing)
      steps = r.timing["decode_steps"]
      row["decode_ms_per_step"] = 1000 * r.timing["decode_s"] / steps if steps else None
    if r.request_routing is not None:
      row["routing_request_acc"] = r.request_routing["correct"] / max(r.request_routing["total"], 1)
    if r.routing is not None:
      acc, per_layer = routing_accuracy(r.routing, "entity")
      row["routing_entity_acc"] = acc
      row["routing_entity_acc_by_layer"] = per_layer
      row["routing_acc_by_type"] = {t: routing_accuracy(r.routing, t)[0] for t in TOKEN_TYPES}
      row["routing_entity_acc_by_module"] = {
        m: routing_accuracy({m: v}, "entity")[0] for m, v in r.routing.items()
      }
    table[r.method] = row
  return table


def markdown_table(report: dict) -> str:
  """The paper-shaped table: normalised score per family and AVG, raw metric per
  dataset, and routing accuracy on the gold entity's tokens and per request (the
  adapter chosen most over the question's tokens)."""
  methods = report["methods"]
  first = next(iter(methods.values()))
  families = [f for f in first.get("normalized", {}) if f != "AVG"]
  datasets = sorted(first["raw"])
  head = (
    ["Method"]
    + [f"{f} (% of oracle)" for f in families]
    + ["AVG"]
    + [f"{d} raw" for d in datasets]
    + ["routing acc. (entity tokens)", "routing acc. (requests)", "seconds"]
  )
  lines = [
    f"### {report['benchmark']}: {report['num_examples']} examples, "
    f"{report['num_knowledge_adapters']} knowledge + {report['num_task_adapters']} "
    "task adapters",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]

  def pct(v):
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"

  for name, row in methods.items():
    norm = row.get("normalized", {})
    cells = [name] + [pct(norm.get(f)) for f in families] + [pct(norm.get("AVG"))]
    cells += [pct(row["raw"].get(d)) for d in datasets]
    cells += [pct(row.get("routing_entity_acc")), pct(row.get("routing_request_acc"))]
    cells += [f"{row['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if report.get("k_sweep"):
    lines += [
      "",
      "k sweep (LAG):",
      "",
      "| k | AVG (% of oracle) | routing acc. (entity) |",
      "|---|---|---|",
    ]
    for k, row in report["k_sweep"].items():
      if row:
        lines.append(
          f"| {k} | {pct(row.get('normalized', {}).get('AVG'))} | "
          f"{pct(row.get('routing_entity_acc'))} |"
        )
  return "\n".join(lines) + "\n"


def plot(report: dict, workdir: str) -> None:
  """score_vs_k.png, routing_by_layer.png and methods.png next to the JSON and
  markdown."""
  import os

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sweep = {int(k): v for k, v in report.get("k_sweep", {}).items() if v}
  if sweep:
    ks = sorted(sweep)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(
      ks,
      [100 * sweep[k].get("normalized", {}).get("AVG", float("nan")) for k in ks],
      "o-",
      label="AVG score (% of oracle)",
    )
    ax.plot(
      ks,
      [100 * (sweep[k].get("routing_entity_acc") or float("nan")) for k in ks],
      "s--",
      label="routing acc., entity tokens (%)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("k (Arrow-filter candidates)")
    ax.legend()
    ax.set_title(f"LAG k sweep ({report['benchmark']})")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "score_vs_k.png"), dpi=120)
    plt.close(fig)
  routed_rows = {
    m: r
    for m, r in report["methods"].items()
    if r.get("routing_acc_by_layer") or r.get("routing_entity_acc_by_layer")
  }
  if routed_rows:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, r in routed_rows.items():
      ax.plot(100 * np.asarray(r["routing_entity_acc_by_layer"]), label=m)
    ax.set_xlabel("layer")
    ax.set_ylabel("gold adapter chosen (%)")
    ax.set_title("Routing accuracy on the gold entity's tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "routing_by_layer.png"), dpi=120)
    plt.close(fig)
  plot_methods(report, os.path.join(workdir, "methods.png"))


def plot_methods(report: dict, path: str) -> None:
  """Every method side by side: AVG score as % of the oracle, and the share of requests
  routed to their gold knowledge adapter (methods that route)."""
  import os

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["methods"]
  names = [m for m, r in rows.items() if r.get("normalized", {}).get("AVG") is not None]
  if not names:
    return
  x = np.arange(len(names))
  avg = [100 * rows[m]["normalized"]["AVG"] for m in names]
  req = [100 * (rows[m].get("routing_request_acc") or float("nan")) for m in names]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
  ax.bar(x - 0.2, avg, 0.4, label="AVG score (% of oracle)")
  ax.bar(x + 0.2, req, 0.4, label="requests routed to the gold adapter (%)")
  ax.axhline(100, color="gray", lw=0.8, ls=":")
  top = max([v for v in avg + req if v == v] + [100.0])
  ax.set_ylim(0, 1.3 * top)
  ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
  ax.set_title(
    f"{report['benchmark']}: {report['num_examples']} examples, "
    f"{report['num_knowledge_adapters']} knowledge adapters"
  )
  ax.legend(fontsize=7, loc="upper left", ncol=2)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
