"""lag_jax.eval.compare: runs merged side by side, labels, mismatched runs refused, and
the CLI writes its plot."""

import json

import pytest

from lag_jax.eval import compare


def report(methods, n=4, benchmark="synthetic"):
  rows = {
    m: {
      "raw": {"synthetic_qa": v},
      "by_dataset": {"synthetic_qa": {"n": n, "em": v}},
      "seconds": 1.0,
      "normalized": {"QA": v, "AVG": v},
      "routing_request_acc": v / 2,
    }
    for m, v in methods.items()
  }
  return {
    "benchmark": benchmark,
    "num_examples": n,
    "num_knowledge_adapters": 3,
    "num_task_adapters": 1,
    "methods": rows,
  }


def test_merge_labels_and_keeps_the_first_run():
  a = report({"Oracle": 1.0, "Vote": 0.5})
  b = report({"Oracle": 0.9, "Vote": 0.75})
  merged = compare.merge([(a, ""), (b, "[shared top:4]")])
  want = ["Oracle", "Vote", "Oracle [shared top:4]", "Vote [shared top:4]"]
  assert list(merged["methods"]) == want
  assert merged["methods"]["Vote [shared top:4]"]["normalized"]["AVG"] == 0.75
  same = compare.merge([(a, ""), (b, "")])
  assert same["methods"]["Vote"]["normalized"]["AVG"] == 0.5  # the first run's row
  with pytest.raises(ValueError, match="runs differ"):
    compare.merge([(a, ""), (report({"Vote": 1.0}, n=5), "x")])


def test_cli_writes_the_plot(tmp_path, capsys):
  for name, methods in (("a", {"Oracle": 1.0, "LAG": 0.4}), ("b", {"Vote": 0.9})):
    (tmp_path / f"{name}.json").write_text(json.dumps(report(methods)))
  out = tmp_path / "m.png"
  compare.main([f"--out={out}", str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:[top:4]"])
  assert out.stat().st_size > 1000
  table = capsys.readouterr().out
  assert "| Vote [top:4] |" in table and "| LAG |" in table
