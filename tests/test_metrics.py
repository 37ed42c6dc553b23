"""lag_jax.eval.metrics against hand-worked cases."""

from __future__ import annotations

import math

import pytest

from lag_jax.eval.metrics import (
  accuracy,
  answer_in_text,
  contains_all,
  exact_match,
  extract_answer,
  label_accuracy,
  normalize_answer,
  normalize_label,
  normalized_scores,
  qa_score,
  token_f1,
)


@pytest.mark.parametrize(
  "text, expected",
  [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an Apple, a day!  ", "apple day"),
    ("Theater", "theater"),  # articles only as whole words
    ("1,234", "1234"),
    ("1,234,567 people", "1234567 people"),
    ("6.2", "6.2"),
    ("37.0", "37"),
    ("2.50.", "2.5"),
    ("Born in 1985.", "born in 1985"),
    ("J. D. Drew", "j d drew"),
    ("“Rosé” – the band", "rosé band"),
    ("don't", "dont"),
  ],
)
def test_normalize_answer(text, expected):
  assert normalize_answer(text) == expected


def test_exact_match():
  assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
  assert exact_match("Eiffel", "Eiffel Tower") == 0.0
  assert exact_match("Shakespeare", ["William Shakespeare", "Shakespeare"]) == 1.0
  assert exact_match("680,000", "680000") == 1.0
  assert exact_match("37", "37.0") == 1.0
  assert exact_match("6.2", "62") == 0.0  # SQuAD's rule would call these equal


def test_token_f1_hand_worked():
  # pred tokens {eiffel, tower, paris}; gold {eiffel, tower}: P = 2/3, R = 1, F1 = 0.8.
  assert token_f1("The Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
  # Max over golds: vs "Tower" P = 1/3, R = 1 -> 0.5; vs "Eiffel Tower" -> 0.8.
  assert token_f1("Eiffel Tower Paris", ["Tower", "Eiffel Tower"]) == pytest.approx(0.8)
  assert token_f1("Berlin", "Paris") == 0.0
  # Repeated tokens count with multiplicity: pred (a b b), gold (b b c): common 2 -> 2/3.
  assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)
  assert token_f1("", "") == 1.0 and token_f1("the", "Paris") == 0.0


def test_list_answers():
  elements = ["Steve Chen", "Chad Hurley", "Jawed Karim"]
  gold = ", ".join(elements)
  pred = "YouTube was founded by Chad Hurley, Steve Chen and Jawed Karim."
  assert contains_all(pred, elements) == 1.0
  assert contains_all("Chad Hurley and Steve Chen", elements) == 0.0
  score = qa_score(pred, gold, elements)
  assert score.em == 1.0 and score.contains == 1.0
  # F1 against the joined gold: gold tokens 6, pred tokens 11 (after dropping "."),
  # 6 in common -> P = 6/11, R = 1, F1 = 12/17.
  assert score.f1 == pytest.approx(12 / 17)
  partial = qa_score("Steve Chen", gold, elements)
  assert partial.em == 0.0 and partial.contains == 0.0
  with pytest.raises(ValueError):
    contains_all("x", [])


def test_qa_score_plain_answers():
  s = qa_score("The population is 680,000.", "680000")
  assert (s.em, s.contains) == (0.0, 1.0)
  assert s.f1 == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # P = 1/3, R = 1
  assert qa_score("yes", ("yes", "true")).em == 1.0
  assert answer_in_text("He was born in 1952 in Guport.", ["1952"]) == 1.0
  assert answer_in_text("He was born in 19520.", ["1952"]) == 0.0  # whole tokens only


@pytest.mark.parametrize(
  "generated, expected",
  [
    ("Paris", "Paris"),
    ("The answer is Paris.", "Paris"),
    ('Answer: "42"\nBecause ...', "42"),
    ("A: **Right-handed**", "Right-handed"),
    ("\n\n  Final answer: J. D. Drew.\n", "J. D. Drew"),
    ("So the answer is Beijing", "Beijing"),
    ("Answering is hard.", "Answering is hard"),
    ("A cat.", "A cat"),
    ("", ""),
  ],
)
def test_extract_answer(generated, expected):
  assert extract_answer(generated) == expected


@pytest.mark.parametrize(
  "text, label",
  [
    ("SUPPORTS", "SUPPORTS"),
    ("refutes", "REFUTES"),
    ("True. The claim is correct.", "SUPPORTS"),
    ("The claim is false.", "REFUTES"),
    ("This is not true.", "REFUTES"),
    ("The evidence does not support it", "REFUTES"),
    ("Yes", "SUPPORTS"),
    ("I cannot tell", None),
  ],
)
def test_normalize_label(text, label):
  assert normalize_label(text) == label


def test_accuracies():
  assert (
    label_accuracy(
      ["True", "no", "maybe", "SUPPORTS"], ["SUPPORTS", "REFUTES", "REFUTES", "REFUTES"]
    )
    == 0.5
  )
  assert accuracy(
    ["Paris", "the Berlin", "Rome"], ["Paris", ["Berlin"], "Madrid"]
  ) == pytest.approx(2 / 3)
  assert math.isnan(accuracy([], []))
  with pytest.raises(ValueError):
    accuracy(["a"], [])


def test_normalized_scores_hand_worked():
  # QA: NQ (300 examples) at 30/40, TQA (100) at 45/50 -> 0.75 * 0.75 + 0.25 * 0.9 = 0.7875.
  # Fact: FEVER alone at 80/90 -> 0.8889. AVG = (0.7875 + 0.8889) / 2.
  families = {"nq": "qa", "tqa": "qa", "fever": "fact"}
  sizes = {"nq": 300, "tqa": 100, "fever": 50}
  method = {"nq": 30.0, "tqa": 45.0, "fever": 80.0}
  oracle = {"nq": 40.0, "tqa": 50.0, "fever": 90.0}
  out = normalized_scores(method, oracle, sizes, families)
  assert out["qa"] == pytest.approx(0.7875)
  assert out["fact"] == pytest.approx(8 / 9)
  assert out["AVG"] == pytest.approx((0.7875 + 8 / 9) / 2)
  # The oracle itself scores exactly 1 everywhere; above-oracle methods exceed 1.
  assert normalized_scores(oracle, oracle, sizes, families) == pytest.approx(
    {"qa": 1.0, "fact": 1.0, "AVG": 1.0}
  )
  # An oracle at 0 makes the ratio undefined: NaN, not a crash.
  out = normalized_scores(method, {**oracle, "fever": 0.0}, sizes, families)
  assert math.isnan(out["fact"]) and math.isnan(out["AVG"]) and out["qa"] == pytest.approx(0.7875)
