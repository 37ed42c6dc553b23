"""Bad inputs fail with a UserError that names the culprit: the generate
job's prompts file and config fields, the sampler's parameters, list fields, file
permissions of atomic writes, and undecodable bytes in KILT files."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import stat

import numpy as np
import pytest
from cli import run_cli

from lag_jax.data import KiltFormatError, read_kilt, read_kilt_wikipedia, read_wiki_summaries
from lag_jax.errors import ConfigError, DataFileError, UserError
from lag_jax.generation.sampling import Greedy, Sample, make_sampler
from lag_jax.jobs import common
from lag_jax.jobs import generate as gen_job

ROOT = pathlib.Path(__file__).parents[1]


def _gen_config(arg="tiny"):
  spec = importlib.util.spec_from_file_location("generate_config", ROOT / "configs" / "generate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ---------------------------------------------------------------------------
# The generate job's prompts file.


def _prompts_from(tmp_path, name, data: bytes):
  path = tmp_path / name
  path.write_bytes(data)
  c = _gen_config()
  c.prompts_file = str(path)
  return path, gen_job._prompts(c)


def test_prompts_file_reads_txt_and_jsonl(tmp_path):
  _, got = _prompts_from(tmp_path, "p.txt", b"first\r\n\n  \nsecond\n")
  assert got == ["first", "second"]
  _, got = _prompts_from(tmp_path, "p.jsonl", b'{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n')
  assert got == ["a", "b"]


@pytest.mark.parametrize(
  "name, data, line, what",
  [
    ("p.jsonl", b'{"prompt": "a"}\n\n{"question": "b"}\n', 3, '"prompt"'),
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b",\n', 2, "not valid JSON"),
    ("p.jsonl", b'{"prompt": "a"}\n["b"]\n', 2, '"prompt"'),
    ("p.jsonl", b'{"prompt": 3}\n', 1, "string"),
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', 2, "UTF-8"),
    ("p.txt", b"fine\ncaf\xe9\n", 2, "UTF-8"),
  ],
)
def test_bad_prompts_file_names_file_and_line(tmp_path, name, data, line, what):
  with pytest.raises(DataFileError, match="prompts_file") as err:
    _prompts_from(tmp_path, name, data)
  assert f"{tmp_path / name}:{line}:" in str(err.value) and what in str(err.value)


@pytest.mark.parametrize("data", [b"", b"\n  \n\n"])
@pytest.mark.parametrize("name", ["p.txt", "p.jsonl"])
def test_empty_prompts_file_is_an_error(tmp_path, name, data):
  with pytest.raises(DataFileError, match="no prompts") as err:
    _prompts_from(tmp_path, name, data)
  assert str(tmp_path / name) in str(err.value)


def test_missing_prompts_file_names_the_path(tmp_path):
  c = _gen_config()
  c.prompts_file = str(tmp_path / "nope.txt")
  with pytest.raises(DataFileError, match="prompts_file") as err:
    gen_job._prompts(c)
  assert str(tmp_path / "nope.txt") in str(err.value)


def test_cli_bad_prompts_file_is_one_line(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text('{"prompt": "a"}\n{"question": "b"}\n')
  proc = run_cli(
    "--config=configs/generate.py:tiny", f"--workdir={tmp_path}", f"--config.prompts_file={path}"
  )
  assert proc.returncode != 0
  assert f"config field 'prompts_file': {path}:2:" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_config_prompts_must_be_strings():
  c = _gen_config()
  c.prompts = ()
  with pytest.raises(ConfigError, match="'prompts' is empty"):
    gen_job._prompts(c)
  c.prompts = ("fine", 3)
  with pytest.raises(ConfigError, match="config field 'prompts'"):
    gen_job._prompts(c)


# ---------------------------------------------------------------------------
# Sampling parameters: one validation path (make_sampler), reported by config field.


def test_make_sampler_takes_config_values_as_they_are():
  # The config's "off" values: top_k 0, top_p 1.0; the sampler is the one without them.
  assert make_sampler("sample", temperature=0.7, top_k=0, top_p=1.0) == Sample(temperature=0.7)
  assert make_sampler("greedy", temperature=1.0, top_k=0, top_p=1.0) == Greedy()
  assert make_sampler("sample", top_k=5, top_p=0.9) == Sample(top_k=5, top_p=0.9)


@pytest.mark.parametrize(
  "name, kwargs, param",
  [
    ("sample", {"top_p": 1.5}, "top_p"),
    ("sample", {"top_p": 0.0}, "top_p"),
    ("sample", {"top_p": float("nan")}, "top_p"),
    ("sample", {"top_k": -1}, "top_k"),
    ("sample", {"top_k": 2.5}, "top_k"),
    ("sample", {"temperature": 0.0}, "temperature"),
    ("sample", {"temperature": -1.0}, "temperature"),
    ("beam", {}, "sampler"),
    ("greedy", {"top_p": 0.5}, "top_p"),
  ],
)
def test_make_sampler_rejects_bad_values_naming_the_parameter(name, kwargs, param):
  with pytest.raises(ConfigError, match=param) as err:
    make_sampler(name, **kwargs)
  assert err.value.argument == param


@pytest.mark.parametrize(
  "field, value",
  [
    ("top_p", 1.5),
    ("top_k", -3),
    ("temperature", 0.0),
    ("sampler", "beam"),
  ],
)
def test_generate_config_reports_sampler_errors_by_field(field, value):
  c = _gen_config()
  c.generation.sampler = "sample"
  c.generation[field] = value
  with pytest.raises(ConfigError, match=f"config field 'generation.{field}'={value!r}"):
    gen_job._check_config(c)


def test_cli_rejects_top_p_above_one(tmp_path):
  proc = run_cli(
    "--config=configs/generate.py:tiny",
    f"--workdir={tmp_path}",
    "--config.generation.sampler=sample",
    "--config.generation.top_p=1.5",
  )
  assert proc.returncode != 0
  assert "config field 'generation.top_p'=1.5" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "generations.json").exists()


# ---------------------------------------------------------------------------
# List fields.


def test_int_and_float_lists():
  assert common.int_list("k_sweep", "1, 2,3") == [1, 2, 3]
  assert common.int_list("k_sweep", (4, 5)) == [4, 5]
  assert common.int_list("k_sweep", "") == []
  assert common.float_list("adapter_weights", "0.5,1") == [0.5, 1.0]
  assert common.float_list("adapter_weights", (1, 2.5)) == [1.0, 2.5]
  with pytest.raises(ConfigError, match=r"config field 'k_sweep'='1,x': expected integers"):
    common.int_list("k_sweep", "1,x")
  with pytest.raises(ConfigError, match="config field 'k_sweep'"):
    common.int_list("k_sweep", "1.5")
  with pytest.raises(ConfigError, match=r"config field 'weights'='a,b': expected numbers"):
    common.float_list("weights", "a,b")
  with pytest.raises(ConfigError, match="config field 'weights'"):
    common.float_list("weights", "1,nan")


@pytest.mark.parametrize(
  "field, value",
  [
    ("route_layers", "abc"),
    ("vote_layers", "x-y"),
    ("route_layers", "5-2"),
    ("route_layers", "-1"),
    ("vote_layers", "+"),
  ],
)
def test_bad_layer_lists_name_the_field(field, value):
  c = _gen_config("tiny_lag")
  c[field] = value
  expected = f"config field '{field}'='{value}': expected layer indices like"
  with pytest.raises(ConfigError, match=re.escape(expected)):
    gen_job._check_config(c)


def test_layer_lists_parse():
  assert gen_job._layer_list("0-2+5,7") == (0, 1, 2, 5, 7)
  assert gen_job._layer_list("") is None


def test_layers_outside_the_model_name_the_field():
  c = _gen_config("tiny_lag")
  c.route_layers = "0-1"
  gen_job._check_layers(c, 2)
  c.route_layers = "0-5"
  with pytest.raises(ConfigError, match=r"config field 'route_layers'='0-5'.*2 layers"):
    gen_job._check_layers(c, 2)
  c.route_layers, c.vote_layers = "", "7"
  with pytest.raises(ConfigError, match=r"config field 'vote_layers'='7'.*2 layers"):
    gen_job._check_layers(c, 2)


def test_cli_layers_outside_the_model_name_the_field(tmp_path):
  proc = run_cli(
    "--config=configs/generate.py:tiny_lag",
    f"--workdir={tmp_path}",
    "--config.gate=0.1",
    "--config.route_layers=0-5",
  )
  assert proc.returncode != 0
  assert "config field 'route_layers'='0-5'" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "adapters, weights, match",
  [
    ("a,b", "x,y", r"config field 'adapter_weights'='x,y': expected numbers"),
    ("a,b", "1", r"config field 'adapter_weights'='1': 1 values? for 2 adapters"),
    ("", "1", r"config field 'adapter_weights'='1': 1 values? for 0 adapters"),
  ],
)
def test_bad_adapter_weights(adapters, weights, match):
  c = _gen_config()
  c.adapters, c.adapter_weights = adapters, weights
  with pytest.raises(ConfigError, match=match):
    gen_job._check_config(c)


# ---------------------------------------------------------------------------
# Enum-like fields fail before the model is loaded, naming the field and the choices.


@pytest.mark.parametrize(
  "field, value, choices",
  [
    ("span", "users", "'prompt'"),
    ("router", "lagg", "'request_lag'"),
    ("task_router", "arow", "'arrow'"),
    ("projection", "sparse", "'gather'"),
    ("vote_scope", "each", "'module'"),
    ("vote_score", "sum", "'count'"),
    ("gate_fallback", "greedy", "'none'"),
    ("adapter_sharding", "pmap", "'shard_map'"),
    ("param_dtype", "float16", "'bfloat16'"),
    ("dtype", "fp32", "'float32'"),
    ("shared_removal", "top:x", "top:S"),
    ("k", 0, ">= 1"),
    ("gate", 1.5, "[0, 1)"),
    ("vote_top_m", 0, ">= 1"),
  ],
)
def test_enum_fields_fail_before_the_model_loads(monkeypatch, tmp_path, field, value, choices):
  def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the config was checked")

  monkeypatch.setattr(gen_job, "load_model", no_model)
  c = _gen_config("tiny_lag")
  c.checkpoint = str(tmp_path / "no-such-checkpoint")  # the config check comes first
  c[field] = value
  with pytest.raises(ConfigError, match=f"config field '{field}'={value!r}") as err:
    gen_job.run(c, str(tmp_path))
  assert choices in str(err.value)


def test_fixed_router_needs_an_adapter_name():
  c = _gen_config("tiny_lag")
  c.router = "fixed"
  with pytest.raises(ConfigError, match="config field 'fixed_adapter'"):
    gen_job._check_config(c)


def test_valid_configs_pass_the_check():
  for arg in ("tiny", "tiny_lag"):
    gen_job._check_config(_gen_config(arg))
  c = _gen_config("tiny_lag")
  c.router, c.gate, c.route_layers, c.vote_layers = "request_lag", 0.2, "0-1", "1"
  c.generation.sampler, c.generation.top_p, c.generation.top_k = "sample", 0.9, 5
  c.adapters, c.adapter_weights = "a,b", "0.5,2"
  gen_job._check_config(c)


def test_max_new_tokens_must_be_positive():
  c = _gen_config()
  c.generation.max_new_tokens = 0
  with pytest.raises(ConfigError, match="config field 'generation.max_new_tokens'=0"):
    gen_job._check_config(c)


# ---------------------------------------------------------------------------
# Files written atomically get the ordinary file mode (0666 less the umask).


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_write_json_atomic_uses_the_default_mode(tmp_path, umask):
  path = tmp_path / "out" / "results.json"
  common.write_json_atomic(str(path), {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  assert _mode(path) == 0o666 & ~umask
  assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_publish_chmods_and_replaces(tmp_path, umask):
  path = tmp_path / "results.md"
  path.write_text("old")
  tmp = tmp_path / ".tmp-results.md"
  tmp.write_text("new")
  os.chmod(tmp, 0o600)
  common.publish(str(tmp), str(path))
  assert path.read_text() == "new" and not tmp.exists()
  assert _mode(path) == 0o666 & ~umask
  assert common.default_file_mode() == 0o666 & ~umask
  assert os.umask(umask) == umask  # reading the mode left the umask as it was


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  path = tmp_path / "plot.png"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError), common.atomic_write(str(path), "wb") as f:
    f.write(b"half")
    raise RuntimeError("boom")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_saved_routing_uses_the_default_mode(tmp_path, umask):
  class Lib:
    modules = ("gate_proj",)
    names = ("a", "b")

  path = tmp_path / "routing.npz"
  gen_job._save_routing(str(path), {"gate_proj": (np.zeros((1, 2, 3), np.int32),)}, [Lib()])
  assert _mode(path) == 0o666 & ~umask
  with np.load(path) as z:
    assert list(z["lib0/names"]) == ["a", "b"] and z["lib0/gate_proj"].shape == (1, 2, 3)
  assert [p.name for p in tmp_path.iterdir()] == ["routing.npz"]


# ---------------------------------------------------------------------------
# KILT files with bytes that are not UTF-8.


def _record(i: int, answer: str = "a") -> str:
  return json.dumps(
    {"id": str(i), "input": f"q{i}", "output": [{"answer": answer, "provenance": [{"title": "A"}]}]}
  )


def test_kilt_jsonl_undecodable_line_is_counted(tmp_path):
  path = tmp_path / "nq-dev-kilt.jsonl"
  bad = _record(2, "cafX").encode().replace(b"cafX", b"caf\xe9")  # a lone Latin-1 byte
  path.write_bytes(b"\n".join([_record(1).encode(), bad, b"", _record(4).encode()]) + b"\n")
  examples, report = read_kilt(path)
  assert [e.id for e in examples] == ["1", "4"]
  assert report.counts == {"invalid_utf8": 1}
  (problem,) = report.problems
  assert problem.line == 2 and problem.example_id == "2"
  assert f"{path}:2:" in report.summary() and "UTF-8" in report.summary()
  with pytest.raises(KiltFormatError) as err:
    read_kilt(path, strict=True)
  e = err.value
  assert (e.file, e.line, e.kind) == (str(path), 2, "invalid_utf8")
  assert f"{path}:2:" in str(e) and "UTF-8" in str(e)


def test_kilt_json_array_undecodable_is_an_error(tmp_path):
  path = tmp_path / "nq-dev-kilt.json"
  path.write_bytes(b"[\n" + _record(1).encode() + b',\n{"id": "caf\xe9"}\n]\n')
  with pytest.raises(KiltFormatError) as err:
    read_kilt(path)
  assert (err.value.file, err.value.line, err.value.kind) == (str(path), 3, "invalid_utf8")
  assert f"{path}:3:" in str(err.value)


def test_kilt_wikipedia_undecodable_line(tmp_path):
  path = tmp_path / "kilt_knowledgesource.jsonl"
  pages = [{"wikipedia_title": "Oboe", "text": ["Oboe", "A reed."]}, {"wikipedia_title": "Harp"}]
  lines = [json.dumps(p).encode() for p in pages]
  lines.insert(1, b'{"wikipedia_title": "Caf\xe9", "text": ["x"]}')
  path.write_bytes(b"\n".join(lines) + b"\n")
  docs = read_kilt_wikipedia(path)  # lenient: the two bad lines are skipped
  assert [d.title for d in docs] == ["Oboe"]
  with pytest.raises(KiltFormatError) as err:
    read_kilt_wikipedia(path, strict=True)
  assert (err.value.file, err.value.line) == (str(path), 2)
  assert f"{path}:2:" in str(err.value) and "UTF-8" in str(err.value)


@pytest.mark.parametrize(
  "data, line, what",
  [(b'{"A": {"extract": "caf\xe9"}}', 1, "UTF-8"), (b'{"A":\n {"extract": }}', 2, "JSON")],
)
def test_wiki_summaries_unreadable(tmp_path, data, line, what):
  path = tmp_path / "summaries.json"
  path.write_bytes(data)
  with pytest.raises(KiltFormatError) as err:
    read_wiki_summaries(path)
  assert (err.value.file, err.value.line) == (str(path), line)
  assert f"{path}:{line}:" in str(err.value) and what in str(err.value)
  assert isinstance(err.value, UserError)
