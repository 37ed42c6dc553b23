"""PEFT LoRA adapters: parity with PEFT (low-rank path and merged), our writer read
back by PEFT, bit-exact round trips, and bad input failing clearly."""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
from hf_models import tiny_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file

from lag_jax.adapters import (
  AdapterError,
  LoraAdapter,
  load_peft_adapter,
  merge_into_model,
  peft_io,
  save_peft_adapter,
  stack_lora,
  validate_adapter,
)
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.model.sharding import make_mesh
from lag_jax.testing.libraries import random_lora

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.random.default_rng(0).integers(3, 128, (2, 12))

# name -> (arch, attention, tied, LoraConfig kwargs)
CASES = {
  "llama-gqa-attention": (
    "llama",
    "gqa",
    False,
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
  ),
  "qwen2-mha-all-linear-rslora": (
    "qwen2",
    "mha",
    False,
    dict(
      r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", rank_pattern={"o_proj": 2}
    ),
  ),
  "mistral-gqa-mlp": (
    "mistral",
    "gqa",
    False,
    dict(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
  ),
  "qwen3-mqa-layer1": (
    "qwen3",
    "mqa",
    False,
    dict(r=4, lora_alpha=32, target_modules=ALL, layers_to_transform=[1]),
  ),
  "llama-tied-patterns": (
    "llama",
    "mha",
    True,
    dict(
      r=4,
      lora_alpha=8,
      target_modules=["q_proj", "v_proj", "down_proj"],
      # PEFT matches pattern keys as regexes anchored at a dotted suffix: "proj" matches
      # nothing, r"(up|down)_proj" matches down_proj.
      rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
      alpha_pattern={"v_proj": 3, "proj": 100, r"(up|down)_proj": 5},
    ),
  ),
  "qwen3-gqa-regex": (
    "qwen3",
    "gqa",
    True,
    dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj|.*\.up_proj"),
  ),
}


def randomise_lora_b(pm, seed: int) -> None:
  # PEFT starts B at zero, which would make every parity check vacuous.
  torch.manual_seed(seed)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_B" in n:
        p.normal_(0.0, 0.1)


def torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


def jax_logits(model, lora=None) -> np.ndarray:
  return np.asarray(model(jnp.asarray(TOKENS), lora=lora)[0])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """(arch, attention, tied) -> (HF model, folder, our CausalLM), built once."""
  cache = {}

  def get(arch, attention, tied):
    key = (arch, attention, tied)
    if key not in cache:
      hf = tiny_hf_model(arch, attention, tied, seed=1)
      folder = tmp_path_factory.mktemp(f"base-{arch}-{attention}-{tied}")
      hf.save_pretrained(folder)
      cache[key] = (hf, folder, load_model(folder))
    return cache[key]

  return get


def make_peft_adapter(hf, folder, seed=0, **lora_kwargs):
  """Saves a random PEFT adapter on a copy of ``hf``; returns the PeftModel."""
  pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
  randomise_lora_b(pm, seed)
  pm.save_pretrained(folder)
  return pm.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, bases, tmp_path_factory):
  arch, attention, tied, kwargs = CASES[request.param]
  hf, base_folder, model = bases(arch, attention, tied)
  folder = tmp_path_factory.mktemp(f"adapter-{request.param}")
  pm = make_peft_adapter(hf, folder, **kwargs)
  return dict(hf=hf, model=model, folder=folder, ref=torch_logits(pm), base_ref=torch_logits(hf))


# --- Parity with PEFT ---


def test_low_rank_path_matches_peft(case):
  adapter = load_peft_adapter(case["folder"])
  ours = jax_logits(case["model"], stack_lora([adapter], case["model"].config))
  np.testing.assert_allclose(ours, case["ref"], atol=ATOL, rtol=0)
  # Not vacuous: the adapter moves the logits well beyond the tolerance.
  assert np.abs(case["ref"] - case["base_ref"]).max() > 100 * ATOL


def test_merged_matches_peft(case):
  adapter = load_peft_adapter(case["folder"])
  before = jax_logits(case["model"])
  merged = merge_into_model(case["model"], [adapter])
  np.testing.assert_allclose(jax_logits(merged), case["ref"], atol=ATOL, rtol=0)
  # The input model is left as it was.
  np.testing.assert_array_equal(jax_logits(case["model"]), before)


def test_our_writer_loads_in_peft(case, tmp_path):
  adapter = load_peft_adapter(case["folder"])
  save_peft_adapter(adapter, tmp_path / "ours")
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(case["hf"]), tmp_path / "ours").eval()
  np.testing.assert_allclose(torch_logits(pm), case["ref"], atol=ATOL, rtol=0)


def read_folder(folder):
  with open(os.path.join(folder, "adapter_config.json")) as f:
    config = json.load(f)
  with safe_open(os.path.join(folder, "adapter_model.safetensors"), "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
  return config, tensors


def assert_same_folder(a, b):
  config_a, tensors_a = read_folder(a)
  config_b, tensors_b = read_folder(b)
  assert config_a == config_b
  assert sorted(tensors_a) == sorted(tensors_b)
  for k, t in tensors_a.items():
    assert t.dtype == tensors_b[k].dtype and t.shape == tensors_b[k].shape, k
    assert t.tobytes() == tensors_b[k].tobytes(), k


def test_round_trip_is_bit_exact(case, tmp_path):
  first = load_peft_adapter(case["folder"])
  save_peft_adapter(first, tmp_path / "a")
  second = load_peft_adapter(tmp_path / "a")
  save_peft_adapter(second, tmp_path / "b")
  assert_same_folder(case["folder"], tmp_path / "a")
  assert_same_folder(tmp_path / "a", tmp_path / "b")
  assert second.config == first.config
  for path, m in first.modules.items():
    m2 = second.modules[path]
    assert (m2.r, m2.alpha, m2.scale, m2.layer, m2.module) == (
      m.r,
      m.alpha,
      m.scale,
      m.layer,
      m.module,
    )


def test_weighted_set_matches_peft_cat(bases, tmp_path):
  hf, _, model = bases("llama", "gqa", False)
  make_peft_adapter(
    hf, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]
  )
  make_peft_adapter(
    hf, tmp_path / "b", seed=2, r=2, lora_alpha=6, target_modules=["q_proj", "o_proj", "down_proj"]
  )
  weights = [0.7, -1.3]
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a", adapter_name="a")
  pm.load_adapter(tmp_path / "b", adapter_name="b")
  # "cat" concatenates the ranks: exactly w_a s_a B_a A_a + w_b s_b B_b A_b.
  pm.add_weighted_adapter(["a", "b"], weights, "ab", combination_type="cat")
  pm.set_adapter("ab")
  ref = torch_logits(pm.eval())
  adapters = [load_peft_adapter(tmp_path / "a"), load_peft_adapter(tmp_path / "b")]
  lora = stack_lora(adapters, model.config, weights)
  assert lora["q_proj"].a.shape == (2, 6, 32) and lora["o_proj"].b.shape == (2, 32, 2)
  np.testing.assert_allclose(jax_logits(model, lora), ref, atol=ATOL, rtol=0)
  merged = merge_into_model(model, adapters, weights)
  np.testing.assert_allclose(jax_logits(merged), ref, atol=ATOL, rtol=0)


def test_adapters_made_in_code_load_in_peft(bases, tmp_path):
  hf, _, model = bases("mistral", "gqa", False)
  rnd = random_lora(
    model.config, "rnd", r=4, alpha=8, target_modules=("k_proj", "gate_proj"), seed=3, layers=[0]
  )
  assert set(rnd.modules) == {"model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj"}
  # Mixed ranks through from_arrays: its rank_pattern must tell PEFT about them.
  rng = np.random.default_rng(4)
  mixed = LoraAdapter.from_arrays(
    "mixed",
    {
      "model.layers.1.self_attn.v_proj": (rng.normal(size=(3, 32)), rng.normal(size=(16, 3))),
      "model.layers.0.mlp.down_proj": (rng.normal(size=(5, 64)), rng.normal(size=(32, 5))),
    },
    r=3,
    alpha=2.0,
    use_rslora=True,
  )
  assert mixed.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(2.0 / 5**0.5)
  for adapter in (rnd, mixed):
    folder = tmp_path / adapter.name
    save_peft_adapter(adapter, folder)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()
    ours = jax_logits(model, stack_lora(adapter, model.config))
    np.testing.assert_allclose(ours, torch_logits(pm), atol=ATOL, rtol=0)
    assert np.abs(ours - jax_logits(model)).max() > 10 * ATOL


def test_fan_in_fan_out_needs_no_transpose(bases, tmp_path):
  """PEFT stores lora_A / lora_B as nn.Linear weights whatever fan_in_fan_out says;
  the flag only transposes the merged delta of Conv1D bases, and PEFT resets it to
  False on nn.Linear. So the loaded a is [R, I] and b [O, R] either way."""
  hf, _, model = bases("llama", "gqa", False)
  pm = make_peft_adapter(hf, tmp_path / "plain", r=4, target_modules=["up_proj"])
  shutil.copytree(tmp_path / "plain", tmp_path / "fifo")
  config_path = tmp_path / "fifo" / "adapter_config.json"
  config = json.loads(config_path.read_text())
  config["fan_in_fan_out"] = True
  config_path.write_text(json.dumps(config))
  plain, fifo = load_peft_adapter(tmp_path / "plain"), load_peft_adapter(tmp_path / "fifo")
  m = fifo.modules["model.layers.0.mlp.up_proj"]
  assert m.a.shape == (4, 32) and m.b.shape == (64, 4)  # [R, I], [O, R]; up_proj is 64 x 32
  np.testing.assert_array_equal(m.a, plain.modules["model.layers.0.mlp.up_proj"].a)
  pm_fifo = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "fifo").eval()
  ref = torch_logits(pm)
  np.testing.assert_allclose(torch_logits(pm_fifo), ref, atol=ATOL, rtol=0)
  np.testing.assert_allclose(
    jax_logits(model, stack_lora(fifo, model.config)), ref, atol=ATOL, rtol=0
  )


def test_bfloat16_adapter_keeps_its_dtype(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 32)).astype(ml_dtypes.bfloat16)
  b = rng.normal(size=(32, 2)).astype(ml_dtypes.bfloat16)
  adapter = LoraAdapter.from_arrays(
    "bf16", {"model.layers.0.self_attn.q_proj": (a, b)}, r=2, alpha=4
  )
  save_peft_adapter(adapter, tmp_path / "bf16")
  loaded = load_peft_adapter(tmp_path / "bf16")
  m = loaded.modules["model.layers.0.self_attn.q_proj"]
  assert m.a.dtype == ml_dtypes.bfloat16 and m.a.tobytes() == a.tobytes()
  assert m.b.tobytes() == b.tobytes()


# --- Bad input ---


@pytest.fixture(scope="module")
def peft_folder(bases, tmp_path_factory):
  """A valid PEFT adapter on the llama/gqa base, to be copied and broken."""
  hf, _, _ = bases("llama", "gqa", False)
  folder = tmp_path_factory.mktemp("valid")
  make_peft_adapter(hf, folder, r=4, target_modules=["q_proj", "up_proj"])
  return folder


def broken_copy(peft_folder, tmp_path, **config_changes):
  folder = tmp_path / "broken"
  shutil.copytree(peft_folder, folder)
  config_path = folder / "adapter_config.json"
  config = json.loads(config_path.read_text())
  config.update(config_changes)
  config_path.write_text(json.dumps(config))
  return folder


def test_pickled_adapter_refused_unless_allowed(bases, peft_folder, tmp_path):
  hf, _, _ = bases("llama", "gqa", False)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), peft_folder)
  pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
  assert os.listdir(tmp_path / "bin").count("adapter_model.bin") == 1
  with pytest.raises(AdapterError, match=r"adapter_model\.bin.*allow_pickle=True"):
    load_peft_adapter(tmp_path / "bin")
  from_bin = load_peft_adapter(tmp_path / "bin", allow_pickle=True)
  from_st = load_peft_adapter(peft_folder)
  assert sorted(from_bin.modules) == sorted(from_st.modules)
  for path, m in from_st.modules.items():
    assert from_bin.modules[path].a.tobytes() == m.a.tobytes()
    assert from_bin.modules[path].b.tobytes() == m.b.tobytes()


@pytest.mark.parametrize(
  "field,value",
  [
    ("use_dora", True),
    ("modules_to_save", ["lm_head"]),
    ("bias", "lora_only"),
    ("lora_bias", True),
    ("peft_type", "IA3"),
    ("init_lora_weights", "pissa"),
    ("alora_invocation_tokens", [5, 6]),
  ],
)
def test_unsupported_config_field_named(peft_folder, tmp_path, field, value):
  folder = broken_copy(peft_folder, tmp_path, **{field: value})
  with pytest.raises(AdapterError, match=rf"'broken'.*{field}"):
    load_peft_adapter(folder)


def rewrite_tensors(folder, change):
  path = folder / "adapter_model.safetensors"
  with safe_open(path, "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
  change(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_tensors_named(peft_folder, tmp_path):
  key = "base_model.model.model.layers.0.self_attn.q_proj"
  folder = broken_copy(peft_folder, tmp_path)
  rewrite_tensors(
    folder, lambda t: t.update({f"{key}.lora_magnitude_vector": np.ones(32, np.float32)})
  )
  with pytest.raises(AdapterError, match="lora_magnitude_vector.*DoRA"):
    load_peft_adapter(folder)
  shutil.rmtree(folder)
  folder = broken_copy(peft_folder, tmp_path)
  rewrite_tensors(folder, lambda t: t.pop(f"{key}.lora_B.weight"))
  with pytest.raises(AdapterError, match=r"no lora_B for module model\.layers\.0\.self_attn"):
    load_peft_adapter(folder)


def test_rank_disagreeing_with_config(peft_folder, tmp_path):
  folder = broken_copy(peft_folder, tmp_path, r=8)
  with pytest.raises(AdapterError, match=r"rank r=8"):
    load_peft_adapter(folder)


def test_weights_for_untargeted_module(peft_folder, tmp_path):
  folder = broken_copy(peft_folder, tmp_path, target_modules=["up_proj"])
  with pytest.raises(AdapterError, match=r"self_attn\.q_proj.*target_modules"):
    load_peft_adapter(folder)


def test_adapter_for_another_base_model(bases, tmp_path):
  _, _, model = bases("llama", "gqa", False)
  other = tiny_hf_model("llama", "gqa", seed=2, intermediate_size=70)
  make_peft_adapter(other, tmp_path / "other", r=4, target_modules=["up_proj"])
  adapter = load_peft_adapter(tmp_path / "other", name="foo")
  msg = (
    r"adapter 'foo': module model\.layers\.0\.mlp\.up_proj has lora_B of shape "
    r"\(70, 4\) but the base model's up_proj is \(64, 32\) .* another base model"
  )
  with pytest.raises(AdapterError, match=msg):
    validate_adapter(adapter, model.config)
  with pytest.raises(AdapterError, match=msg):
    stack_lora(adapter, model.config)
  with pytest.raises(AdapterError, match=msg):
    merge_into_model(model, adapter)


@pytest.mark.parametrize(
  "path,match",
  [
    (
      "model.layers.5.self_attn.q_proj",
      r"model\.layers\.5\.self_attn\.q_proj is in layer 5, "
      r"but the base model has 2 layers",
    ),
    ("lm_head", r"module lm_head is not one the model can adapt"),
    ("model.layers.0.mlp.q_proj", r"model\.layers\.0\.mlp\.q_proj is not one"),
  ],
)
def test_adapter_targeting_missing_module(bases, path, match):
  _, _, model = bases("llama", "gqa", False)
  a, b = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
  adapter = LoraAdapter.from_arrays("bad", {path: (a, b)}, r=2, alpha=2)
  with pytest.raises(AdapterError, match=match):
    validate_adapter(adapter, model.config)


def test_nan_weights_named(bases):
  _, _, model = bases("llama", "gqa", False)
  rnd = random_lora(model.config, "nan", r=2, alpha=2, target_modules=["v_proj"], seed=0)
  arrays = {p: (m.a, m.b.copy()) for p, m in rnd.modules.items()}
  arrays["model.layers.1.self_attn.v_proj"][1][3, 1] = np.nan
  bad = LoraAdapter.from_arrays("nan", arrays, r=2, alpha=2)
  with pytest.raises(AdapterError, match=r"'nan'.*layers\.1\.self_attn\.v_proj.*NaN"):
    validate_adapter(bad, model.config)


def test_truncated_safetensors_named(peft_folder, tmp_path):
  folder = broken_copy(peft_folder, tmp_path)
  path = folder / "adapter_model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*truncated"):
    load_peft_adapter(folder)


def test_missing_files_named(peft_folder, tmp_path):
  folder = broken_copy(peft_folder, tmp_path)
  os.remove(folder / "adapter_config.json")
  with pytest.raises(AdapterError, match=r"adapter_config\.json not found"):
    load_peft_adapter(folder)
  folder = tmp_path / "no-weights"
  folder.mkdir()
  shutil.copy(peft_folder / "adapter_config.json", folder)
  with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
    load_peft_adapter(folder)
  with pytest.raises(AdapterError, match="folder not found"):
    load_peft_adapter(tmp_path / "nowhere")


def test_failed_save_leaves_old_adapter_intact(bases, peft_folder, tmp_path, monkeypatch):
  _, _, model = bases("llama", "gqa", False)
  old = load_peft_adapter(peft_folder)
  target = tmp_path / "adapters" / "mine"
  save_peft_adapter(old, target)
  new = random_lora(model.config, "new", r=2, alpha=2, target_modules=["k_proj"], seed=1)

  def fail_midway(tensors, path):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(peft_io, "_write_tensors", fail_midway)
  with pytest.raises(OSError, match="disk full"):
    save_peft_adapter(new, target)
  assert os.listdir(target.parent) == ["mine"]  # no temporary folders left behind
  assert_same_folder(peft_folder, target)
  monkeypatch.undo()
  save_peft_adapter(new, target)  # a successful save does replace it
  assert sorted(load_peft_adapter(target).modules) == sorted(new.modules)
  assert os.listdir(target.parent) == ["mine"]


def test_merge_keeps_sharding(bases, peft_folder):
  _, folder, model = bases("llama", "gqa", False)
  mesh = make_mesh({"fsdp": 2, "model": -1})
  sharded = load_model(folder, mesh=mesh)
  adapter = load_peft_adapter(peft_folder)
  merged = merge_into_model(sharded, adapter)
  for parent, name in (("self_attn", "q_proj"), ("mlp", "up_proj")):
    before, after = (
      getattr(getattr(m.model.layers, parent), name).weight[...] for m in (sharded, merged)
    )
    assert after.sharding == before.sharding and len(after.sharding.device_set) == 8
  np.testing.assert_allclose(
    jax_logits(merged), jax_logits(merge_into_model(model, adapter)), atol=ATOL, rtol=0
  )
