"""Evaluation: answer metrics and the paper's normalised score (the harness builds on these)."""

from __future__ import annotations

from lag_jax.eval.metrics import (
  FEVER_LABELS,
  QAScore,
  accuracy,
  answer_in_text,
  contains_all,
  exact_match,
  extract_answer,
  label_accuracy,
  mean,
  normalize_answer,
  normalize_label,
  normalized_scores,
  qa_score,
  token_f1,
)

__all__ = [
  "FEVER_LABELS",
  "QAScore",
  "accuracy",
  "answer_in_text",
  "contains_all",
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
