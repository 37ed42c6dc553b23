"""Running one method over a set of examples: batched generation with its adapters,
scores per example and dataset, routing accuracy from the telemetry."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
from absl import logging

from lag_jax.data.records import Document, KiltExample
from lag_jax.eval import metrics
from lag_jax.eval.methods import Method, router_spec
from lag_jax.eval.prompts import (
  TOKEN_TYPES,
  prompt_spans,
  render_prompt,
  stop_tokens,
  token_types,
  user_message,
)
from lag_jax.generation import generate
from lag_jax.model.transformer import CausalLM
from lag_jax.routing import AdapterLibrary, RoutedAdapters, RouterSpec, routed
from lag_jax.text.tokenizer import Tokenizer


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
    knowledge_removed: removal mode -> the knowledge library with those shared
      directions removed, for methods with their own ``removal``.
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
  knowledge_removed: dict = dataclasses.field(default_factory=dict)


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
  routing_ids: list | None = None


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
  keep_routing: bool = False,
) -> MethodResult:
  """Generates and scores ``examples`` with ``method``.

  Args:
    knowledge_ids: gold knowledge adapter id per example (-1: none in the library).
    task_ids: the right task adapter id per example, or None without a task library.
    retrieved: BM25-top document index per example (for RAG / PRAG), or None.
    keep_routing: also return, per example, the knowledge library's choices over the
      prompt (``routing_ids``: {"types": [T] token types, "ids": module -> [L, T]}),
      for analysis (lag_jax/eval/routing_analysis.py).
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
    types.append(token_types(enc.offsets, q, e, len(enc.ids)))
    spans.append(prompt_spans(text, enc.offsets, q, user_message(ex, context)))

  predictions, scores, routing_hits, request_hits = [], [], [], [0, 0]
  kept = [] if keep_routing else None
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
      spec = router_spec(
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
      if kept is not None:
        for b, ty in enumerate(types[sl]):
          kept.append(
            {
              "types": ty,
              "ids": {
                m: np.asarray(per_lib[0][b, :, : len(ty)])
                for m, per_lib in out.routing.items()
                if m in setting.knowledge.modules
              },
            }
          )
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
    method.name, predictions, scores, by_dataset, routing, seconds, request_routing, timing, kept
  )


ROUTING_METHODS = ("arrow", "arrow_softmax", "spectr", "lag", "vote", "request_lag")


def _knowledge_routing(setting, method, B, gold, retrieved, span=None):
  lib = setting.knowledge
  if method.removal:
    if method.removal not in setting.knowledge_removed:
      raise ValueError(
        f"method {method.name!r}: no knowledge library with removal {method.removal!r} "
        "in the setting (Setting.knowledge_removed)"
      )
    lib = setting.knowledge_removed[method.removal]
  if method.knowledge == "oracle":
    return routed(lib, B, RouterSpec("fixed"), fixed_ids=list(gold))
  if method.knowledge == "prag":
    # The BM25-top document's adapter; documents without an adapter apply none.
    ids = [
      lib.names.index(setting.documents[r].title) if setting.documents[r].title in lib.names else -1
      for r in retrieved
    ]
    return routed(lib, B, RouterSpec("fixed"), fixed_ids=ids)
  spec = router_spec(method.knowledge, method.k, method.knowledge_options, lib.num_layers)
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
