"""Our loader + decoder against HF transformers' logits (float32, atol 1e-4)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import save_tiny, tiny_hf_model

from lag_jax.checkpoints.safetensors_loader import CheckpointError, load_model
from lag_jax.model import sharding as shd
from lag_jax.model.config import ModelConfig, UnsupportedConfigError

ATOL = 1e-4
TOKENS = np.array(
  [[1, 17, 42, 99, 3, 7, 64, 120, 5, 33, 11, 2], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, arch, attention, tied):
  hf = save_tiny(tmp_path, arch=arch, attention=attention, tied=tied)
  model = load_model(tmp_path)
  ours, _ = model(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=ATOL, rtol=0)


def test_llama_attention_bias_and_mlp_bias(tmp_path):
  hf = save_tiny(tmp_path, arch="llama", attention_bias=True, mlp_bias=True)
  model = load_model(tmp_path)
  assert model.model.layers.self_attn.o_proj.bias is not None
  ours, _ = model(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=ATOL, rtol=0)


def test_mistral_sliding_window_masks_far_keys(tmp_path):
  # A window shorter than the sequence: HF's eager attention applies it too.
  hf = save_tiny(tmp_path, arch="mistral", sliding_window=4)
  hf.config._attn_implementation = "eager"
  model = load_model(tmp_path)
  assert model.config.sliding_window == 4
  ours, _ = model(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=ATOL, rtol=0)


def test_llama3_rope_scaling_is_read(tmp_path):
  save_tiny(tmp_path, arch="llama")
  config = ModelConfig.from_file(tmp_path)
  assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0


def test_sharded_checkpoint_with_index(tmp_path):
  hf = tiny_hf_model(arch="qwen2")
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
  ours, _ = load_model(tmp_path)(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=ATOL, rtol=0)


def test_load_onto_mesh_places_each_tensor_on_its_sharding(tmp_path):
  hf = save_tiny(tmp_path, arch="llama", attention="mha")
  mesh = shd.make_mesh({"fsdp": 2, "model": -1})
  model = load_model(tmp_path, mesh=mesh)
  q = model.model.layers.self_attn.q_proj.weight[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model", "fsdp")
  assert len(q.sharding.device_set) == 8
  ours = jax.jit(lambda t: model(t)[0])(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=ATOL, rtol=0)


def test_bfloat16_params_close_to_float32(tmp_path):
  hf = save_tiny(tmp_path, arch="llama")
  model = load_model(tmp_path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert model.model.layers.mlp.up_proj.weight[...].dtype == jnp.bfloat16
  ours, _ = model(jnp.asarray(TOKENS))
  assert ours.dtype == jnp.float32  # logits always float32
  # bf16 has ~3 significant digits; the tiny model's logits are O(0.1-1).
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=5e-2, rtol=0)


# --- bad input -------------------------------------------------------------------


def test_missing_safetensors(tmp_path):
  save_tiny(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
  save_tiny(tmp_path)
  path = tmp_path / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_model(tmp_path)


def test_missing_shard_named(tmp_path):
  tiny_hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
  victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  os.remove(victim)
  with pytest.raises(CheckpointError, match=victim.name):
    load_model(tmp_path)


def test_shapes_disagree_with_config(tmp_path):
  save_tiny(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"down_proj.weight.*\(32, 64\).*\(32, 48\)"):
    load_model(tmp_path)


def test_unknown_architecture(tmp_path):
  save_tiny(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedConfigError, match="model_type='gpt2'"):
    load_model(tmp_path)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("final_logit_softcapping", 30.0, "final_logit_softcapping"),
  ],
)
def test_unsupported_maths_named(tmp_path, field, value, match):
  save_tiny(tmp_path, arch="llama")
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg[field] = value
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedConfigError, match=match):
    ModelConfig.from_file(tmp_path)


def test_unexpected_tensor_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  save_tiny(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match="q_proj.bias"):
    load_model(tmp_path)


def test_pickled_checkpoint_refused(tmp_path):
  save_tiny(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointError, match="safetensors only"):
    load_model(tmp_path)
