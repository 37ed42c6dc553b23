"""Every config parses, its tiny variant runs end to end, and bad overrides fail clearly."""

import glob
import importlib.util
import json
import os

import ml_collections
import pytest
from cli import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_arg(path):
  return None if os.path.basename(path) == "tiny.py" else "tiny"


def test_there_are_configs():
  assert {
    "generate.py",
    "tiny.py",
    "build_library.py",
    "demo.py",
    "wiki_fanoutqa.py",
    "llama3_2_3b_kilt.py",
    "synthetic_scale.py",
    "n1000.py",
  } <= {os.path.basename(p) for p in CONFIGS}


def _check_outputs(job, workdir):
  """What each job must leave in its workdir."""
  if job == "generate":
    results = json.loads((workdir / "generations.json").read_text())
    assert len(results) == 2 and all(r["num_tokens"] > 0 for r in results)
  elif job == "build_library":
    meta = json.loads((workdir / "library" / "library.json").read_text())
    assert len(meta["names"]) == 8
  elif job == "evaluate":
    report = json.loads((workdir / "results.json").read_text())
    assert {"Instr", "Oracle", "Arrow", "RAG", "PRAG", "P-LAG", "R-LAG"} <= set(report["methods"])
    assert (workdir / "results.md").exists() and (workdir / "score_vs_k.png").exists()
    assert (workdir / "methods.png").exists()
  elif job == "routing_scale":
    report = json.loads((workdir / "scale.json").read_text())
    assert report["sizes"] == [3, 6]
    rows = report["routers"]
    want = {"LAG", "Vote", "ReqLAG", "LAG [shared top:1]", "Vote [shared top:1]", "Vote (k=1)"}
    assert set(rows) == want
    assert set(rows["Vote (k=1)"]) == {"6"}  # the k sweep runs at its sizes only
    for label, row in rows.items():
      for n in ("3", "6") if label != "Vote (k=1)" else ("6",):
        assert 0.0 <= row[n]["request_acc"] <= 1.0 and row[n]["requests"] > 0
    assert (workdir / "scale.md").exists() and (workdir / "scale.png").exists()
    assert (workdir / "scale_k.png").exists()
    analysis = json.loads((workdir / "analysis.json").read_text())
    a = analysis["sizes"]["6"]
    assert sum(a["gold_rank"].values()) == a["requests"] > 0
    assert (workdir / "analysis.md").exists() and (workdir / "analysis_6.png").exists()
  else:
    raise AssertionError(f"no output check for job {job!r}")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses(path):
  module = _load(path)
  for arg in (None, _tiny_arg(path), *getattr(module, "VARIANTS", ())):
    config = module.get_config(arg)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.job


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_tiny_variant_runs(tmp_path, path):
  arg = _tiny_arg(path)
  spec = os.path.relpath(path, ROOT) + (f":{arg}" if arg else "")
  proc = run_cli(f"--config={spec}", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = _load(path).get_config(arg)
  _check_outputs(config.job, tmp_path)
  if config.job == "evaluate" and config.get("extra_methods"):
    # The data-free router the demo shows beside the paper's methods.
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(config.extra_methods.split(",")) <= set(report["methods"])


def test_routing_scale_measures_a_library_as_it_stands(tmp_path):
  """build=False measures the saved library without training, refuses a library of
  another world, and a rerun keeps the sizes already measured."""
  base = ["--config=configs/synthetic_scale.py:tiny", f"--workdir={tmp_path}"]
  proc = run_cli(*base, "--config.sizes=3", "--config.k_sweep_sizes=")
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = json.loads((tmp_path / "scale.json").read_text())
  assert first["sizes"] == [3]
  # The arrow index against exact LAG (index_sizes 6, probes 1 and 64): probing every
  # cluster decides every token as the exact filter does.
  index = json.loads((tmp_path / "index_effect.json").read_text())["sizes"]["6"]
  assert set(index["rows"]) == {"exact", "probe 1", "probe 64", "sketch 1:20"}
  # The arrow sketch with a pool beyond the library rescores every adapter: exact.
  assert index["rows"]["sketch 1:20"]["recall"] == index["rows"]["sketch 1:20"]["top1"] == 1.0
  assert index["rows"]["sketch 1:20"]["agreement"]["all"] == 1.0
  assert index["rows"]["probe 64"]["agreement"]["all"] == 1.0
  assert index["rows"]["probe 64"]["recall"] == index["rows"]["probe 64"]["top1"] == 1.0
  assert index["rows"]["probe 1"]["recall"] < 1.0  # 1 of 6 clusters misses some
  assert 0 <= index["rows"]["probe 1"]["agreement"]["entity"] <= 1
  assert "decisions = exact LAG" in (tmp_path / "index_effect.md").read_text()
  proc = run_cli(*base, "--config.build=False", "--config.sizes=3,6", "--config.k_sweep_sizes=")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Keeping" in proc.stderr
  second = json.loads((tmp_path / "scale.json").read_text())
  assert second["sizes"] == [3, 6]
  for label, row in first["routers"].items():
    assert second["routers"][label]["3"] == row["3"]
  proc = run_cli(*base, "--config.build=False", "--config.synthetic.seed=1")
  assert proc.returncode != 0 and "first 6 people" in proc.stderr


@pytest.mark.real_assets
def test_routing_scale_recall_only_with_a_calibrated_sketch(tmp_path):
  """index_decisions=False measures recall alone (no LAG run through any filter); a
  DIMS:POOL:cal sketch is calibrated on the generic prompts (real FanOutQA questions and
  Wikipedia sentences) and labelled apart; a bad spec is an error naming the field."""
  base = ["--config=configs/synthetic_scale.py:tiny", f"--workdir={tmp_path}"]
  common = [*base, "--config.sizes=3", "--config.k_sweep_sizes=", "--config.analysis_sizes="]
  proc = run_cli(
    *common,
    "--config.index_probes=64",
    "--config.index_sketches=1:20,1:3:cal,2:20:cal",
    "--config.index_k=2",
    "--config.index_decisions=False",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "input moments: 225 sequences" in proc.stderr
  index = json.loads((tmp_path / "index_effect.json").read_text())["sizes"]["6"]
  rows = index["rows"]
  assert set(rows) == {"exact", "probe 64", "sketch 1:20", "sketch 1:3 cal", "sketch 2:20 cal"}
  assert not any("request_acc" in r or "agreement" in r for r in rows.values())
  # A pool beyond the library rescores every adapter, calibrated or not: exact.
  assert rows["sketch 1:20"]["recall"] == rows["sketch 2:20 cal"]["recall"] == 1.0
  assert 0 < rows["sketch 1:3 cal"]["recall"] <= 1.0
  assert "| sketch 1:3 cal |" in (tmp_path / "index_effect.md").read_text()
  assert json.loads((tmp_path / "index_effect.json").read_text())["sketch_ridge"] == 10.0
  bad = run_cli(*common, "--config.index_sketches=2:20:fast", "--config.index_decisions=False")
  assert bad.returncode != 0 and "'2:20:fast' is not DIMS:POOL[:cal]" in bad.stderr
  bad = run_cli(*common, "--config.sketch_ridge=0.0", "--config.index_decisions=False")
  assert bad.returncode != 0 and "config field 'sketch_ridge'=0.0" in bad.stderr


@pytest.mark.real_assets
def test_evaluate_through_a_calibrated_sketch(tmp_path):
  """sketch_calibration=generic: the LAG+sketch method reads a sketch calibrated on the
  generic prompts, recorded in results.json; its run is keyed apart from the plain
  sketch's (a plain run in the same workdir does not reuse it)."""
  method = "LAG+sketch(k=2;pool=3;sketch=1)"
  base = ["--config=configs/demo.py:tiny", f"--workdir={tmp_path}", "--config.k_sweep="]
  proc = run_cli(*base, f"--config.methods=Oracle,{method}", "--config.sketch_calibration=generic")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "input moments: 225 sequences" in proc.stderr
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["sketch_calibration"] == "generic"
  assert method in report["methods"]
  plain = run_cli(*base, f"--config.methods=Oracle,{method}")
  assert plain.returncode == 0, plain.stderr[-3000:]
  assert "input moments" not in plain.stderr
  kept = json.loads((tmp_path / "results.json").read_text())["method_runs"]
  assert kept[method]["reused"] is False and kept["Oracle"]["reused"] is True
  assert "sketch_calibration" not in json.loads((tmp_path / "results.json").read_text())


def test_bad_sketch_calibration_is_an_error_before_any_work(tmp_path):
  proc = run_cli(
    "--config=configs/demo.py:tiny", "--config.sketch_calibration=mine", f"--workdir={tmp_path}"
  )
  assert proc.returncode != 0
  assert "config field 'sketch_calibration'='mine'" in proc.stderr
  assert os.listdir(tmp_path) == []
  proc = run_cli(
    "--config=configs/demo.py:tiny", "--config.sketch_ridge=-1.0", f"--workdir={tmp_path}"
  )
  assert proc.returncode != 0 and "config field 'sketch_ridge'=-1.0" in proc.stderr
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shared", ["none", "top:2"])
def test_generate_with_routed_libraries(tmp_path, shared):
  # The CLI: answer prompts with a knowledge and a task library, LAG k = 3
  # (and with two shared directions removed from the knowledge library's routing).
  proc = run_cli(
    "--config=configs/generate.py:tiny_lag",
    "--config.router=lag",
    "--config.k=3",
    f"--config.shared_removal={shared}",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  _check_outputs("generate", tmp_path)
  import numpy as np

  routing = np.load(tmp_path / "routing.npz")
  ids = routing["lib0/gate_proj"]  # [prompts, L, positions]
  assert ids.shape[:2] == (2, 2)
  assert ((ids >= 0) & (ids < 8)).any()  # some tokens routed to knowledge adapters
  assert routing["lib1/q_proj"].max() < 3  # task library: 3 adapters


def test_unknown_config_key_is_an_error(tmp_path):
  proc = run_cli(
    "--config=configs/tiny.py", "--config.generation.max_new_tokenz=3", f"--workdir={tmp_path}"
  )
  assert proc.returncode != 0
  assert "max_new_tokenz" in proc.stderr
  assert not (tmp_path / "generations.json").exists()


@pytest.mark.parametrize("config", ["generate.py:tiny_lag", "demo.py:tiny"])
def test_bad_shared_removal_is_an_error_before_any_work(tmp_path, config):
  proc = run_cli(
    f"--config=configs/{config}", "--config.shared_removal=median:1", f"--workdir={tmp_path}"
  )
  assert proc.returncode != 0
  assert "shared_removal 'median:1'" in proc.stderr
  assert os.listdir(tmp_path) == []


def test_override_changes_therun_cli(tmp_path):
  proc = run_cli(
    "--config=configs/tiny.py",
    "--config.generation.max_new_tokens=3",
    "--config.prompts=('one prompt',)",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "generations.json").read_text())
  assert [r["prompt"] for r in results] == ["one prompt"]
  assert all(r["num_tokens"] <= 3 for r in results)


def test_prompt_longer_than_context_is_an_error(tmp_path):
  proc = run_cli(
    "--config=configs/tiny.py",
    "--config.chat_template=False",
    "--config.prompts=('" + "x" * 600 + "',)",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode != 0
  assert "512" in proc.stderr  # the tiny model's context length is named


def test_build_once_then_evaluate_nested_libraries(tmp_path):
  """build_only trains the libraries and stops; a run with library_size evaluates the
  first N adapters of that build (nothing retrained) on questions about those N."""
  base = ["--config=configs/n1000.py:tiny", f"--workdir={tmp_path}"]
  proc = run_cli(*base, "--config.build_only=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  built = json.loads((tmp_path / "build.json").read_text())
  assert built["num_knowledge_adapters"] == 6 and not (tmp_path / "results.json").exists()
  proc = run_cli(
    *base,
    "--config.synthetic.library_size=3",
    "--config.synthetic.questions_per_task=0",
    "--config.methods=Oracle,Vote(k=2),Vote-final2(k=2;score=score)",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "all 6 adapters are built and current" in proc.stdout
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["num_knowledge_adapters"] == 3
  # Every question on the first 3 people, tuning half: 3 tasks x (2 of 3) questions.
  assert report["num_examples"] == 6
  # configs/n1000.py: the average of QA and slot filling beside the paper's AVG.
  assert report["avg_families"] == ["QA", "Slot"]
  assert "| AVG | AVG (QA, Slot) |" in (tmp_path / "results.md").read_text()
  bad = run_cli(*base, "--config.synthetic.library_size=3", "--config.avg_families=QA,Task")
  assert bad.returncode != 0 and "config field 'avg_families': ['Task']" in bad.stderr
  # Each finished method was kept: the same run again reuses them (an interrupted
  # evaluation resumes), and a kept run that cannot be read back is run again.
  runs = sorted((tmp_path / "method_runs").glob("*.json"))
  assert len(runs) == 4  # Oracle, the two votes and the k sweep's LAG(k=1)
  # A two-round vote (both libraries: knowledge and task) runs three prefills.
  assert report["methods"]["Vote-final2(k=2;score=score)"]["timing"]["prefill_passes"] == 3
  runs[0].write_text(runs[0].read_text()[:100])  # truncated
  proc = run_cli(
    *base,
    "--config.synthetic.library_size=3",
    "--config.synthetic.questions_per_task=0",
    "--config.methods=Oracle,Vote(k=2),Vote-final2(k=2;score=score)",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("reusing the finished run") == 3, proc.stderr[-3000:]
  assert proc.stderr.count("not a finished run of") == 1, proc.stderr[-3000:]
  again = json.loads((tmp_path / "results.json").read_text())
  assert sum(r["reused"] for r in again["method_runs"].values()) == 3
  assert not any(r["reused"] for r in report["method_runs"].values())
  assert again["predictions"] == report["predictions"]

  def table(r):  # the scores and routing, not the timings
    return json.dumps(
      {
        m: {k: v for k, v in row.items() if k not in ("seconds", "timing", "decode_ms_per_step")}
        for m, row in r["methods"].items()
      },
      sort_keys=True,
    )

  assert table(again) == table(report)
  # The index settings key only the methods that read the index: adding a LAG+index
  # method reruns nothing else.
  proc = run_cli(
    *base,
    "--config.synthetic.library_size=3",
    "--config.synthetic.questions_per_task=0",
    "--config.methods=Oracle,Vote(k=2),LAG+index(k=2;probe=1)",
    "--config.k_sweep=",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads((tmp_path / "results.json").read_text())["method_runs"]
  assert {m for m, r in runs.items() if r["reused"]} == {"Oracle", "Vote(k=2)"}, runs
  proc = run_cli(*base, "--config.synthetic.library_size=7")
  assert proc.returncode != 0 and "synthetic.library_size" in proc.stderr
