"""Programmatic restatements of a real document, for knowledge-adapter training.

The paper trains each knowledge adapter on its page plus rewrites of it by the base
model (docs/method.md); restatements tied to the page's title help a small model more
(RESULTS.md measures each step). A 135M model's own rewrites drift from the facts, so for real
pages (Wikipedia summaries, KILT pages) we restate each sentence under the page's
title, once as a statement and once as a question-and-answer turn:

  "<title>: <sentence>"
  "Q: What is one fact about <title>? A: <sentence>"

Both tie every fact to the entity's name, which is what a question names. Pure text
functions, deterministic.
"""

from __future__ import annotations

import re

__all__ = [
  "anchored_sentences",
  "cloze_spans",
  "cloze_turns",
  "question_turns",
  "restatements",
  "sentences",
  "shuffled_pages",
]

# A sentence ends at . ! or ? followed by space and an upper-case letter, digit or quote,
# except after initials ("U.S. Army", "John F. Kennedy"); a wrong cut elsewhere only
# shortens a restatement.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\.[A-Z]\.)(?<!\s[A-Z]\.)\s+(?=[A-Z0-9\"'(])")


def sentences(text: str) -> list[str]:
  """The text's sentences, whitespace-normalised, empty ones dropped."""
  text = " ".join(text.split())
  return [s for s in _SENTENCE_END.split(text) if s]


def restatements(title: str, text: str, max_sentences: int = 8) -> list[str]:
  """Title-anchored statement and Q/A texts for the first ``max_sentences`` sentences.

  Args:
    title: the page title (the entity the facts are about).
    text: the page text.
    max_sentences: at most this many sentences are restated (summaries put their
      main facts first; this bounds the training tokens per adapter).
  Returns:
    2 texts per restated sentence: statements first, then Q/A turns.
  """
  if max_sentences < 0:
    raise ValueError(f"max_sentences must be >= 0, got {max_sentences}")
  picked = sentences(text)[:max_sentences]
  return [f"{title}: {s}" for s in picked] + [
    f"Q: What is one fact about {title}? A: {s}" for s in picked
  ]


# A sentence that opens with a pronoun or a generic reference talks about the page's
# entity in an encyclopedic page; naming it ties the sentence to the name a question uses.
_LEADING_REFERENCE = re.compile(
  r"^(?:He|She|They|It|His|Her|Its|Their|The (?:company|firm|town|city|village|band|group))\b"
)
_POSSESSIVE = ("His", "Her", "Its", "Their")


def anchored_sentences(title: str, text: str, max_sentences: int | None = None) -> list[str]:
  """The text's sentences, each made to name ``title``.

  A sentence that opens with a pronoun or "The company" (etc.) gets the title in its
  place ("She works for X." -> "Ada Lovelace works for X."; "Her father" -> "Ada
  Lovelace's father"); any other sentence without the title is prefixed "<title>: ".
  """
  out = []
  for s in sentences(text)[:max_sentences]:
    m = _LEADING_REFERENCE.match(s)
    if m:
      name = f"{title}'s" if m.group(0) in _POSSESSIVE else title
      s = name + s[m.end() :]
    elif title not in s:
      s = f"{title}: {s}"
    out.append(s)
  return out


# Spans a fill-in-the-blank turn may ask for: numbers, runs of capitalised words, and
# the short noun phrase after an article that ends at punctuation or a function word
# ("a marine biologist from", "the cello,"). Plain English patterns, nothing per
# relation: the same rules run on every page.
_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w])")
_CAPITALISED = re.compile(r"(?<![\w'])[A-Z][\w'’-]*(?:\s+(?:of\s+|de\s+|the\s+)?[A-Z][\w'’-]*)*")
_ARTICLE_PHRASE = re.compile(
  r"\b(?:a|an|the) ([a-z][\w-]*(?: [a-z][\w-]*){0,2}?)"
  r"(?=[,.;:)]| (?:from|in|of|at|for|with|and|who|which|that|since|by|to|on|as)\b)"
)


def cloze_spans(title: str, sentence: str) -> list[tuple[int, int]]:
  """(start, end) of the answerable spans of ``sentence``, in order, without overlaps
  and without the title's own words (a question names the entity; it never asks it)."""
  title_words = set(title.split())
  # Where the sentence's own words begin (after an anchoring "<title>: ").
  body = len(title) + 2 if sentence.startswith(f"{title}: ") else 0
  found = []
  for pattern, group in ((_NUMBER, 0), (_CAPITALISED, 0), (_ARTICLE_PHRASE, 1)):
    for m in pattern.finditer(sentence):
      start, end = m.span(group)
      span = sentence[start:end]
      if not span.strip() or set(span.replace("'s", "").split()) <= title_words:
        continue
      if pattern is _CAPITALISED and start == body and " " not in span:
        continue  # a capitalised sentence opening ("Outside work, ..."), not a name
      found.append((start, end))
  out, last_end = [], -1
  for start, end in sorted(found, key=lambda se: (se[0], -se[1])):
    if start >= last_end:
      out.append((start, end))
      last_end = end
  return out


def cloze_turns(title: str, text: str, max_turns: int = 24) -> list[str]:
  """Fill-in-the-blank Q/A texts: each answerable span of each anchored sentence,
  blanked, with the span as the answer.

  "Q: Fill in the blank: Ada Lovelace was born in ___ in 1815. A: London"
  Sentences are taken in order, spans in order, up to ``max_turns`` texts.
  """
  if max_turns < 0:
    raise ValueError(f"max_turns must be >= 0, got {max_turns}")
  out = []
  for s in anchored_sentences(title, text):
    for start, end in cloze_spans(title, s):
      if len(out) >= max_turns:
        return out
      out.append(f"Q: Fill in the blank: {s[:start]}___{s[end:]} A: {s[start:end]}")
  return out


_YEAR = re.compile(r"1[0-9]{3}|20[0-9]{2}")


def _wh_phrase(span: str) -> str:
  """The question phrase that stands in for ``span``: by its form only (a year, another
  number, or anything else), the same rule on every page."""
  if _YEAR.fullmatch(span):
    return "which year"
  if _NUMBER.fullmatch(span):
    return "how many"
  return "what"


def question_turns(title: str, text: str, max_turns: int = 64) -> list[tuple[str, str]]:
  """(question, answer) pairs: each answerable span of each anchored sentence replaced
  in place by a question phrase, the span as the answer.

  ("Ada Lovelace was born in what in 1815?", "London"): an in-situ question, the
  form an echo question takes in English; crude, but it asks for the fact with the
  entity's name in it, as a user's question does, and never copies a blank marker
  into answers. Sentences in order, spans in order, up to ``max_turns`` pairs.
  """
  if max_turns < 0:
    raise ValueError(f"max_turns must be >= 0, got {max_turns}")
  out = []
  for s in anchored_sentences(title, text):
    body = s.removeprefix(f"{title}: ")
    offset = len(s) - len(body)
    for start, end in cloze_spans(title, s):
      if len(out) >= max_turns:
        return out
      start, end = start - offset, end - offset
      if start < 0:
        continue
      q = (body[:start] + _wh_phrase(body[start:end]) + body[end:]).rstrip(" .!?") + "?"
      if title not in q:
        q = f"About {title}: {q}"
      out.append((q, body[start:end]))
  return out


def shuffled_pages(title: str, text: str, copies: int, seed: int = 0) -> list[str]:
  """``copies`` texts of the anchored sentences in seeded random orders: the same
  facts in other contexts, so that no fact is reachable only from the one before it."""
  import random

  anchored = anchored_sentences(title, text)
  rng = random.Random(f"lag_jax.restate.shuffle:{seed}:{title}")
  out = []
  for _ in range(copies):
    order = list(anchored)
    rng.shuffle(order)
    out.append(" ".join(order))
  return out
