"""How much of a page a knowledge adapter carries: oracle vs ceiling vs floor, per dataset.

Three runs on the same questions, scored per question with the dataset's primary
metric (0/1 for EM and accuracy):

  floor    "Task only": the right task adapter, no knowledge adapter, no page.
  oracle   "Oracle": the gold knowledge adapter and the right task adapter, no page.
  ceiling  "Page+Task": the gold page in the prompt and the right task adapter: the
           same model reading what the adapter was trained on.

``recovered`` = oracle / ceiling (the share of the in-context ceiling the adapter
recovers; a bootstrap 95% interval over questions), and the paired gain over the
floor with its 95% interval and McNemar's exact p-value: the gain is more than the
binomial noise of the question count when the interval excludes 0.
``questions_needed`` is how many questions that takes at the measured rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

FLOOR, ORACLE, CEILING = "Task only", "Oracle", "Page+Task"
_Z = 1.959964  # two-sided 95%


def mcnemar_p(a: Sequence[float], b: Sequence[float]) -> float:
  """Exact two-sided McNemar p-value of paired 0/1 outcomes (binomial on discordant pairs)."""
  a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
  wins, losses = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = wins + losses
  if n == 0:
    return 1.0
  k = min(wins, losses)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
  return min(1.0, 2 * tail)


def paired_gain(a: Sequence[float], b: Sequence[float]) -> dict:
  """mean(a) - mean(b) over the same questions, a 95% normal interval of it, McNemar's
  p, and the question count at which the interval's half-width equals the gain."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = len(a)
  d = a - b
  gain = float(d.mean()) if n else 0.0
  sd = float(d.std(ddof=1)) if n > 1 else 0.0
  half = _Z * sd / math.sqrt(n) if n else math.inf
  needed = _questions_needed(a, b) if gain > 0 else None
  return {
    "gain": gain,
    "ci95": [gain - half, gain + half],
    "beyond_noise": bool(n > 1 and gain - half > 0),
    "mcnemar_p": mcnemar_p(a, b),
    "questions_needed": needed,
  }


def _questions_needed(a: np.ndarray, b: np.ndarray, limit: int = 100_000) -> int | None:
  """The fewest questions at which a gain with these rates of a-only and b-only wins
  is significant at 5% by both the paired normal interval and McNemar's exact test."""
  a, b = a > 0.5, b > 0.5
  win, loss = float(np.mean(a & ~b)), float(np.mean(~a & b))
  gain, var = win - loss, win + loss - (win - loss) ** 2
  n = 2
  while n <= limit:
    wins, losses = round(win * n), round(loss * n)
    normal = _Z * math.sqrt(var / n) < gain
    if normal and mcnemar_p([1] * wins + [0] * losses, [0] * wins + [1] * losses) < 0.05:
      return n
    n = n + 1 if n < 1000 else int(n * 1.05)
  return None


def ratio_interval(
  a: Sequence[float], c: Sequence[float], resamples: int = 2000, seed: int = 0
) -> list[float] | None:
  """Bootstrap 95% interval of mean(a) / mean(c) over questions (None if c is all 0)."""
  a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
  if not len(a) or c.sum() == 0:
    return None
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(a), size=(resamples, len(a)))
  num, den = a[idx].mean(axis=1), c[idx].mean(axis=1)
  ratios = num[den > 0] / den[den > 0]
  return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def knowledge_injection(
  per_question: Mapping[str, Mapping[str, Sequence[float]]], goal: float = 0.8
) -> dict:
  """Per dataset: floor, oracle, ceiling, recovered (with interval), gain over the floor.

  Args:
    per_question: method -> dataset -> per-question primary metric, with the methods
      FLOOR, ORACLE and CEILING on the same questions in the same order.
    goal: the share of the ceiling the oracle should recover.
  Returns:
    dataset -> dict (empty when a method is missing).
  """
  if not all(m in per_question for m in (FLOOR, ORACLE, CEILING)):
    return {}
  out = {}
  for dataset, oracle in per_question[ORACLE].items():
    floor, ceiling = per_question[FLOOR][dataset], per_question[CEILING][dataset]
    o, f, c = (float(np.mean(x)) if len(x) else 0.0 for x in (oracle, floor, ceiling))
    out[dataset] = {
      "n": len(oracle),
      "floor": f,
      "oracle": o,
      "ceiling": c,
      "recovered": o / c if c > 0 else None,
      "recovered_ci95": ratio_interval(oracle, ceiling),
      "goal": goal,
      "meets_goal": bool(c > 0 and o / c >= goal),
      "over_floor": paired_gain(oracle, floor),
    }
  return out


def markdown(table: Mapping[str, dict]) -> str:
  """The injection table as markdown (percentages)."""
  if not table:
    return ""
  lines = [
    "| dataset | n | floor (Task only) | oracle | ceiling (Page+Task) | oracle / ceiling "
    "(95% CI) | oracle - floor (95% CI) | McNemar p | questions for noise |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for d, r in table.items():
    rec = "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
    if r["recovered_ci95"]:
      lo, hi = r["recovered_ci95"]
      rec += f" ({100 * lo:.0f}-{100 * hi:.0f})"
    g = r["over_floor"]
    lo, hi = g["ci95"]
    lines.append(
      f"| {d} | {r['n']} | {100 * r['floor']:.1f} | {100 * r['oracle']:.1f} | "
      f"{100 * r['ceiling']:.1f} | {rec} | {100 * g['gain']:+.1f} ({100 * lo:+.1f} to "
      f"{100 * hi:+.1f}) | {g['mcnemar_p']:.2g} | {g['questions_needed'] or '-'} |"
    )
  return "\n".join(lines) + "\n"
