"""Programmatic restatements of a real document, for knowledge-adapter training.

The paper trains each knowledge adapter on its page plus rewrites of it by the base
model; the pilot in LAG.md found Q/A-style restatements added about 15 points to the
oracle at SmolLM2's size. A 135M model's own rewrites drift from the facts, so for real
pages (Wikipedia summaries, KILT pages) we restate each sentence under the page's
title, once as a statement and once as a question-and-answer turn:

  "<title>: <sentence>"
  "Q: What is one fact about <title>? A: <sentence>"

Both tie every fact to the entity's name, which is what a question names. Pure text
functions, deterministic.
"""

from __future__ import annotations

import re

__all__ = ["restatements", "sentences"]

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
