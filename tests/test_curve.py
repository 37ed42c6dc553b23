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
