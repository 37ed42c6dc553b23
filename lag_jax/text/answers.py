"""Answer matching: SQuAD-style normalisation, exact match, token F1 and containment.

Below both the data readers (which check that an answer occurs in a page) and the
evaluation (``eval/metrics.py``, which scores predictions with these).

Normalisation (``normalize_answer``) follows the SQuAD / KILT evaluation scripts
(lowercase, delete punctuation, drop the articles a/an/the, collapse whitespace)
with two documented additions, both because the FanOutQA answers are often numbers:

- a decimal point between two digits is kept ("6.2" stays "6.2", where SQuAD would
  make it "62" and so match "62"), and trailing zeros of a decimal are dropped
  ("37.0" -> "37", "2.50" -> "2.5");
- thousands separators vanish as in SQuAD, since commas are punctuation
  ("1,234" -> "1234").

Unicode punctuation (curly quotes, dashes) is deleted like ASCII punctuation,
because generated text uses it where the gold answers do not. Accents are kept.

List answers ("Who founded YouTube?" -> three names) are scored by
``contains_all``: the prediction counts as exactly right when every element
appears in it (each element's normalised tokens as a contiguous run of the
prediction's normalised tokens). Token F1 for them is taken against the
elements joined into one string, the form stored as the gold answer.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A decimal number, not part of a dotted run like "1.2.3" (which is left alone).
_DECIMAL = re.compile(r"(?<![\d.])(\d+)\.(\d+)(?!\.?\d)")


def _is_punct(ch: str) -> bool:
  return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _canonical_decimal(m: re.Match[str]) -> str:
  frac = m.group(2).rstrip("0")
  return f"{m.group(1)}.{frac}" if frac else m.group(1)


def normalize_answer(text: str) -> str:
  """SQuAD-style normalisation with decimal numbers kept intact (see the module doc).

  Example: ``"The 1,234.50 Apples!"`` -> ``"1234.5 apples"``.
  """
  text = text.lower()
  # Thousands separators first, so that "1,234.50" becomes one decimal number.
  text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
  text = _DECIMAL.sub(_canonical_decimal, text)
  chars = []
  for i, ch in enumerate(text):
    if ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
      chars.append(ch)  # a decimal point
    elif not _is_punct(ch):
      chars.append(ch)
  text = _ARTICLES.sub(" ", "".join(chars))
  return " ".join(text.split())


def _tokens(text: str) -> list[str]:
  return normalize_answer(text).split()


def as_list(golds: str | Iterable[str]) -> list[str]:
  return [golds] if isinstance(golds, str) else list(golds)


def exact_match(prediction: str, golds: str | Iterable[str]) -> float:
  """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(g) for g in as_list(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
  if not pred_tokens or not gold_tokens:
    # SQuAD's rule: both empty is a match, one empty is not.
    return float(pred_tokens == gold_tokens)
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision = same / len(pred_tokens)
  recall = same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Iterable[str]) -> float:
  """SQuAD token F1 (bag of normalised tokens), the maximum over the gold answers."""
  pred = _tokens(prediction)
  return max((_f1(pred, _tokens(g)) for g in as_list(golds)), default=0.0)


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
  if not needle:
    return False  # an element that normalises to nothing cannot be found
  n = len(needle)
  return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def answer_in_text(text: str, golds: str | Iterable[str]) -> float:
  """1.0 if any gold answer's normalised tokens occur as a contiguous run in ``text``.

  The lenient "answer is contained in the output" measure (FanOutQA's loose
  accuracy); also used to check whether an answer is literally in a document.
  """
  hay = _tokens(text)
  return float(any(_contains_run(hay, _tokens(g)) for g in as_list(golds)))


def contains_all(prediction: str, elements: Sequence[str]) -> float:
  """1.0 if every element of a list answer occurs in the prediction (see the module doc)."""
  if not elements:
    raise ValueError("a list answer needs at least one element")
  hay = _tokens(prediction)
  return float(all(_contains_run(hay, _tokens(e)) for e in elements))
