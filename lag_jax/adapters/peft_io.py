"""Reads and writes PEFT LoRA adapters (``adapter_config.json`` + safetensors).

An adapter is kept exactly as PEFT stores it: per adapted module the pair A [R, I]
and B [O, R] in their stored dtype, and the config dict verbatim, so that a load
-> save -> load round trip is bit-exact. The LoRA scale (alpha / R, or alpha /
sqrt(R) with rsLoRA, after PEFT's ``rank_pattern`` / ``alpha_pattern`` overrides)
is resolved once at load time, per module, the way PEFT resolves it.

Anything in a config that would change the maths and that we do not implement
(DoRA, trained biases, ``modules_to_save``, the LoRA variants, ...) raises
``AdapterError`` naming the adapter and the field, rather than silently applying a
plain LoRA delta.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lag_jax.errors import UserError
from lag_jax.integrity import folder_mode

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# PEFT prefixes every key with the PeftModel -> LoraModel attribute path.
KEY_PREFIX = "base_model.model."

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_LAYER_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<name>\w+)$")
# PEFT's default targets when a config has none, for all four supported families.
_DEFAULT_TARGETS = ("q_proj", "v_proj")
# init_lora_weights values whose adapters are only correct on a modified base (the
# residual W - B0 A0, or a quantised W), which a plain LoRA delta cannot reproduce.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")
# Config fields that switch on maths other than W x + s B A x, with a reader's name.
_UNSUPPORTED_FLAGS = {
  "use_dora": "DoRA",
  "lora_bias": "a trained bias on lora_B",
  "modules_to_save": "fully trained extra modules",
  "trainable_token_indices": "trainable token embeddings",
  "layer_replication": "layer replication",
  "alora_invocation_tokens": "activated LoRA (aLoRA)",
  "use_qalora": "QA-LoRA",
  "target_parameters": "LoRA on nn.Parameters",
  "arrow_config": "Arrow routing",
  "velora_config": "VeLoRA",
  "monteclora_config": "MonteCLoRA",
  "kasa_config": "KaSA",
  "use_bdlora": "block-diagonal LoRA",
  "megatron_config": "Megatron-parallel LoRA layers",
}


class AdapterError(UserError):
  """An adapter is missing, malformed, unsupported, or does not fit the base model."""


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleLora:
  """One adapted linear module: ``delta(x) = scale * (x @ a.T) @ b.T``.

  Attributes:
    a: [R, I] lora_A as stored (stored dtype).
    b: [O, R] lora_B as stored (stored dtype).
    r: the rank R this module has by the config.
    alpha: its lora_alpha (after ``alpha_pattern``).
    scale: alpha / R, or alpha / sqrt(R) with rsLoRA.
    layer: decoder layer index, or None for a module outside ``model.layers``.
    module: short module name, e.g. 'q_proj'.
  """

  a: np.ndarray
  b: np.ndarray
  r: int
  alpha: float
  scale: float
  layer: int | None
  module: str


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
  """A PEFT LoRA adapter.

  Attributes:
    name: how errors and logs name it (default: its folder's name).
    config: the ``adapter_config.json`` dict, verbatim.
    modules: HF module path without PEFT's prefix (e.g.
      'model.layers.3.self_attn.q_proj') -> its ModuleLora.
  """

  name: str
  config: dict[str, Any]
  modules: dict[str, ModuleLora]

  @classmethod
  def from_arrays(
    cls,
    name: str,
    modules: Mapping[str, tuple[Any, Any]],
    r: int,
    alpha: float,
    use_rslora: bool = False,
    target_modules: Sequence[str] | str | None = None,
    layers_to_transform: Sequence[int] | None = None,
  ) -> LoraAdapter:
    """Builds an adapter, with a PEFT-loadable config, from arrays made in code.

    Args:
      name: the adapter's name.
      modules: module path -> (a [R, I], b [O, R]); dtypes are kept.
      r: the default rank; a module whose a has another rank gets an exact
        ``rank_pattern`` entry, so PEFT builds it with that rank.
      alpha: lora_alpha, shared by all modules.
      use_rslora: scale alpha / sqrt(R) instead of alpha / R.
      target_modules: PEFT's target_modules; default the exact module paths given.
      layers_to_transform: PEFT's layers_to_transform (with short-name targets).
    """
    arrays = {p: (np.asarray(a), np.asarray(b)) for p, (a, b) in modules.items()}
    rank_pattern = {
      re.escape(p): int(a.shape[0])
      for p, (a, _) in sorted(arrays.items())
      if a.ndim == 2 and a.shape[0] != r
    }
    if target_modules is None:
      target_modules = sorted(arrays)
    elif not isinstance(target_modules, str):
      target_modules = sorted(target_modules)
    config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": None,
      "inference_mode": True,
      "r": int(r),
      "lora_alpha": alpha,
      "lora_dropout": 0.0,
      "use_rslora": bool(use_rslora),
      "target_modules": target_modules,
      "layers_to_transform": None
      if layers_to_transform is None
      else [int(i) for i in layers_to_transform],
      "layers_pattern": None,
      "rank_pattern": rank_pattern,
      "alpha_pattern": {},
      "fan_in_fan_out": False,
      "bias": "none",
      "lora_bias": False,
      "use_dora": False,
      "modules_to_save": None,
      "init_lora_weights": True,
    }
    where = f"adapter {name!r}"
    _check_config(config, where)
    return cls(name=name, config=config, modules=_build_modules(arrays, config, where))


def _fail(where: str, msg: str):
  raise AdapterError(f"{where}: {msg}")


def _check_config(config: Any, where: str) -> None:
  """Raises AdapterError for a config we cannot apply exactly."""
  if not isinstance(config, dict):
    _fail(where, f"{CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
  peft_type = config.get("peft_type")
  if peft_type != "LORA":
    _fail(where, f"field 'peft_type'={peft_type!r} is not supported (only 'LORA')")
  for field, what in _UNSUPPORTED_FLAGS.items():
    if config.get(field):
      _fail(where, f"field {field!r}={config[field]!r} ({what}) is not supported")
  if config.get("bias", "none") != "none":
    _fail(where, f"field 'bias'={config['bias']!r} (trained biases) is not supported; only 'none'")
  init = config.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
    _fail(
      where,
      f"field 'init_lora_weights'={init!r} adapts a modified base model; "
      "convert it to a plain LoRA adapter with PEFT first",
    )
  r = config.get("r")
  if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
    _fail(where, f"field 'r' must be a positive integer, got {r!r}")
  alpha = config.get("lora_alpha", 8)  # PEFT's default
  if not isinstance(alpha, int | float) or isinstance(alpha, bool):
    _fail(where, f"field 'lora_alpha' must be a number, got {alpha!r}")
  for field in ("rank_pattern", "alpha_pattern"):
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
      _fail(where, f"field {field!r} must be an object, got {pattern!r}")
    kinds = int if field == "rank_pattern" else int | float
    for key, value in pattern.items():
      if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        _fail(where, f"field {field!r} has a bad value {value!r} for {key!r}")


def _pattern_key(pattern_keys: Iterable[str], module_path: str) -> str | None:
  """PEFT's ``get_pattern_key``: the first key matching the path's tail, or None."""
  for key in pattern_keys:
    if re.match(rf"(.*\.)?({key})$", module_path):
      return key
  return None


def _is_targeted(config: Mapping[str, Any], key: str) -> bool:
  """Whether PEFT would put a LoRA layer on module ``key`` (its
  ``check_target_module_exists``, quirks included: an exact path in a list of
  targets ignores layers_to_transform)."""
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, key):
        return False
    elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
      return False
  targets = config.get("target_modules")
  if targets is None:
    targets = list(_DEFAULT_TARGETS)
  if isinstance(targets, str):
    if targets.lower() == "all-linear":  # PEFT: every Linear except the output layer
      return key.split(".")[-1] != "lm_head"
    return re.fullmatch(targets, key) is not None
  if key in targets:
    return True
  found = any(key.endswith(f".{t}") for t in targets)
  layers = config.get("layers_to_transform")
  using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
  if not (found and using_layers):
    return found
  patterns = config.get("layers_pattern")
  match = None
  if not patterns:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  else:
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
      match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
      if match is not None:
        break
  if match is None:
    return False
  index = int(match.group("idx"))
  return index == layers if isinstance(layers, int) else index in layers


def _module_rank_alpha(config: Mapping[str, Any], path: str) -> tuple[int, float]:
  """(R, alpha) PEFT gives module ``path``, after rank_pattern / alpha_pattern."""
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  r_key = _pattern_key(rank_pattern, path)
  a_key = _pattern_key(alpha_pattern, path)
  r = rank_pattern[r_key] if r_key is not None else config["r"]
  alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
  return int(r), alpha


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
  """PEFT's scaling: alpha / R, or alpha / sqrt(R) for rsLoRA."""
  return alpha / math.sqrt(r) if use_rslora else alpha / r


def _parse_module_path(path: str) -> tuple[int | None, str]:
  m = _LAYER_MODULE.match(path)
  if m:
    return int(m.group("layer")), m.group("name")
  return None, path.rsplit(".", 1)[-1]


def _build_modules(
  arrays: Mapping[str, tuple[np.ndarray, np.ndarray]], config: Mapping, where: str
) -> dict[str, ModuleLora]:
  """Checks each (A, B) pair against the config and resolves its rank and scale.

  ``fan_in_fan_out`` needs no transpose here: PEFT stores lora_A / lora_B as
  nn.Linear weights ([R, I] / [O, R]) whatever the base layout, and only
  transposes the merged delta for Conv1D bases, which this model family lacks (PEFT
  itself resets the flag to False on nn.Linear).
  """
  modules = {}
  for path, (a, b) in sorted(arrays.items()):
    if not _is_targeted(config, path):
      _fail(
        where,
        f"holds weights for module {path}, which the config's target_modules "
        f"({config.get('target_modules')!r}) / layers_to_transform do not select; "
        "PEFT would ignore them",
      )
    for part, t in (("lora_A", a), ("lora_B", b)):
      if t.ndim != 2:
        _fail(
          where,
          f"module {path} has a {t.ndim}-d {part} of shape {tuple(t.shape)}; expected a matrix",
        )
      if not (np.issubdtype(t.dtype, np.floating) or t.dtype == ml_dtypes.bfloat16):
        _fail(where, f"module {path} has {part} of dtype {t.dtype}; expected floats")
    r, alpha = _module_rank_alpha(config, path)
    if a.shape[0] != r or b.shape[1] != r:
      _fail(
        where,
        f"module {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
        f"but the config gives it rank r={r} (r / rank_pattern)",
      )
    layer, short = _parse_module_path(path)
    modules[path] = ModuleLora(
      a=a,
      b=b,
      r=r,
      alpha=alpha,
      scale=lora_scale(r, alpha, bool(config.get("use_rslora", False))),
      layer=layer,
      module=short,
    )
  return modules


def _read_config(folder: str, where: str) -> dict[str, Any]:
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.exists(path):
    _fail(where, f"{path} not found (not a PEFT adapter folder?)")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    _fail(where, f"{path} is not valid JSON ({e})")


def _read_safetensors(path: str, where: str) -> dict[str, np.ndarray]:
  try:
    with safe_open(path, framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
  except Exception as e:  # safetensors raises its own SafetensorError
    _fail(where, f"{path} is unreadable or truncated ({e})")


def _read_pickle(path: str, where: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    _fail(where, f"{path} is a pickled torch file and torch is not installed")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    _fail(where, f"{path} could not be unpickled with weights_only=True ({e})")
  if not isinstance(state, dict):
    _fail(where, f"{path} does not hold a state dict")
  out = {}
  for k, t in state.items():
    if not isinstance(t, torch.Tensor):
      _fail(where, f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[k] = t.numpy()
  return out


def _pair_tensors(
  tensors: Mapping[str, np.ndarray], file: str, where: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """PEFT state-dict keys -> {module path: (A, B)}; anything else is an error."""
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, t in tensors.items():
    m = _KEY.match(key)
    if m is None:
      if "lora_magnitude_vector" in key:
        what = "a DoRA magnitude vector"
      elif "lora_embedding_" in key:
        what = "an embedding LoRA tensor"
      elif re.search(r"\.lora_[AB]\.bias$", key):
        what = "a LoRA bias (lora_bias)"
      else:
        what = "not a lora_A / lora_B weight"
      _fail(where, f"{file} holds tensor {key!r}: {what}, which is not supported")
    parts.setdefault(m.group("module"), {})[m.group("part")] = t
  pairs = {}
  for path, p in parts.items():
    for part in ("lora_A", "lora_B"):
      if part not in p:
        _fail(
          where,
          f"{file} has no {part} for module {path} (each module needs both lora_A and lora_B)",
        )
    pairs[path] = (p["lora_A"], p["lora_B"])
  return pairs


def load_peft_adapter(
  path: str | os.PathLike, *, name: str | None = None, allow_pickle: bool = False
) -> LoraAdapter:
  """Loads a PEFT LoRA adapter folder.

  Args:
    path: folder holding adapter_config.json and adapter_model.safetensors.
    name: the adapter's name; default the folder's name.
    allow_pickle: accept a pickled adapter_model.bin (read with torch.load and
      weights_only=True) when there is no safetensors file. Off by default: only
      unpickle files you trust.
  Raises:
    AdapterError: missing, truncated or malformed files, or unsupported features,
      naming the adapter, the file and the field.
  """
  folder = os.fspath(path)
  name = name or os.path.basename(os.path.normpath(folder))
  where = f"adapter {name!r} ({folder})"
  if not os.path.isdir(folder):
    _fail(where, "adapter folder not found")
  config = _read_config(folder, where)
  _check_config(config, where)
  st_path = os.path.join(folder, SAFETENSORS_NAME)
  pickle_path = os.path.join(folder, PICKLE_NAME)
  if os.path.exists(st_path):
    file, tensors = st_path, _read_safetensors(st_path, where)
  elif os.path.exists(pickle_path):
    if not allow_pickle:
      _fail(
        where,
        f"only a pickled {PICKLE_NAME} was found; unpickling can run arbitrary "
        "code, so it is refused. Convert it to safetensors, or pass "
        "allow_pickle=True if you trust its source",
      )
    file, tensors = pickle_path, _read_pickle(pickle_path, where)
  else:
    _fail(where, f"no {SAFETENSORS_NAME} (or {PICKLE_NAME}) in the folder")
  if not tensors:
    _fail(where, f"{file} holds no tensors")
  modules = _build_modules(_pair_tensors(tensors, file, where), config, where)
  return LoraAdapter(name=name, config=config, modules=modules)


@dataclasses.dataclass(frozen=True)
class AdapterFile:
  """A PEFT adapter folder that is read only when needed (``load``): libraries built
  from many of these stream them from disk chunk by chunk instead of holding all.

  Attributes:
    path: the folder.
    name: the adapter's name; default the folder's name.
    allow_pickle: as ``load_peft_adapter``.
  """

  path: str
  name: str | None = None
  allow_pickle: bool = False

  @property
  def adapter_name(self) -> str:
    return self.name or os.path.basename(os.path.normpath(os.fspath(self.path)))

  def load(self) -> LoraAdapter:
    return load_peft_adapter(self.path, name=self.adapter_name, allow_pickle=self.allow_pickle)

  def peek(self) -> tuple[set[str], int]:
    """(short module names it adapts, its largest rank), from adapter_config.json and
    the safetensors header alone (no tensor is read); a pickled adapter is loaded."""
    folder, name = os.fspath(self.path), self.adapter_name
    where = f"adapter {name!r} ({folder})"
    st_path = os.path.join(folder, SAFETENSORS_NAME)
    if not os.path.isdir(folder) or not os.path.exists(st_path):
      a = self.load()  # its own clear error, or a pickled adapter
      return {m.module for m in a.modules.values()}, max(m.r for m in a.modules.values())
    config = _read_config(folder, where)
    _check_config(config, where)
    try:
      with safe_open(st_path, framework="numpy") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open has no iter)
    except Exception as e:
      _fail(where, f"{st_path} is unreadable or truncated ({e})")
    paths = {m.group("module") for k in keys if (m := _KEY.match(k))}
    if not paths:
      _fail(where, f"{st_path} holds no lora_A / lora_B weights")
    ranks = [_module_rank_alpha(config, p)[0] for p in paths]
    return {_parse_module_path(p)[1] for p in paths}, max(ranks)


def _write_tensors(tensors: dict[str, np.ndarray], path: str) -> None:
  # PEFT writes format=pt; transformers' loaders check it.
  save_file(tensors, path, metadata={"format": "pt"})


def save_peft_adapter(
  adapter: LoraAdapter, path: str | os.PathLike, extra_json: Mapping[str, Any] | None = None
) -> None:
  """Writes ``adapter`` as a PEFT folder (adapter_config.json + safetensors).

  The folder is written complete under a temporary name next to ``path`` and then
  renamed into place, so a failure never leaves a half-written adapter; an existing
  folder at ``path`` is replaced only once the new one is complete.

  Args:
    extra_json: file name -> JSON-able object, written into the folder with the
      adapter (atomically with it), e.g. the record of what it was trained on.
  """
  target = os.path.abspath(os.fspath(path))
  parent, base = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  tensors = {}
  for module_path, m in adapter.modules.items():
    tensors[f"{KEY_PREFIX}{module_path}.lora_A.weight"] = np.ascontiguousarray(m.a)
    tensors[f"{KEY_PREFIX}{module_path}.lora_B.weight"] = np.ascontiguousarray(m.b)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(adapter.config, f, indent=2, sort_keys=True)
      f.write("\n")
    _write_tensors(tensors, os.path.join(tmp, SAFETENSORS_NAME))
    for name, obj in (extra_json or {}).items():
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, folder_mode())  # mkdtemp makes it 0700
    if os.path.exists(target):
      # A folder cannot be renamed over a non-empty one: move the old one aside first
      # and put it back if the swap fails.
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rmdir(old)
      os.rename(target, old)
      try:
        os.rename(tmp, target)
      except BaseException:
        os.rename(old, target)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
