"""The curve over N (lag_jax/eval/curve.py) from evaluate workdirs."""

import json

import pytest

from lag_jax.eval import curve


def _report(n, avg, req):
  return {
    "num_knowledge_adapters": n,
    "methods": {
      "Oracle": {"normalized": {"AVG": 1.0}},
      "Vote(k=4)": {"normalized": {"AVG": avg}, "routing_request_acc": req},
    },
  }


def test_curve_from_workdirs(tmp_path):
  for n, avg, req in ((16, 1.0, 1.0), (64, 0.9, 0.95)):
    d = tmp_path / f"n{n}"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(_report(n, avg, req)))
  out = tmp_path / "curve"
  got = curve.main([f"--run=16:{tmp_path / 'n16'}", f"--run=64:{tmp_path / 'n64'}", f"--out={out}"])
  assert got["Vote(k=4)"][64] == {"avg": 0.9, "request_acc": 0.95, "entity_acc": None}
  md = (out / "curve.md").read_text()
  assert "| Vote(k=4) | 100.0 | 90.0 | 100.0 | 95.0 |" in md
  assert (out / "curve.png").exists() and json.loads((out / "curve.json").read_text())["sizes"] == [
    16,
    64,
  ]
  with pytest.raises(ValueError, match="N = 64 evaluated 16"):
    curve.collect({64: _report(16, 1.0, 1.0)})
  with pytest.raises(SystemExit, match="results.json"):
    curve.main([f"--run=8:{tmp_path / 'none'}", f"--out={out}"])


def _report3(n, qa, slot, fact, avg_families=None):
  norm = {"QA": qa, "Slot": slot, "Fact": fact}
  row = {"normalized": {**norm, "AVG": (qa + slot + fact) / 3}, "routing_request_acc": 0.5}
  rep = {"num_knowledge_adapters": n, "methods": {"LAG": row}}
  if avg_families:
    rep["avg_families"] = avg_families
  return rep


def test_curve_scores_by_chosen_families(tmp_path):
  # Fact's 8.0 (an oracle below a constant answer) would swamp the paper's AVG.
  for n in (16, 64):
    d = tmp_path / f"n{n}"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(_report3(n, 0.5, 0.7, 8.0, ["QA", "Slot"])))
  runs = [f"--run=16:{tmp_path / 'n16'}", f"--run=64:{tmp_path / 'n64'}"]
  got = curve.main(runs + [f"--out={tmp_path / 'a'}"])  # the runs' own avg_families
  assert got["LAG"][16]["avg"] == pytest.approx(0.6)
  md = (tmp_path / "a" / "curve.md").read_text()
  assert "AVG (QA, Slot) N=16" in md and "| LAG | 60.0 | 60.0 | 50.0 | 50.0 |" in md
  got = curve.main(runs + [f"--out={tmp_path / 'b'}", "--avg_families="])  # the paper's AVG
  assert got["LAG"][64]["avg"] == pytest.approx((0.5 + 0.7 + 8.0) / 3)
  with pytest.raises(ValueError, match="N = 16.*'Task'"):
    curve.main(runs + [f"--out={tmp_path / 'c'}", "--avg_families=QA,Task"])


def test_curve_plots_chosen_methods(tmp_path):
  d = tmp_path / "n16"
  d.mkdir()
  (d / "results.json").write_text(json.dumps(_report(16, 1.0, 1.0)))
  base = [f"--run=16:{d}", f"--out={tmp_path / 'out'}"]
  curve.main(base + ["--plot_methods=Vote(k=4)"])
  assert (tmp_path / "out" / "curve.png").exists()
  with pytest.raises(SystemExit, match=r"\['LAG'\] are in none of the runs"):
    curve.main(base + ["--plot_methods=Vote(k=4),LAG"])
