"""Knowledge-adapter training data from the document alone (and the base model).

Nothing here sees questions, relations or structured facts: every step reads a page's
title and text, and the ``rewrite`` step the base model too. A recipe is a list of
steps; an adapter's texts are the steps' texts in this order:

  page      the document itself.
  restate   title-anchored statements of its first sentences and "Q: What is one fact
            about <title>? A: <sentence>" turns (``lag_jax.data.restate``).
  cloze     fill-in-the-blank turns: one span of a sentence (a number, a capitalised
            name, the short noun phrase after an article) blanked, the span the answer,
            every sentence made to name the title (``restate.cloze_turns``).
  qa        the same spans asked as questions in chat turns: the span replaced in place
            by "what" / "which year" / "how many" ("Ada Lovelace was born in what in
            1815?" -> "London"), the user's turn in the model's chat template, the
            loss on the answer only (``restate.question_turns``).
  shuffle   the title-anchored sentences in seeded random orders.
  rewrite   the paper's synthetic continued pretraining: the base model rewrites the
            page from several prompts, sampled. A rewrite is kept when it names the
            entity and brings no number, and few capitalised words, that the page does
            not have (a data-free filter against invented facts). Generated once per
            document, batched, and cached under a fingerprint of the model, the
            prompts, the sampling settings and the page.
  selfqa    the base model, page in the prompt, writes questions about it with their
            answers ("Q: ... A: ..."); a pair is kept when its answer is a short span
            of the page (not the title) that the question does not already contain
            (data-free). Kept pairs become chat turns as in ``qa``. Generated and
            cached as ``rewrite``.

The cache (``<cache_dir>/<adapter folder>.json``) holds each document's raw generations
and their cost; the filter runs on every call, so changing it needs no regeneration.
A document whose page or recipe changed is generated again; the others are read back.
Rewrites of a document are generated in batches with other documents' prompts, so
regenerating a cache can sample other rewrites (the seed fixes a whole batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import tqdm
from absl import logging

from lag_jax.data import restate
from lag_jax.data.records import Document
from lag_jax.errors import ConfigError
from lag_jax.files import write_json_atomic
from lag_jax.integrity import fingerprint
from lag_jax.training.data import AdapterJob, folder_name

STEPS = ("page", "restate", "cloze", "qa", "shuffle", "rewrite", "selfqa")
# The steps that generate with the base model, and their prompts.
GENERATED = ("rewrite", "selfqa")

# {title} and {text} are the document's. Three framings, so that the rewrites differ in
# form (the paper samples several rewrites per page).
REWRITE_PROMPTS = (
  "Rewrite the following text about {title} in your own words. Keep every name, place, "
  "date and number exactly as written.\n\nText: {text}",
  "Write a short encyclopedia entry about {title} that uses only the facts in this "
  "text.\n\nText: {text}",
  "Explain to a friend who or what {title} is, using only the facts in this text.\n\nText: {text}",
)
SELFQA_PROMPTS = (
  "Read the text, then write five questions about {title}, each followed by its short "
  "answer copied from the text. Use the format:\nQ: <question>\nA: <answer>\n\n"
  "Text: {text}",
)
PROMPTS = {"rewrite": REWRITE_PROMPTS, "selfqa": SELFQA_PROMPTS}
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class KnowledgeRecipe:
  """How a knowledge adapter's training texts are made from its page.

  Attributes:
    steps: a subset of STEPS (in any order; texts come in STEPS' order).
    restate_sentences: sentences restated by ``restate`` (the first ones).
    cloze_turns: at most this many fill-in-the-blank turns per page (and as many
      question turns for ``qa``).
    shuffles: sentence-shuffled copies of the page made by ``shuffle``.
    rewrite_prompts: how many of REWRITE_PROMPTS ``rewrite`` uses.
    rewrite_samples: rewrites sampled per prompt.
    temperature, top_k, top_p: the rewrites' sampling settings (top_k keeps the
      nucleus search to k candidates: a full sort of the vocabulary per step is the
      slow part of sampling on a CPU).
    max_new_tokens: at most this many tokens per rewrite (a batch gets 1.5x its
      longest page plus 16, up to this).
    max_page_chars: the page is cut to this many characters in a rewrite prompt.
    batch_size: rewrite prompts per ``generate`` call.
    seed: the rewrites' sampling seed (and the shuffles').
  """

  steps: tuple[str, ...] = ("page", "restate", "qa", "shuffle")
  restate_sentences: int = 32
  cloze_turns: int = 64
  shuffles: int = 2
  rewrite_prompts: int = 3
  rewrite_samples: int = 2
  temperature: float = 0.7
  top_k: int = 50
  top_p: float = 0.9
  max_new_tokens: int = 256
  max_page_chars: int = 3000
  batch_size: int = 16
  seed: int = 0

  def __post_init__(self):
    unknown = [s for s in self.steps if s not in STEPS]
    if unknown:
      raise ConfigError(
        f"config field 'knowledge_data.steps': unknown step(s) {unknown}; valid: {list(STEPS)}"
      )
    if not self.steps:
      raise ConfigError("config field 'knowledge_data.steps' is empty; use at least 'page'")
    for name in ("restate_sentences", "cloze_turns", "shuffles", "rewrite_samples"):
      if getattr(self, name) < 0:
        raise ConfigError(f"config field 'knowledge_data.{name}' must be >= 0")
    if not 1 <= self.rewrite_prompts <= len(REWRITE_PROMPTS):
      raise ConfigError(
        f"config field 'knowledge_data.rewrite_prompts' must be in 1..{len(REWRITE_PROMPTS)}"
      )
    if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_page_chars < 1:
      raise ConfigError(
        "config fields 'knowledge_data.max_new_tokens', 'batch_size' and "
        "'max_page_chars' must be >= 1"
      )

  @classmethod
  def from_config(cls, c: Mapping) -> KnowledgeRecipe:
    """From a ConfigDict / dict; ``steps`` as a comma-separated string or a sequence."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(c.keys()) - fields)
    if unknown:
      raise ConfigError(
        f"unknown config field(s) knowledge_data.{unknown}; valid: {sorted(fields)}"
      )
    kw = dict(c.items())
    if isinstance(kw.get("steps"), str):
      kw["steps"] = tuple(s.strip() for s in kw["steps"].split(",") if s.strip())
    elif "steps" in kw:
      kw["steps"] = tuple(kw["steps"])
    return cls(**kw)

  def generation_fields(self, kind: str = "rewrite") -> dict:
    """What a document's cached generations of ``kind`` (GENERATED) depend on, besides
    the model and the page."""
    prompts = REWRITE_PROMPTS[: self.rewrite_prompts] if kind == "rewrite" else PROMPTS[kind]
    return {
      "kind": kind,
      "prompts": list(prompts),
      "samples": self.rewrite_samples,
      "temperature": self.temperature,
      "top_k": self.top_k,
      "top_p": self.top_p,
      "max_new_tokens": self.max_new_tokens,
      "max_page_chars": self.max_page_chars,
      "seed": self.seed,
      "version": _CACHE_VERSION,
    }


@dataclasses.dataclass
class DataReport:
  """What making the data cost: rewrites generated now vs read from the cache.

  Attributes:
    documents: documents processed.
    generated_documents: documents whose rewrites were generated in this call.
    generated_tokens: tokens generated in this call.
    generation_seconds: wall time of this call's generation (compilation included).
    cached_tokens: tokens the cached documents cost when they were generated.
    kept, dropped: generations (rewrites; self-QA pairs) kept / dropped by the
      filters, over every document.
    texts_per_step: texts (``qa``: pairs) per document, by step (mean).
    rewrite: the recipe has a step that generates (``rewrite``, ``selfqa``).
  """

  documents: int = 0
  generated_documents: int = 0
  generated_tokens: int = 0
  generation_seconds: float = 0.0
  cached_tokens: int = 0
  kept: int = 0
  dropped: int = 0
  texts_per_step: dict = dataclasses.field(default_factory=dict)
  rewrite: bool = False

  def summary(self) -> str:
    per = self.generated_tokens / max(self.generated_documents, 1)
    rate = self.generated_tokens / max(self.generation_seconds, 1e-9)
    steps = ", ".join(f"{k} {v:.1f}" for k, v in self.texts_per_step.items())
    head = f"knowledge data for {self.documents} documents: texts per document {steps}"
    if not self.rewrite:
      return head
    return (
      f"{head}; generations made for {self.generated_documents} documents now "
      f"({self.generated_tokens} tokens, {per:.0f} per document, "
      f"{self.generation_seconds:.1f} s, {rate:.0f} tokens/s), "
      f"{self.documents - self.generated_documents} from the cache; "
      f"{self.kept} kept, {self.dropped} dropped by the filters"
    )


_NUMBERS = re.compile(r"\d+")
_WORD = re.compile(r"[\w'’-]+")
_PREAMBLE = re.compile(
  r"^\s*(?:(?:sure|certainly|of course)[^\n]*?[:!.]\s*|"
  r"(?:here(?:'s| is)[^\n]*?:)\s*|(?:rewrite|rewritten text|text|entry)\s*:\s*)",
  re.IGNORECASE,
)


def clean_rewrite(text: str) -> str:
  """A generation without chat preambles ("Sure! Here is ...:", "Rewrite:"), quotes
  around the whole of it, or surrounding whitespace."""
  text = text.strip()
  for _ in range(2):
    text = _PREAMBLE.sub("", text, count=1).strip()
  if len(text) >= 2 and text[0] == text[-1] == '"':
    text = text[1:-1].strip()
  return text


def rewrite_problem(title: str, page: str, rewrite: str, max_new_names: float = 0.2) -> str | None:
  """Why a rewrite is dropped, or None to keep it.

  Data-free checks against the page alone: the rewrite names the entity (its full
  title, or the title's last word), has every number it states in the page, and at
  most ``max_new_names`` of its capitalised words (past a sentence's first) are absent
  from the page: a 135M model's rewrites drift to invented names and years.
  """
  if len(rewrite) < 20:
    return "too short"
  last = title.split()[-1] if title.split() else title
  if title not in rewrite and last not in rewrite:
    return "does not name the entity"
  page_numbers = set(_NUMBERS.findall(page))
  new_numbers = [n for n in _NUMBERS.findall(rewrite) if n not in page_numbers]
  if new_numbers:
    return f"numbers not in the page: {new_numbers[:3]}"
  page_words = {w.lower() for w in _WORD.findall(page)} | {w.lower() for w in title.split()}
  names = []
  for sentence in restate.sentences(rewrite):
    words = _WORD.findall(sentence)
    names += [w for w in words[1:] if w[:1].isupper()]
  if names:
    new = [w for w in names if w.lower() not in page_words]
    if len(new) > max_new_names * len(names):
      return f"names not in the page: {new[:3]}"
  return None


def _cache_path(cache_dir: str, title: str, kind: str = "rewrite") -> str:
  suffix = "" if kind == "rewrite" else "." + kind
  return os.path.join(cache_dir, folder_name(title) + suffix + ".json")


def _read_cache(path: str, want: str) -> dict | None:
  try:
    with open(path) as f:
      entry = json.load(f)
  except (OSError, ValueError):
    return None
  ok = isinstance(entry, dict) and entry.get("fingerprint") == want
  return entry if ok and isinstance(entry.get("generations"), list) else None


def generate_rewrites(
  documents: Sequence[Document],
  recipe: KnowledgeRecipe,
  model,
  tokenizer,
  cache_dir: str,
  *,
  model_print: str,
  progress: bool = True,
  kind: str = "rewrite",
) -> tuple[dict[str, list[str]], DataReport]:
  """Every document's raw generations of ``kind`` (title -> list; GENERATED), made
  where not cached.

  Args:
    documents: the pages (unique titles).
    recipe: the prompts and sampling settings.
    model, tokenizer: the base model (``generate``) and its tokenizer (chat template).
    cache_dir: one JSON file per document (created if missing).
    model_print: the base model's fingerprint (part of every cache key).
    progress: a tqdm bar over the batches (tokens/s).
  """
  from lag_jax.generation import generate
  from lag_jax.generation.sampling import make_sampler

  os.makedirs(cache_dir, exist_ok=True)
  fields = recipe.generation_fields(kind)
  report = DataReport(documents=len(documents))
  out: dict[str, list[str]] = {}
  todo = []
  for doc in documents:
    want = fingerprint(
      {"model": model_print, "recipe": fields, "title": doc.title, "text": doc.text}
    )
    entry = _read_cache(_cache_path(cache_dir, doc.title, kind), want)
    if entry is not None:
      out[doc.title] = [str(g) for g in entry["generations"]]
      report.cached_tokens += int(entry.get("tokens", 0))
    else:
      todo.append((doc, want))
  if not todo:
    return out, report

  stop = [
    i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")) if i
  ] or list(tokenizer.eos_token_ids)
  rows = []  # (document index in todo, prompt ids, page tokens)
  for d, (doc, _) in enumerate(todo):
    page = doc.text[: recipe.max_page_chars]
    page_tokens = len(tokenizer.encode(page))
    for template in fields["prompts"]:
      user = template.format(title=doc.title, text=page)
      ids = tokenizer.encode(
        tokenizer.apply_chat_template(
          [{"role": "user", "content": user}], add_generation_prompt=True
        )
      )
      rows += [(d, ids, page_tokens)] * recipe.rewrite_samples
  # Similar lengths batch together (less padding, fewer new-token budgets to compile).
  order = sorted(range(len(rows)), key=lambda r: (rows[r][2], r))
  sampler = make_sampler(
    "sample", temperature=recipe.temperature, top_k=recipe.top_k, top_p=recipe.top_p
  )
  texts: list[list[str]] = [[] for _ in todo]
  tokens = [0] * len(todo)
  t0 = time.perf_counter()
  batches = [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
  bar = tqdm.tqdm(batches, desc=kind, unit="batch", disable=not progress)
  for b, batch in enumerate(bar):
    budget = min(recipe.max_new_tokens, int(1.5 * max(rows[r][2] for r in batch)) + 16)
    result = generate(
      model,
      [rows[r][1] for r in batch],
      max_new_tokens=budget,
      sampler=sampler,
      stop_tokens=stop,
      seed=recipe.seed * 100_003 + b,
    )
    for r, new in zip(batch, result.tokens, strict=True):
      d = rows[r][0]
      texts[d].append(tokenizer.decode([int(t) for t in new]))
      tokens[d] += len(new)
    report.generated_tokens = sum(tokens)
    bar.set_postfix(tok_s=f"{report.generated_tokens / (time.perf_counter() - t0):.0f}")
  report.generation_seconds = time.perf_counter() - t0
  report.generated_documents = len(todo)
  for d, (doc, want) in enumerate(todo):
    entry = {
      "fingerprint": want,
      "title": doc.title,
      "generations": texts[d],
      "tokens": tokens[d],
      "seconds": report.generation_seconds * tokens[d] / max(report.generated_tokens, 1),
    }
    write_json_atomic(_cache_path(cache_dir, doc.title, kind), entry)
    out[doc.title] = texts[d]
  return out, report


_QA_LINE = re.compile(r"Q(?:uestion)?\s*\d*\s*[:.]\s*(.+?)\s*\n+\s*A(?:nswer)?\s*\d*\s*[:.]\s*(.+)")


def selfqa_pairs(title: str, page: str, generation: str, max_words: int = 8) -> tuple[list, int]:
  """The (question, answer) pairs of one self-QA generation that pass the data-free
  filter, and how many were dropped: the answer (trailing punctuation stripped) has at
  most ``max_words`` words, occurs in the page (ignoring case), is not the title, and
  is not already in the question; a question without the entity's name gets
  "About <title>: " in front."""
  kept, dropped = [], 0
  page_lower = page.lower()
  for m in _QA_LINE.finditer(generation):
    question, answer = m.group(1).strip(), m.group(2).strip().rstrip(".!").strip()
    ok = (
      answer
      and len(answer.split()) <= max_words
      and answer.lower() in page_lower
      and answer.lower() != title.lower()
      and answer.lower() not in question.lower()
    )
    if not ok:
      dropped += 1
      continue
    last = title.split()[-1] if title.split() else title
    if title not in question and last not in question:
      question = f"About {title}: {question}"
    kept.append((question, answer))
  return kept, dropped


def knowledge_texts(
  doc: Document, recipe: KnowledgeRecipe, generated: Mapping[str, Sequence[str]] | None = None
) -> tuple[dict[str, list], int]:
  """One document's training data by step (STEPS order): texts, except the
  (question, answer) pairs of ``qa`` and ``selfqa``; and how many generations (or
  self-QA pairs) the filters dropped. ``generated``: kind -> the document's raw
  generations (GENERATED)."""
  generated = generated or {}
  steps = set(recipe.steps)
  by_step: dict[str, list[str]] = {}
  if "page" in steps:
    by_step["page"] = [doc.text]
  if "restate" in steps:
    by_step["restate"] = restate.restatements(doc.title, doc.text, recipe.restate_sentences)
  if "cloze" in steps:
    by_step["cloze"] = restate.cloze_turns(doc.title, doc.text, recipe.cloze_turns)
  if "qa" in steps:
    by_step["qa"] = restate.question_turns(doc.title, doc.text, recipe.cloze_turns)
  if "shuffle" in steps:
    by_step["shuffle"] = restate.shuffled_pages(doc.title, doc.text, recipe.shuffles, recipe.seed)
  dropped = 0
  if "rewrite" in steps:
    kept = []
    for raw in generated.get("rewrite", ()):
      text = clean_rewrite(raw)
      if rewrite_problem(doc.title, doc.text, text) is None and text not in kept:
        kept.append(text)
      else:
        dropped += 1
    by_step["rewrite"] = kept
  if "selfqa" in steps:
    pairs = []
    for raw in generated.get("selfqa", ()):
      got, bad = selfqa_pairs(doc.title, doc.text, raw)
      pairs += [p for p in got if p not in pairs]
      dropped += bad
    by_step["selfqa"] = pairs
  return by_step, dropped


_PAIR_STEPS = ("qa", "selfqa")


def _chat_prompt(tokenizer, question: str) -> str:
  return tokenizer.apply_chat_template(
    [{"role": "user", "content": question}], add_generation_prompt=True
  )


def knowledge_jobs(
  documents: Sequence[Document],
  recipe: KnowledgeRecipe,
  *,
  model=None,
  tokenizer=None,
  cache_dir: str | None = None,
  extra_texts: Mapping[str, Sequence[str]] | None = None,
  progress: bool = True,
) -> tuple[list[AdapterJob], DataReport]:
  """One knowledge AdapterJob per document, trained on texts made by ``recipe``.

  Args:
    documents: the pages, in library order (unique titles).
    recipe: the steps and their settings.
    model, tokenizer, cache_dir: needed by the ``rewrite`` step (``qa`` needs the
      tokenizer's chat template).
    extra_texts: title -> more texts appended to that document's (for ablations
      that use data a user would not have, e.g. a synthetic world's generator).
    progress: show generation progress.
  Returns:
    The jobs (metadata: title, texts per step) and the cost report.
  """
  generated: dict[str, dict[str, list[str]]] = {}
  report = DataReport(documents=len(documents))
  if "qa" in recipe.steps and tokenizer is None:
    raise ValueError("the 'qa' step needs the tokenizer (its chat template)")
  kinds = [k for k in GENERATED if k in recipe.steps]
  if kinds:
    if model is None or tokenizer is None or not cache_dir:
      raise ValueError(f"the {kinds[0]!r} step needs the base model, its tokenizer and a cache_dir")
    from lag_jax.training.build import model_fingerprint

    model_print = model_fingerprint(model)
    for kind in kinds:
      generated[kind], part = generate_rewrites(
        documents, recipe, model, tokenizer, cache_dir,
        model_print=model_print, progress=progress, kind=kind,
      )  # fmt: skip
      report.generated_documents += part.generated_documents
      report.generated_tokens += part.generated_tokens
      report.generation_seconds += part.generation_seconds
      report.cached_tokens += part.cached_tokens
  jobs = []
  counts: dict[str, list[int]] = {s: [] for s in STEPS if s in recipe.steps}
  for doc in documents:
    mine = {kind: got.get(doc.title, ()) for kind, got in generated.items()}
    by_step, dropped = knowledge_texts(doc, recipe, mine)
    report.dropped += dropped
    report.kept += len(by_step.get("rewrite", ())) + len(by_step.get("selfqa", ()))
    for step, texts in by_step.items():
      counts[step].append(len(texts))
    texts = [t for step in STEPS if step not in _PAIR_STEPS for t in by_step.get(step, ())]
    texts += list((extra_texts or {}).get(doc.title, ()))
    pairs = [
      (_chat_prompt(tokenizer, q), a) for step in _PAIR_STEPS for q, a in by_step.get(step, ())
    ]
    meta = {"title": doc.title, "texts_per_step": {k: len(v) for k, v in by_step.items()}}
    jobs.append(AdapterJob(doc.title, texts=texts, pairs=pairs, metadata=meta))
  report.texts_per_step = {k: float(np.mean(v)) if v else 0.0 for k, v in counts.items()}
  report.rewrite = bool(kinds)
  logging.info("%s", report.summary())
  if cache_dir and kinds:
    write_json_atomic(os.path.join(cache_dir, "report.json"), dataclasses.asdict(report))
  return jobs, report
