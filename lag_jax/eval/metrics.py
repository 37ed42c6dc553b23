"""Answer metrics: label accuracy, QA scores and the paper's normalised score, over the
answer matching of ``lag_jax.text.answers`` (re-exported here)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
  "FEVER_LABELS",
  "QAScore",
  "accuracy",
  "contains_all",
  "answer_in_text",
  "exact_match",
  "extract_answer",
  "label_accuracy",
  "mean",
  "normalize_answer",
  "normalize_label",
  "normalized_scores",
  "qa_score",
  "token_f1",
]

from lag_jax.text.answers import (  # noqa: F401 (re-exported)
  answer_in_text,
  as_list,
  contains_all,
  exact_match,
  normalize_answer,
  token_f1,
)


@dataclasses.dataclass(frozen=True)
class QAScore:
  """Scores of one QA prediction: exact match, token F1 and containment, each in [0, 1]."""

  em: float
  f1: float
  contains: float


def qa_score(
  prediction: str, golds: str | Iterable[str], elements: Sequence[str] | None = None
) -> QAScore:
  """Scores a short-answer prediction against gold answers.

  Args:
    prediction: the extracted answer (see ``extract_answer``).
    golds: acceptable answers; the best one counts.
    elements: for a list answer, its elements: then EM is ``contains_all`` (or an exact
      match of a gold string), and containment means all elements are present.
  Returns:
    ``QAScore(em, f1, contains)``.
  """
  golds = as_list(golds)
  em = exact_match(prediction, golds)
  f1 = token_f1(prediction, golds)
  if elements:
    contains = contains_all(prediction, elements)
    em = max(em, contains)
  else:
    contains = answer_in_text(prediction, golds)
  return QAScore(em=em, f1=f1, contains=contains)


# ---------------------------------------------------------------------------
# Generated text -> answer.

_PREFIX = re.compile(
  r"^(?:(?:so|thus|therefore),?\s+)?"
  r"(?:(?:the\s+)?(?:final\s+|short\s+|correct\s+)?answer\b(?:\s+to\s+the\s+question)?"
  r"(?:\s+is|\s+would\s+be)?\s*[:\-]?|a\s*:)\s*",
  re.IGNORECASE,
)
_WRAPPERS = "\"'*`“”‘’ "


def extract_answer(text: str) -> str:
  """The short answer in a model's generated text; one fixed rule for every method.

  1. Keep the first non-empty line (models continue with explanations or new turns).
  2. Drop a leading "Answer:", "A:", "The answer is", "The final answer is:",
     "So the answer is" (case-insensitive).
  3. Strip surrounding quotes, backticks and markdown asterisks, then one trailing
     period (a period inside, as in "J. D. Drew", stays).

  A sentence answer ("The capital of France is Paris.") is left as it is: EM then
  fails while F1 and ``answer_in_text`` still credit it.
  """
  line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
  line = _PREFIX.sub("", line, count=1).strip()
  line = line.strip(_WRAPPERS)
  if line.endswith(".") and not line.endswith(".."):
    line = line[:-1].rstrip()
  return line.strip(_WRAPPERS)


# ---------------------------------------------------------------------------
# Classification-style tasks.

# Words that name each FEVER label in free text (after normalize_answer).
FEVER_LABELS: dict[str, frozenset[str]] = {
  "SUPPORTS": frozenset(
    {"supports", "support", "supported", "true", "yes", "correct", "right", "accurate"}
  ),
  "REFUTES": frozenset(
    {"refutes", "refute", "refuted", "false", "no", "incorrect", "wrong", "inaccurate"}
  ),
}
_NEGATIONS = frozenset({"not", "isnt", "doesnt", "never"})


def normalize_label(text: str, labels: Mapping[str, Iterable[str]] = FEVER_LABELS) -> str | None:
  """Maps free text to a label name, or None when no label word appears.

  Rule: the first normalised token that is one of a label's words decides. For
  two labels, a negation directly before it ("not true", "does not support"
  after normalisation "doesnt support") flips to the other label. Text equal to a
  label name (any case) maps to it directly.
  """
  words = {name: frozenset(ws) | {name.lower()} for name, ws in labels.items()}
  tokens = normalize_answer(text).split()
  for i, tok in enumerate(tokens):
    for name, ws in words.items():
      if tok in ws:
        if len(words) == 2 and i > 0 and tokens[i - 1] in _NEGATIONS:
          return next(n for n in words if n != name)
        return name
  return None


def label_accuracy(
  predictions: Sequence[str],
  golds: Sequence[str],
  labels: Mapping[str, Iterable[str]] = FEVER_LABELS,
) -> float:
  """Share of predictions whose ``normalize_label`` equals the gold label (unmapped: wrong)."""
  if len(predictions) != len(golds):
    raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold labels")
  if not golds:
    return math.nan
  hits = sum(normalize_label(p, labels) == g for p, g in zip(predictions, golds))
  return hits / len(golds)


def accuracy(predictions: Sequence[str], golds: Sequence[str | Iterable[str]]) -> float:
  """Share of predictions that exactly match (normalised) one of their gold answers.

  KILT's accuracy for entity linking and slot filling; NaN for no examples.
  """
  if len(predictions) != len(golds):
    raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
  if not golds:
    return math.nan
  return sum(exact_match(p, g) for p, g in zip(predictions, golds)) / len(golds)


def mean(values: Iterable[float]) -> float:
  """Arithmetic mean; NaN for no values (an empty split should not crash a report)."""
  values = list(values)
  return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------
# The paper's normalised score.


def normalized_scores(
  method: Mapping[str, float],
  oracle: Mapping[str, float],
  sizes: Mapping[str, int],
  families: Mapping[str, str],
) -> dict[str, float]:
  """The LAG paper's score relative to the oracle, per task family and on average.

  S_T = sum over datasets D in family T of (|D| / |T|) * f_D(method) / f_D(oracle),
  with |T| the total size of T's datasets; AVG = the unweighted mean of S_T over
  families. Scores are fractions (1.0 = the oracle); multiply by 100 for the
  paper's percentages.

  Args:
    method, oracle: dataset -> metric value (f_D) for the method and the oracle.
    sizes: dataset -> number of examples |D|.
    families: dataset -> task family T; defines which datasets enter.
  Returns:
    family -> S_T, plus "AVG". A family with a dataset where the oracle scores 0
    gets NaN (the ratio is undefined), and AVG is then NaN too.
  Raises:
    KeyError: if a dataset of ``families`` lacks a method, oracle or size entry.
  """
  by_family: dict[str, list[str]] = {}
  for dataset, family in families.items():
    by_family.setdefault(family, []).append(dataset)
  out: dict[str, float] = {}
  for family, datasets in by_family.items():
    total = sum(sizes[d] for d in datasets)
    score = 0.0
    for d in datasets:
      if oracle[d] == 0:
        score = math.nan
        break
      score += sizes[d] / total * method[d] / oracle[d]
    out[family] = score
  out["AVG"] = mean(out.values())
  return out
