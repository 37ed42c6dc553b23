"""The evaluate report (lag_jax/eval/report.py): the average over chosen families beside
the paper's AVG, and re-rendering a finished run from its results.json."""

import json
import math

import pytest

from lag_jax.eval import report as report_lib


def _row(qa, slot, fact, req=None):
  norm = {"QA": qa, "Slot": slot, "Fact": fact, "AVG": (qa + slot + fact) / 3}
  raw = {"qa": qa / 2, "slot": slot / 2, "fact": fact / 20}
  return {"normalized": norm, "raw": raw, "seconds": 1.0, "routing_request_acc": req}


def _report():
  return {
    "benchmark": "synthetic",
    "num_examples": 6,
    "num_knowledge_adapters": 4,
    "num_task_adapters": 3,
    "methods": {"Oracle": _row(1.0, 1.0, 1.0), "LAG": _row(0.5, 0.25, 9.0, 0.75)},
    "k_sweep": {"4": _row(0.5, 0.25, 9.0)},
    "knowledge_injection": {},
  }


def test_family_average():
  assert report_lib.family_average({"QA": 0.5, "Slot": 0.25, "Fact": 9.0}, ["QA", "Slot"]) == 0.375
  assert report_lib.family_average({"QA": 0.5}, ["QA", "Slot"]) is None
  assert report_lib.family_average({"QA": math.nan, "Slot": 1.0}, ["QA", "Slot"]) is None
  assert report_lib.family_average({"QA": 0.5}, []) is None


def test_rerender_adds_the_chosen_average(tmp_path):
  (tmp_path / "results.json").write_text(json.dumps(_report()))
  md = report_lib.main([f"--workdir={tmp_path}", "--avg_families=QA,Slot"])
  # Columns: QA, Slot, Fact, AVG, AVG (QA, Slot), then the raw datasets.
  assert "| AVG | AVG (QA, Slot) |" in md
  assert "| LAG | 50.0 | 25.0 | 900.0 | 325.0 | 37.5 |" in md
  assert "| 4 | 325.0 | 37.5 | n/a |" in md  # the k sweep too
  assert (tmp_path / "results.md").read_text() == md
  assert (tmp_path / "methods.png").exists()
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["avg_families"] == ["QA", "Slot"] and saved["methods"] == _report()["methods"]
  # Without the option the recorded families stay; the paper's table has no extra column.
  assert report_lib.rerender(str(tmp_path)) == md
  assert "AVG (QA" not in report_lib.markdown_table(_report())


def test_rerender_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="no results.json"):
    report_lib.rerender(str(tmp_path))
  (tmp_path / "results.json").write_text(json.dumps(_report()))
  with pytest.raises(ValueError, match="results.json: avg_families \\['Task'\\]"):
    report_lib.rerender(str(tmp_path), ["QA", "Task"])
  assert "avg_families" not in json.loads((tmp_path / "results.json").read_text())
