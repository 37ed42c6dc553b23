"""The benchmarks stay runnable: every module imports, and the routing report renders
from the committed JSON exactly as BENCHMARKS.md holds it (the report step is separate
from measuring)."""

from __future__ import annotations

import importlib
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
MODULES = sorted(
  f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"
) + sorted(f"benchmarks.routing.{p.stem}" for p in (ROOT / "benchmarks" / "routing").glob("*.py"))


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_modules_import(name):
  importlib.import_module(name)


def test_routing_report_renders_from_json(tmp_path):
  from benchmarks.routing.__main__ import main

  json_path = tmp_path / "routing.json"
  json_path.write_text((ROOT / "benchmarks" / "results" / "routing.json").read_text())
  md = tmp_path / "BENCHMARKS.md"
  main(["--render", f"--json={json_path}", f"--markdown={md}", "--plot="])
  text = md.read_text()
  section = text[text.index("<!-- routing:begin -->") : text.index("<!-- routing:end -->")]
  committed = (ROOT / "BENCHMARKS.md").read_text()
  want = committed[
    committed.index("<!-- routing:begin -->") : committed.index("<!-- routing:end -->")
  ]
  assert section == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_report_renders_from_json(dtype):
  """The committed generate JSON renders to BENCHMARKS.md's section; the bfloat16 note
  follows the host's matrix units (none: software bfloat16 on both sides)."""
  from benchmarks.generate import markdown, markers

  name = "generate.json" if dtype == "float32" else f"generate_{dtype}.json"
  res = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
  begin, end = markers(dtype)
  committed = (ROOT / "BENCHMARKS.md").read_text()
  want = committed[committed.index(begin) : committed.index(end) + len(end)]
  assert markdown(res).strip() == want.strip()
  if dtype == "bfloat16":
    assert "torch's oneDNN matmuls use them" in markdown({**res, "bf16_units": ["amx_bf16"]})
    assert "no AMX, no AVX512-BF16" in markdown({**res, "bf16_units": []})


def test_routing_report_merges_remeasured_rows(tmp_path):
  """--merge_from replaces the rows of the same (shape, B, N), keeps the others, and the
  report names the command that re-measured them."""
  import json

  from benchmarks.routing.__main__ import main

  results = json.loads((ROOT / "benchmarks" / "results" / "routing.json").read_text())
  first = results["decode"][0]
  new_row = json.loads(json.dumps(first))
  new_row["variants"]["lag"]["ratio"] = 123.0
  extra = {**json.loads(json.dumps(first)), "n": 77}
  json_path, new_path = tmp_path / "routing.json", tmp_path / "new.json"
  json_path.write_text(json.dumps(results))
  new_path.write_text(
    json.dumps(
      {
        "command": "python -m benchmarks.routing --x",
        "machine": results["machine"],
        "decode": [new_row, extra],
      }
    )
  )
  md = tmp_path / "B.md"
  main(
    ["--render", f"--json={json_path}", f"--merge_from={new_path}", f"--markdown={md}", "--plot="]
  )
  merged = json.loads(json_path.read_text())
  assert len(merged["decode"]) == len(results["decode"]) + 1
  assert merged["decode"][0]["variants"]["lag"]["ratio"] == 123.0
  assert merged["decode"][1:-1] == results["decode"][1:] and merged["decode"][-1]["n"] == 77
  assert "python -m benchmarks.routing --x" in md.read_text() and "123.00" in md.read_text()
  with pytest.raises(SystemExit, match="no decode / profile rows"):
    new_path.write_text(json.dumps({"command": "x", "machine": results["machine"]}))
    main(["--render", f"--json={json_path}", f"--merge_from={new_path}", "--markdown=", "--plot="])


def test_accelerator_check_smoke(tmp_path):
  """The accelerator check's code runs end to end at tiny sizes on CPU, so that the
  one-command check is ready whenever a GPU or TPU is lent."""
  from benchmarks.accelerator import main

  out = tmp_path / "accelerator.json"
  r = main(["--smoke", f"--json={out}"])
  assert out.exists() and r["smoke"] and "tests" not in r
  assert {(x["shape"], x["batch"]) for x in r["base"]} == {
    (s, b) for s in ("smollm2", "llama3b") for b in (1, 2)
  }
  assert all(x["decode_tokens_per_s"] > 0 and x["prefill_tokens_per_s"] > 0 for x in r["base"])
  assert [x["n"] for x in r["cost"]] == [8] and r["cost"][0]["lag"]["ratio"] > 0
  assert r["projection"][0]["fastest"] in ("gather", "dense", "grouped")
  assert [(x["n"], x["batch"], x["auto"]) for x in r["index"]] == [
    (200, 1, "loop"),
    (200, 2, "loop"),
  ]
  assert all(x["ms"]["gather"] > 0 and x["ms"]["loop"] > 0 for x in r["index"])


def test_load_monitor_sees_other_processes_and_not_its_own():
  """A process busy beside the measurement shows as foreign CPU; the measurement's own
  work does not; a loaded table is marked, and refused with require_quiet."""
  import subprocess
  import sys
  import time

  from benchmarks.common import LoadMonitor, load_sentence, refuse_if_loaded

  with LoadMonitor() as own:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:
      pass
  spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
  try:
    time.sleep(0.3)  # past its start-up
    with LoadMonitor() as other:
      time.sleep(1.0)
  finally:
    spinner.kill()
    spinner.wait()
  # One busy core of os.cpu_count(): about 1 / cpus of the machine.
  assert other.foreign_share > 0.5 / os.cpu_count()
  assert own.foreign_share < other.foreign_share
  s = other.summary()
  loaded = dict(s, quiet=False)
  assert "Not a quiet machine" in load_sentence(loaded)
  assert "(quiet)" in load_sentence(dict(s, quiet=True))
  with pytest.raises(SystemExit, match="not a quiet machine"):
    refuse_if_loaded(loaded, True, "bench")
  refuse_if_loaded(loaded, False, "bench")  # marked, not refused


def test_arrow_index_benchmark_runs_small():
  from benchmarks.arrow_index import main

  r = main(["--ns=120", "--probes=64", "--dtypes=float32", "--reps=1", "--tokens=8", "--no-write"])
  (row,) = r["rows"][:1]
  assert [e["spill"] for e in row["index"]] == [1, 2]
  for e in row["index"]:  # every cluster probed: the exact top-k
    assert e["clusters"] == 38 <= e["probe"] and e["recall"] == e["recall_strong"] == 1.0


def test_offload_benchmark_runs_small_with_the_arrow_index_and_sketch(tmp_path):
  """benchmarks.offload at toy sizes: every variant, the arrow index's and the arrow
  sketch's included, gets a row, and the report renders."""
  from benchmarks import offload

  out = tmp_path / "out"
  offload.main(
    [
      "--n=400",
      "--resident_n=200",
      "--batches=1",
      "--steps=1",
      "--rounds=1",
      "--no_disk_regime",
      "--index_probe=2",
      "--sketch=8:40",
      "--slots=256",
      "--b_slots=64",
      f"--folder={tmp_path / 'lib'}",
      f"--json={out / 'o.json'}",
      f"--markdown={out / 'o.md'}",
      f"--plot={out / 'o.png'}",
    ]
  )
  res = json.loads((out / "o.json").read_text())
  (b,) = res["batches"]
  got = {(r["variant"], r["regime"]) for r in b["rows"]}
  for v in ("offloaded_index", "offloaded_sketch", "offloaded"):
    assert {(v, "hit"), (v, "miss")} <= got
  assert b["check"]["ids_equal"] and res["index"]["probe"] == 2
  assert (res["sketch"]["dims"], res["sketch"]["pool"]) == (8, 40)
  md = (out / "o.md").read_text()
  assert "arrow index" in md and "arrow sketch" in md and (out / "o.png").stat().st_size > 0


def test_arrow_sketch_benchmark_runs_small(tmp_path):
  from benchmarks.arrow_sketch import main

  out = tmp_path / "sketch.json"
  r = main(["--ns=200,400", "--sketches=4:20", "--reps=1", f"--json={out}"])
  assert [row["n"] for row in r["rows"]] == [200, 400]
  assert all(row["exact_ms"] > 0 and row["4:20"] > 0 for row in r["rows"])
  assert json.loads(out.read_text())["rows"] == r["rows"]


def test_sketch_step_benchmark_runs_small(tmp_path):
  """Every case timed at every batch, ratios against the reference size's exact step."""
  from benchmarks.sketch_step import main

  out = tmp_path / "step.json"
  r = main(
    [
      "--n=600",
      "--reference_n=100",
      "--sketches=4:40,4:400",
      "--batches=1,2",
      "--rounds=1",
      "--steps=1",
      f"--json={out}",
    ]
  )
  cases = ["base", "N = 100 exact", "N = 600 exact", "N = 600 sketch 4:40"]
  # 4:400 at B = 2: the two pools would hold 800 >= 600 adapters, skipped
  assert [(row["batch"], row["case"]) for row in r["rows"]] == [
    *((1, c) for c in [*cases, "N = 600 sketch 4:400"]),
    *((2, c) for c in cases),
  ]
  assert all(row["ms"] > 0 for row in r["rows"])
  ref = [row for row in r["rows"] if row["case"] == "N = 100 exact"]
  assert all(row["vs_reference"] == 1.0 for row in ref)
  assert 0 < r["rows"][3]["filter_read_share"] < 1
  assert "| 2 | N = 600 sketch 4:40 |" in r["markdown"]
  assert json.loads(out.read_text())["rows"] == r["rows"]


def test_sketch_recall_pieces_against_the_sketch_itself():
  """benchmarks.sketch_recall's dense scores are the sketch's (build_sketch, plain and
  calibrated); exact scores as the approximation find everything; P99 interpolates."""
  import numpy as np

  from benchmarks.sketch_recall import p99, recall_at_pools, sketch_scores
  from lag_jax.routing import arrow_sketch as sk

  rng = np.random.default_rng(0)
  a = rng.standard_normal((12, 50))
  x = rng.standard_normal((30, 12))
  g = rng.standard_normal((12, 12))
  for moment in (None, g @ g.T):
    s = sk.build_sketch(a, 4, rows_dtype=None, moment=moment)
    want = np.abs(x @ (np.asarray(s.basis, np.float64) @ np.asarray(s.sketch, np.float64)))
    np.testing.assert_allclose(sketch_scores(a, x, 4, moment), want, rtol=1e-3, atol=1e-4)
  exact = np.abs(x @ a)
  assert recall_at_pools(exact, exact, 5, [6, 10, 60]) == {6: 1.0, 10: 1.0}
  assert 0 < recall_at_pools(exact, sketch_scores(a, x, 1), 5, [6])[6] < 1
  assert p99({40: 0.98, 80: 1.0}) == pytest.approx(40 * 2**0.5)
  from benchmarks.sketch_recall import quantized

  for d, tol in (("bfloat16", 2**-8), ("int8", 0.5 / 127)):
    q = quantized(a, d)
    err = np.abs(q - a) / np.abs(a).max(axis=0)
    assert 0 < err.max() <= tol * 1.01, d
  assert p99({40: 0.995}) == 40 and p99({40: 0.9, 80: 0.95}) is None
