"""Loads an HF safetensors checkpoint folder into a CausalLM, tensor by tensor.

The abstract model (``nnx.eval_shape``) gives every parameter's shape and, with a
mesh, its target sharding; each checkpoint tensor is read from its memory-mapped
file and ``device_put`` straight to that sharding. Stacked layer parameters are
assembled one parameter at a time, so host memory holds at most one parameter
(all layers of it) beyond what is already on the device.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from lag_jax import distributed
from lag_jax.errors import UserError
from lag_jax.model import sharding as shd
from lag_jax.model.config import ModelConfig
from lag_jax.model.transformer import CausalLM

# Checkpoint keys that carry no parameters of ours (recomputed buffers).
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(UserError):
  """A checkpoint is missing, truncated, or disagrees with its config."""


def _weight_map(folder: str) -> dict[str, str]:
  """HF key -> safetensors file path, from the index or the single file."""
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        wm = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: malformed index ({e!r})") from None
    return {k: os.path.join(folder, v) for k, v in wm.items()}
  if os.path.exists(single):
    with _open(single) as f:
      return dict.fromkeys(f.keys(), single)
  if any(n.endswith(".bin") for n in os.listdir(folder)):
    raise CheckpointError(
      f"{folder}: only pickled .bin weights found; lag_jax reads "
      "safetensors only (convert them with transformers' save_pretrained)"
    )
  raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open(path: str):
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: safetensors file listed in the index is missing")
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # safetensors raises its own SafetensorError
    raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def hf_keys(path: str, num_layers: int) -> list[str]:
  """HF checkpoint keys that make up our parameter at ``path``, in stacking order."""
  if path.startswith("model.layers."):
    rest = path[len("model.layers.") :]
    return [f"model.layers.{i}.{rest}" for i in range(num_layers)]
  return [path]


def load_model(
  folder: str | os.PathLike,
  *,
  param_dtype=jnp.float32,
  dtype=jnp.float32,
  mesh: Mesh | None = None,
  rules: Mapping[str, str | None] = shd.DEFAULT_RULES,
) -> CausalLM:
  """Builds a CausalLM from an HF folder (config.json + safetensors).

  Args:
    folder: the checkpoint folder.
    param_dtype: dtype the parameters are stored in on device.
    dtype: compute dtype of activations.
    mesh: place parameters on this mesh by ``sharding.DEFAULT_RULES``-style rules;
      None puts everything on the first local device. A mesh over several
      processes: every process reads the checkpoint and places its own devices'
      slices.
  Raises:
    CheckpointError: missing/truncated files, missing or unexpected tensors, or a
      tensor whose shape disagrees with config.json (naming the key and file).
    UnsupportedConfigError: config.json asks for unsupported maths.
  """
  folder = os.fspath(folder)
  config = ModelConfig.from_file(folder)
  abstract = nnx.eval_shape(
    lambda: CausalLM(config, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0))
  )
  graphdef, abstract_state = nnx.split(abstract)
  weight_map = _weight_map(folder)
  handles: dict[str, object] = {}

  def read(key: str) -> np.ndarray:
    file = weight_map[key]
    if file not in handles:
      handles[file] = _open(file)
    try:
      return handles[file].get_tensor(key)
    except Exception as e:
      raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from None

  used: set[str] = set()
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  flat = nnx.to_flat_state(abstract_state)
  loaded = []
  for path_tuple, var in flat:
    path = ".".join(str(p) for p in path_tuple)
    shape = tuple(var.shape)
    keys = hf_keys(path, config.num_hidden_layers)
    missing = [k for k in keys if k not in weight_map]
    if missing:
      raise CheckpointError(
        f"{folder}: checkpoint lacks tensor {missing[0]!r} (needed for {path} by config.json)"
      )
    host = np.empty(shape, np_dtype)
    per_key_shape = shape[1:] if len(keys) > 1 or path.startswith("model.layers.") else shape
    for i, key in enumerate(keys):
      t = read(key)
      if tuple(t.shape) != per_key_shape:
        raise CheckpointError(
          f"{weight_map[key]}: tensor {key!r} has shape {tuple(t.shape)}, but config.json "
          f"implies {per_key_shape}"
        )
      if path.startswith("model.layers."):
        host[i] = t.astype(np_dtype)
      else:
        host[...] = t.astype(np_dtype)
      used.add(key)
    sharding = shd.param_sharding(path, shape, mesh, rules)
    loaded.append((path_tuple, distributed.put(host, sharding)))  # own devices' slices
    del host
  unexpected = sorted(k for k in weight_map if k not in used and not _IGNORED_KEYS.match(k))
  if config.tie_word_embeddings:
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
  if unexpected:
    raise CheckpointError(
      f"{folder}: tensors not used by the {config.model_type} config: "
      f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
    )
  state = nnx.from_flat_state(
    [(p, var.replace(value=v)) for (p, var), (_, v) in zip(flat, loaded, strict=True)]
  )
  logging.info("Loaded %s (%d tensors) from %s", config.model_type, len(used), folder)
  return nnx.merge(graphdef, state)
