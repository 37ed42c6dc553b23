"""A real knowledge benchmark from packaged files: FanOutQA single-hop questions over Wikipedia.

FanOutQA's dev file (``fanoutqa==1.1.1``, ``fanout-final-dev.json``) is a list of
310 multi-hop questions::

  {"id", "question", "answer", "categories",
   "decomposition": [{"id", "question", "answer", "depends_on": [ids],
                      "decomposition": [...],            # nested, up to 3 levels
                      "evidence": {"pageid", "revid", "title", "url"} | null}, ...]}

Its leaves (no further decomposition, an ``evidence`` page) are single-hop questions
with self-contained wording ("What is the batting hand of Pat Burrell?"), 2,142 in
all. We keep those whose evidence page is among the packaged Wikipedia summaries:
558 leaves over 312 pages. The same sub-question can appear under several
multi-hop questions with the same id (e.g. "What is the capital of China?"); such
repeats are kept once (their parents listed in ``meta["parent_ids"]``), which
leaves 546 distinct questions: 239 on 144 pages in the tuning half, 307 on 168
pages in the test half. The answer occurs in its page's summary (normalised
token match; every element for lists) for 86 of them.

Answers, which are str, int, float, bool, list or dict in the file, become strings
(``answer_strings``):

- str: as is; bool: "yes" (or "true") / "no" (or "false");
- int: decimal digits ("680000"; the metrics drop thousands separators, so
  "680,000" matches); float: "37" for an integer value, else Python's shortest
  repr ("0.3794");
- list: its elements (nested lists flattened) joined by ", " as the gold string, and
  the elements kept in ``meta["answer_elements"]``: a prediction counts as exactly
  right when it contains every element (``lag_jax.eval.metrics.qa_score``). A
  one-element list is a plain answer;
- dict: one key (e.g. {"Apple": 161000} for "how many employees did Apple have"):
  its value; several keys: "key: value" pairs joined by ", ", and every key and value
  as elements.

The split rule, fixed here once: a question belongs to the tuning half when the
first byte of sha256("fanoutqa-split:" + evidence page title) is even, else to the
test half. All questions about one page fall into the same half, so adapters (one
per page) tuned on are never tested on. Choose prompts and settings on "tune" only.

The knowledge documents are one summary per evidence page, plus distractor pages
(a seeded permutation of the other summaries, FanOutQA evidence pages excluded)
up to a chosen library size. The distractors for size N are a prefix of those for
any larger size with the same seed, so libraries of growing size nest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from lag_jax.data.kilt import KiltFormatError, read_wiki_summaries
from lag_jax.data.records import Document, KiltExample
from lag_jax.text.answers import answer_in_text, contains_all

__all__ = [
  "SPLITS",
  "FanOutQABenchmark",
  "SingleHop",
  "answer_strings",
  "build_fanoutqa",
  "read_single_hop",
  "split_of",
]

SPLITS = ("tune", "test")
_SPLIT_SALT = "fanoutqa-split:"


def split_of(title: str) -> str:
  """The half ("tune" or "test") of every question whose evidence page is ``title``."""
  digest = hashlib.sha256((_SPLIT_SALT + title).encode("utf-8")).digest()
  return "tune" if digest[0] % 2 == 0 else "test"


def _scalar(value: Any) -> str:
  if isinstance(value, bool):  # before int: bool is an int
    return "yes" if value else "no"
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if math.isfinite(value) and value.is_integer():
      return str(int(value))
    return repr(value)
  if isinstance(value, str):
    return value.strip()
  raise TypeError(f"unsupported answer element {value!r}")


def _flatten(value: Any) -> list[Any]:
  if isinstance(value, list):
    return [x for v in value for x in _flatten(v)]
  return [value]


def answer_strings(answer: Any) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
  """A FanOutQA answer -> (gold strings, list elements or None); see the module doc.

  Raises:
    ValueError: for a null or empty answer; TypeError for an unsupported type.
  """
  if isinstance(answer, Mapping):
    if len(answer) == 1:
      return answer_strings(next(iter(answer.values())))
    if not answer:
      raise ValueError("empty dict answer")
    pairs = [(str(k).strip(), _scalar(v)) for k, v in answer.items()]
    gold = ", ".join(f"{k}: {v}" for k, v in pairs)
    return (gold,), tuple(x for kv in pairs for x in kv)
  if isinstance(answer, list):
    elements = [_scalar(v) for v in _flatten(answer)]
    elements = [e for e in elements if e]
    if not elements:
      raise ValueError("empty list answer")
    if len(elements) == 1:
      return answer_strings(_flatten(answer)[0])
    return (", ".join(elements),), tuple(elements)
  if answer is None:
    raise ValueError("null answer")
  if isinstance(answer, bool):
    return (("yes", "true") if answer else ("no", "false")), None
  text = _scalar(answer)
  if not text:
    raise ValueError("empty answer")
  return (text,), None


@dataclasses.dataclass(frozen=True)
class SingleHop:
  """One single-hop question of the FanOutQA file, as found there."""

  id: str
  question: str
  answer: Any
  title: str
  url: str | None
  pageid: int | None
  parent_ids: tuple[str, ...]
  occurrences: int = 1  # how often the file repeats it (same id, same content)


def read_single_hop(path: str | os.PathLike[str] | None = None) -> list[SingleHop]:
  """Every single-hop question (leaf with an evidence page) of a FanOutQA file, in file order.

  A sub-question repeated under several multi-hop questions (same id) is kept once,
  with all its parents; a repeat whose text, answer or page differ is dropped with a
  warning.

  Raises:
    KiltFormatError: naming the file and the question, if the structure is not FanOutQA's.
  """
  if path is None:
    from lag_jax.assets import FANOUTQA_DEV  # here: reading files needs no cache logic

    path = FANOUTQA_DEV.path()
  path = pathlib.Path(path)
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, list):
    raise KiltFormatError(f"{path}: expected a list of questions", file=str(path))

  found: dict[str, SingleHop] = {}
  conflicts = 0

  def walk(node: Mapping[str, Any], root_id: str, where: str) -> None:
    nonlocal conflicts
    children = node.get("decomposition")
    if not isinstance(children, list):
      raise KiltFormatError(
        f"{path}: {where}: 'decomposition' must be a list",
        file=str(path),
        field="decomposition",
        example_id=root_id,
      )
    for i, child in enumerate(children):
      cwhere = f"{where}.decomposition[{i}]"
      if not isinstance(child, Mapping) or not isinstance(child.get("id"), str):
        raise KiltFormatError(
          f"{path}: {cwhere}: expected an object with an 'id'",
          file=str(path),
          field="id",
          example_id=root_id,
        )
      if child.get("decomposition"):
        walk(child, root_id, cwhere)
        continue
      evidence = child.get("evidence")
      if not isinstance(evidence, Mapping) or not evidence.get("title"):
        continue  # FanOutQA has no evidence-less leaves; nothing to ground one in
      if not isinstance(child.get("question"), str):
        raise KiltFormatError(
          f"{path}: {cwhere}: 'question' must be a string",
          file=str(path),
          field="question",
          example_id=child["id"],
        )
      hop = SingleHop(
        id=child["id"],
        question=child["question"].strip(),
        answer=child.get("answer"),
        title=evidence["title"],
        url=evidence.get("url"),
        pageid=evidence.get("pageid"),
        parent_ids=(root_id,),
      )
      prev = found.get(hop.id)
      if prev is None:
        found[hop.id] = hop
      elif (prev.question, prev.answer, prev.title) == (hop.question, hop.answer, hop.title):
        parents = prev.parent_ids + (() if root_id in prev.parent_ids else (root_id,))
        found[hop.id] = dataclasses.replace(
          prev, parent_ids=parents, occurrences=prev.occurrences + 1
        )
      else:
        conflicts += 1

  for i, question in enumerate(data):
    if not isinstance(question, Mapping) or not isinstance(question.get("id"), str):
      raise KiltFormatError(
        f"{path}: question {i}: expected an object with an 'id'", file=str(path), field="id"
      )
    walk(question, question["id"], f"question {i}")
  if conflicts:
    logging.warning(
      "%s: dropped %d repeated sub-question ids with different content", path, conflicts
    )
  return list(found.values())


@dataclasses.dataclass(frozen=True)
class FanOutQABenchmark:
  """FanOutQA single-hop QA over a library of Wikipedia summaries.

  Attributes:
    examples: the questions (task "qa", provenance = (evidence title,)), file order.
    documents: the knowledge library: evidence pages (sorted by title), then distractors.
    num_evidence: how many of ``documents`` are evidence pages (the first ones).
    stats: counts of how the benchmark was built (for reports).
  """

  examples: tuple[KiltExample, ...]
  documents: tuple[Document, ...]
  num_evidence: int
  stats: dict[str, Any]

  @property
  def evidence_titles(self) -> tuple[str, ...]:
    return tuple(d.title for d in self.documents[: self.num_evidence])

  @property
  def distractor_titles(self) -> tuple[str, ...]:
    return tuple(d.title for d in self.documents[self.num_evidence :])

  def split(self, name: str) -> list[KiltExample]:
    """The examples of one half, "tune" or "test" (see ``split_of``)."""
    if name not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return [ex for ex in self.examples if ex.meta["split"] == name]


def _answer_in_page(page: str, golds, elements) -> bool:
  """The answer (every element, for lists) occurs in the page, normalised."""
  return (contains_all(page, elements) if elements else answer_in_text(page, golds)) > 0


def build_fanoutqa(
  library_size: int | None = None,
  *,
  num_evidence_pages: int | None = None,
  answerable_only: bool = False,
  seed: int = 0,
  questions_path: str | os.PathLike[str] | None = None,
  summaries_path: str | os.PathLike[str] | None = None,
  summaries: Sequence[Document] | None = None,
) -> FanOutQABenchmark:
  """Builds the benchmark: questions grounded in the summaries, and their knowledge library.

  Args:
    library_size: total documents N (evidence pages plus distractors); None: evidence
      pages only.
    num_evidence_pages: keep only this many evidence pages (a seeded sample) and their
      questions, for small demos; None: all (312 with the packaged files).
    answerable_only: keep only the questions whose answer occurs in their page's
      summary (86 of 546, on 71 pages), and only their pages as evidence: the
      summaries are short, so the other questions test the base model's memory, not
      the knowledge adapters. Applied before ``num_evidence_pages``.
    seed: for the evidence sample and the distractors.
    questions_path: FanOutQA dev JSON; default: the packaged file.
    summaries_path: summaries JSON; default: the packaged file. Ignored if ``summaries``.
    summaries: the summaries, already read (saves re-reading the 10k pages).
  Returns:
    The benchmark; ``stats`` has the counts of every step.
  Raises:
    ValueError: if ``library_size`` is smaller than the number of evidence pages or
      larger than the summaries allow.
  """
  hops = read_single_hop(questions_path)
  docs = list(summaries) if summaries is not None else read_wiki_summaries(summaries_path)
  by_title = {d.title: d for d in docs}
  all_leaves = sum(h.occurrences for h in hops)
  grounded = [h for h in hops if h.title in by_title]
  leaf_occurrences = sum(h.occurrences for h in grounded)

  skipped_answers = 0
  rows: list[tuple[SingleHop, tuple[str, ...], tuple[str, ...] | None]] = []
  for h in grounded:
    try:
      golds, elements = answer_strings(h.answer)
    except (TypeError, ValueError) as e:
      logging.warning("FanOutQA %s: skipping, unusable answer %r (%s)", h.id, h.answer, e)
      skipped_answers += 1
      continue
    rows.append((h, golds, elements))

  if answerable_only:
    rows = [r for r in rows if _answer_in_page(by_title[r[0].title].text, r[1], r[2])]
  evidence = sorted({h.title for h, _, _ in rows})
  rng = np.random.default_rng(seed)
  if num_evidence_pages is not None:
    if not 0 < num_evidence_pages <= len(evidence):
      raise ValueError(
        f"num_evidence_pages must be in 1..{len(evidence)}, got {num_evidence_pages}"
      )
    picked = rng.choice(len(evidence), size=num_evidence_pages, replace=False)
    evidence = sorted(evidence[i] for i in picked)
    keep = set(evidence)
    rows = [r for r in rows if r[0].title in keep]

  # Distractors come from their own generator so that they do not depend on whether
  # (or how) evidence pages were sampled, and nest across library sizes.
  all_evidence = {h.title for h in grounded}
  pool = sorted(t for t in by_title if t not in all_evidence)
  n = len(evidence) if library_size is None else library_size
  if n < len(evidence):
    raise ValueError(f"library_size {n} is smaller than the {len(evidence)} evidence pages")
  if n - len(evidence) > len(pool):
    raise ValueError(
      f"library_size {n} needs {n - len(evidence)} distractors; only "
      f"{len(pool)} other summaries exist"
    )
  order = np.random.default_rng([seed, 1]).permutation(len(pool))
  distractors = [pool[i] for i in order[: n - len(evidence)]]
  documents = tuple(by_title[t] for t in evidence) + tuple(by_title[t] for t in distractors)

  examples = []
  for h, golds, elements in rows:
    in_doc = _answer_in_page(by_title[h.title].text, golds, elements)
    meta: dict[str, Any] = {
      "dataset": "fanoutqa",
      "split": split_of(h.title),
      "parent_ids": list(h.parent_ids),
      "answer_raw": h.answer,
      "answer_type": type(h.answer).__name__,
      "answer_in_document": in_doc,
      "evidence_url": h.url,
      "evidence_pageid": h.pageid,
    }
    if elements:
      meta["answer_elements"] = list(elements)
    examples.append(
      KiltExample(
        id=h.id, input=h.question, answers=golds, provenance=(h.title,), task="qa", meta=meta
      )
    )

  stats = {
    "single_hop_occurrences": all_leaves,
    "single_hop_questions": len(hops),
    "grounded_occurrences": leaf_occurrences,
    "grounded_questions": len(grounded),
    "skipped_answers": skipped_answers,
    "questions": len(examples),
    "evidence_pages": len(evidence),
    "distractors": len(distractors),
    "library_size": len(documents),
    "answer_in_document": sum(ex.meta["answer_in_document"] for ex in examples),
    "list_answers": sum("answer_elements" in ex.meta for ex in examples),
  }
  for name in SPLITS:
    part = [ex for ex in examples if ex.meta["split"] == name]
    stats[f"{name}_questions"] = len(part)
    stats[f"{name}_pages"] = len({ex.provenance[0] for ex in part})
  return FanOutQABenchmark(
    examples=tuple(examples), documents=documents, num_evidence=len(evidence), stats=stats
  )
