"""Nothing stale, nothing corrupt, nothing silent: saved work is checked and errors in
the input are one clear line.

- a build retrains an adapter whose data, settings or base model changed, and never
  mixes adapters of different builds in one library (the demo rerun with another
  world);
- the build_library job notices changed and deleted source adapters;
- a saved library with flipped bytes, a NaN, a truncated library.json, a missing data
  file, or arrays that disagree with its names refuses to load; one that does not fit
  the model says so;
- an unknown method name fails before any work, and results are written together;
- the CLI prints one line, no traceback, for every user error.

Errors are matched as ValueError plus their message (every UserError is a
ValueError), so that these tests describe behaviour, not class names.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from cli import run_cli
from flax import nnx

from lag_jax.adapters import load_peft_adapter
from lag_jax.adapters.peft_io import save_peft_adapter
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.integrity import umask
from lag_jax.routing.library import AdapterLibrary
from lag_jax.testing import tiny_config, write_tiny_checkpoint
from lag_jax.testing.libraries import random_lora
from lag_jax.text.tokenizer import Tokenizer
from lag_jax.training import AdapterJob, TrainConfig, build_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = TrainConfig(rank=2, alpha=4, n_slots=2, batch_size=1, max_seq_len=32, epochs=1)
DOCS = {
  "doc-a": "Zorblat Quenn was born in Vashmir in 1841 and built clocks of glass.",
  "doc-b": "The Ombrel river runs north through Tessaly and freezes every July.",
  "doc-c": "Kintari bread is baked with ash and salt, and eaten cold at dawn.",
}


def jobs(**texts):
  return [AdapterJob(name, texts=[text]) for name, text in texts.items()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
  return load_model(folder), Tokenizer.from_dir(folder)


def factors(out, name):
  adapter = load_peft_adapter(out / "adapters" / name)
  return {p: (m.a.copy(), m.b.copy()) for p, m in adapter.modules.items()}


def same(x, y):
  return all(np.array_equal(x[p][0], y[p][0]) and np.array_equal(x[p][1], y[p][1]) for p in x)


# --- 1. a build never reuses or mixes adapters of another build ----------------------


def test_build_retrains_what_changed_and_never_mixes_builds(tiny, tmp_path):
  model, tok = tiny
  out = tmp_path / "build"
  first = build_library(jobs(**{k: DOCS[k] for k in ("doc-a", "doc-b")}), model, tok, out, CFG)
  a0, b0 = factors(out, "doc-a"), factors(out, "doc-b")
  fp_a = first.metadata["doc-a"]["fingerprint"]

  # doc-b's text changed (another world's person under the same name): retrained.
  edited = {"doc-a": DOCS["doc-a"], "doc-b": DOCS["doc-b"].replace("north", "south")}
  second = build_library(jobs(**edited), model, tok, out, CFG)
  assert second.names == ("doc-a", "doc-b")
  assert same(factors(out, "doc-a"), a0) and not same(factors(out, "doc-b"), b0)
  assert second.metadata["doc-a"]["fingerprint"] == fp_a
  assert second.metadata["doc-b"]["fingerprint"] != first.metadata["doc-b"]["fingerprint"]
  on_disk = AdapterLibrary.load(out / "library")
  np.testing.assert_array_equal(
    np.asarray(on_disk.weights.a["down_proj"]), np.asarray(second.weights.a["down_proj"])
  )

  # Another job list: the library holds exactly these jobs, never the old ones too.
  third = build_library(
    jobs(**{"doc-c": DOCS["doc-c"], "doc-a": DOCS["doc-a"]}), model, tok, out, CFG
  )
  assert third.names == ("doc-c", "doc-a")
  assert AdapterLibrary.load(out / "library").names == ("doc-c", "doc-a")

  # Another base model (same shapes, other weights): everything is retrained.
  other = nnx.clone(model)
  state = nnx.state(other, nnx.Param)
  nnx.update(other, jax.tree.map(lambda x: x * 1.01, state))
  fourth = build_library(
    jobs(**{"doc-c": DOCS["doc-c"], "doc-a": DOCS["doc-a"]}), other, tok, out, CFG
  )
  assert fourth.metadata["doc-a"]["fingerprint"] != fp_a
  assert not same(factors(out, "doc-a"), a0)


def test_demo_rerun_with_another_world_uses_only_that_world(tmp_path):
  """The tiny demo, then again with another world's seed (a user's rerun). The
  second run's libraries hold its own 4 people, trained on their own articles."""
  from lag_jax.data.synthetic import make_world

  fast = ["--config.methods=Instr,Oracle", "--config.k_sweep=", f"--workdir={tmp_path}"]
  proc = run_cli("--config=configs/demo.py:tiny", *fast)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_cli("--config=configs/demo.py:tiny", "--config.synthetic.seed=1", *fast)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["num_knowledge_adapters"] == 4
  world = make_world(4, seed=1, questions_per_entity=1)
  library = AdapterLibrary.load(tmp_path / "knowledge" / "library")
  assert set(library.names) == set(world.documents)
  assert "4 knowledge + 3 task adapters" in (tmp_path / "results.md").read_text()


# --- 2. the build_library job notices changed and deleted adapters --------------------


def _build_job(adapters_dir, workdir):
  from lag_jax.jobs import build_library as job

  c = ml_collections.ConfigDict(
    dict(
      job="build_library",
      checkpoint="tiny-random",
      adapters_dir=str(adapters_dir),
      library_dir="",
      modules="",
      dtype="float32",
      allow_pickle=False,
    )
  )
  return job.run(c, str(workdir))


def test_build_library_job_recomputes_changed_and_removes_deleted(tmp_path, capsys):
  config = tiny_config()
  src = tmp_path / "adapters"
  for i in range(3):
    save_peft_adapter(random_lora(config, f"ad{i}", 2, 4.0, ["up_proj"], seed=i), src / f"ad{i}")
  lib = _build_job(src, tmp_path)
  assert lib.names == ("ad0", "ad1", "ad2")
  capsys.readouterr()

  _build_job(src, tmp_path)
  assert "nothing to do" in capsys.readouterr().out  # a rebuild with nothing new says so

  # Retrain ad1 (other weights, same name) and delete ad2.
  save_peft_adapter(random_lora(config, "ad1", 2, 4.0, ["up_proj"], seed=10), src / "ad1")
  shutil.rmtree(src / "ad2")
  lib = _build_job(src, tmp_path)
  said = capsys.readouterr().out
  assert "1 changed" in said and "1 deleted" in said and "ad1" in said and "ad2" in said
  assert sorted(lib.names) == ["ad0", "ad1"]
  fresh = AdapterLibrary.from_adapters(
    [load_peft_adapter(src / "ad1")], config, ("up_proj",), rank=lib.rank
  )
  np.testing.assert_array_equal(
    np.asarray(lib.weights.b["up_proj"][:, lib.id("ad1")]),
    np.asarray(fresh.weights.b["up_proj"][:, 0]),
  )
  assert AdapterLibrary.load(tmp_path / "library").names == lib.names


def test_build_library_job_without_adapters_dir_names_the_field(tmp_path):
  with pytest.raises(ValueError, match="adapters_dir"):
    _build_job("", tmp_path)


# --- 3. a damaged library never loads -------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
  config = tiny_config()
  adapters = [
    random_lora(config, f"ad{i}", 2, 4.0, ["up_proj", "down_proj"], seed=i) for i in range(4)
  ]
  library = AdapterLibrary.from_adapters(adapters, config)
  library.save(tmp_path / "lib")
  return tmp_path / "lib", library, config


def _data_files(path):
  return sorted(glob.glob(str(path / "arrays" / "**" / "d" / "*"), recursive=True))


def test_flipped_bytes_are_an_error(saved):
  path, _, config = saved
  for f in _data_files(path):
    data = bytearray(Path(f).read_bytes())
    data[len(data) // 2] ^= 0x5A
    Path(f).write_bytes(data)
  with pytest.raises(ValueError, match=str(path)):
    AdapterLibrary.load(path, config=config)


def test_nan_is_an_error_even_with_matching_digests(saved):
  from lag_jax.integrity import array_digest

  path, library, config = saved
  a = np.array(library.weights.a["down_proj"])
  a[1, 2, 0, 3] = np.nan
  weights = library.weights.replace(a={**library.weights.a, "down_proj": a})
  broken = AdapterLibrary(library.names, library.modules, library.rank, library.ranks, weights, {})
  # Save through orbax directly so the digests describe the NaN: only the value
  # check can catch it.
  broken.save(path)
  meta = json.loads((path / "library.json").read_text())
  assert meta["digests"]["down_proj/a"] == array_digest(a)
  with pytest.raises(ValueError, match=r"NaN or Inf \(adapter 'ad2', layer 1\)"):
    AdapterLibrary.load(path)


def test_truncated_library_json_names_its_path(saved):
  path, _, _ = saved
  meta = path / "library.json"
  meta.write_text(meta.read_text()[:40])
  with pytest.raises(ValueError, match=str(meta)):
    AdapterLibrary.load(path)


def test_deleted_data_file_is_one_clear_error(saved, capfd):
  path, _, _ = saved
  os.remove(max(_data_files(path), key=os.path.getsize))
  with pytest.raises(ValueError, match="missing or damaged"):
    AdapterLibrary.load(path)
  assert "Traceback" not in capfd.readouterr().err


def test_names_and_arrays_that_disagree_are_an_error(saved):
  path, _, _ = saved
  meta_path = path / "library.json"
  meta = json.loads(meta_path.read_text())
  meta["names"], meta["ranks"] = meta["names"][:3], meta["ranks"][:3]
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="3 adapters"):
    AdapterLibrary.load(path)


@pytest.mark.parametrize(
  "other", [dict(num_hidden_layers=3), dict(intermediate_size=96), dict(hidden_size=32)]
)
def test_library_of_another_model_does_not_load(saved, other):
  path, _, _ = saved
  with pytest.raises(ValueError, match="does not fit the base model"):
    AdapterLibrary.load(path, config=tiny_config(**other))


def test_save_cleans_leftovers_and_publishes_readable_files(saved):
  path, library, _ = saved
  leftover = path.parent / ".tmp-library-killed"
  (leftover / "arrays").mkdir(parents=True)
  (path.parent / ".old-library-killed").mkdir()
  library.save(path)
  assert sorted(p.name for p in path.parent.iterdir()) == ["lib"]
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o777 & ~umask()
  assert stat.S_IMODE(os.stat(path / "library.json").st_mode) == 0o666 & ~umask()


# --- 4. methods and results -----------------------------------------------------------


def test_unknown_methods_fail_before_any_work_and_keep_old_results(tmp_path):
  old = {"methods": {"Oracle": {}}}
  (tmp_path / "results.json").write_text(json.dumps(old))
  for methods in ("LGA,Oracel", "Oracle,LGA"):
    proc = run_cli(
      "--config=configs/demo.py:tiny", f"--config.methods={methods}", f"--workdir={tmp_path}"
    )
    assert proc.returncode != 0
    assert "unknown method 'LGA'" in proc.stderr and "did you mean 'LAG'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == old
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # nothing was built


def test_results_are_written_together(tmp_path, monkeypatch):
  from lag_jax.eval import harness
  from lag_jax.jobs import evaluate

  for name in ("results.json", "results.md", "methods.png"):
    (tmp_path / name).write_text("old")

  def broken_plot(report, folder):
    raise RuntimeError("plotting failed")

  monkeypatch.setattr(harness, "plot", broken_plot)
  with pytest.raises(RuntimeError):
    evaluate._write_results(str(tmp_path), {"methods": {}}, "# new\n")
  assert all((tmp_path / n).read_text() == "old" for n in ("results.json", "results.md"))
  assert sorted(os.listdir(tmp_path)) == ["methods.png", "results.json", "results.md"]

  monkeypatch.setattr(harness, "plot", lambda report, folder: None)
  evaluate._write_results(str(tmp_path), {"methods": {}}, "# new\n")
  assert (tmp_path / "results.md").read_text() == "# new\n"
  assert not (tmp_path / "methods.png").exists()  # the old run's plot, not this run's
  mode = stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode)
  assert mode == 0o666 & ~umask()


# --- 5. the CLI: one line, no traceback -----------------------------------------------


@pytest.fixture(scope="module")
def other_model_library(tmp_path_factory):
  """A saved library of a 3-layer model (the tiny one has 2)."""
  config = tiny_config(num_hidden_layers=3)
  path = tmp_path_factory.mktemp("other") / "lib"
  adapters = [random_lora(config, f"x{i}", 2, 4.0, ["up_proj"], seed=i) for i in range(2)]
  AdapterLibrary.from_adapters(adapters, config).save(path)
  return path


@pytest.fixture(scope="module")
def damaged_library(tmp_path_factory):
  """A saved library of the tiny model whose largest data file was deleted."""
  config = tiny_config()
  path = tmp_path_factory.mktemp("damaged") / "lib"
  adapters = [random_lora(config, f"x{i}", 2, 4.0, ["up_proj"], seed=i) for i in range(2)]
  AdapterLibrary.from_adapters(adapters, config).save(path)
  os.remove(max(_data_files(path), key=os.path.getsize))
  return path


CLI_ERRORS = {
  "unknown field": (
    ["--config=configs/generate.py:tiny", "--config.generation.max_new_tokenz=3"],
    "did you mean --config.generation.max_new_tokens?",
  ),
  "missing config": (["--config=configs/nope.py"], "no such config file 'configs/nope.py'"),
  "workdir is a file": (["--config=configs/generate.py:tiny", "--workdir={file}"], "not a folder"),
  "workdir not writable": (["--config=configs/generate.py:tiny", "--workdir=/sys"], "cannot write"),
  "no adapters_dir": (
    ["--config=configs/build_library.py:tiny", "--config.adapters_dir="],
    "config field 'adapters_dir' is empty",
  ),
  "library with a deleted data file": (
    ["--config=configs/generate.py:tiny", "--config.library={damaged}", "--config.router=lag"],
    "a data file is missing or damaged",
  ),
  "library of another model": (
    ["--config=configs/generate.py:tiny", "--config.library={library}", "--config.router=lag"],
    "does not fit the base model",
  ),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_user_errors_are_one_line(case, tmp_path, other_model_library, damaged_library):
  args, message = CLI_ERRORS[case]
  (tmp_path / "file").write_text("x")
  paths = dict(file=tmp_path / "file", library=other_model_library, damaged=damaged_library)
  args = [a.format(**paths) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'out'}")
  proc = run_cli(*args)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
    proc.stderr.strip().splitlines()[-1]
  ]
  assert not (tmp_path / "out" / "generations.json").exists()
  verbose = run_cli(*args, "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
