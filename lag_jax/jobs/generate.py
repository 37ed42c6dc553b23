"""The ``generate`` job: answer prompts with a base model and optional PEFT adapters.

Several processes (``lag_jax.distributed``): every process loads the same model,
adapters, libraries and prompts and places its own devices' shards; with a ``data``
mesh axis each feeds its own rows of the batch; all get the merged results and
process 0 alone writes them.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import os
import re

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from lag_jax import distributed
from lag_jax.adapters import load_peft_adapter, merge_into_model, stack_lora, validate_adapter
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.errors import ConfigError, DataFileError
from lag_jax.generation import generate, make_sampler
from lag_jax.generation.sampling import SamplerArgumentError
from lag_jax.jobs import common
from lag_jax.model.sharding import mesh_from_sizes
from lag_jax.routing import RoutedAdapters, RouterSpec, load_or_build_library, routed
from lag_jax.routing.library import KNOWLEDGE_MODULES, TASK_MODULES
from lag_jax.routing.offload import MANIFEST as OFFLOAD_MANIFEST
from lag_jax.routing.offload import OffloadedLibrary
from lag_jax.routing.sharded import IMPLS, shard_library
from lag_jax.routing.shared import parse_mode, remove_shared
from lag_jax.routing.spans import user_turn_span
from lag_jax.text.tokenizer import Tokenizer

SPANS = ("user", "prompt")
OFFLOADS = ("none", "host")


def _prompts(config) -> list[str]:
  """The prompts: ``config.prompts_file`` if given, else ``config.prompts``.

  Raises:
    DataFileError: the file is missing or unreadable, not UTF-8, has no prompts, or a
      .jsonl line is not an object with a non-empty string "prompt" (names the line).
    ConfigError: ``config.prompts`` is empty or holds something else than text.
  """
  if config.prompts_file:
    return _read_prompts_file(config.prompts_file)
  prompts = [config.prompts] if isinstance(config.prompts, str) else list(config.prompts)
  if not prompts:
    raise ConfigError("config field 'prompts' is empty and no 'prompts_file' is given")
  for p in prompts:
    if not isinstance(p, str) or not p.strip():
      raise ConfigError(
        f"config field 'prompts'={tuple(prompts)!r}: expected non-empty strings, got {p!r}"
      )
  return prompts


def _read_prompts_file(path: str) -> list[str]:
  """One prompt per non-blank line (.txt), or one {"prompt": ...} object per line (.jsonl)."""
  field = "config field 'prompts_file'"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataFileError(f"{field}={path!r}: cannot read it ({e.strerror or e})") from None
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8) :]
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - data.rfind(b"\n", 0, e.start)
    raise DataFileError(
      f"{field}: {path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
    ) from None
  jsonl = path.endswith(".jsonl")
  prompts = []
  # Newlines as open() reads them in text mode ('\r\n' and '\r' too).
  for line_no, line in enumerate(io.StringIO(text, newline=None), start=1):
    if not line.strip():
      continue
    if not jsonl:
      prompts.append(line.rstrip("\n"))
      continue
    where = f"{field}: {path}:{line_no}:"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFileError(f"{where} not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or "prompt" not in record:
      shown = line.strip()
      shown = shown if len(shown) <= 60 else shown[:57] + "..."
      raise DataFileError(f'{where} expected a JSON object with a "prompt" key, got {shown}')
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
      raise DataFileError(f'{where} "prompt" must be a non-empty string, got {prompt!r}')
    prompts.append(prompt)
  if not prompts:
    raise DataFileError(f"{field}: {path} has no prompts (it is empty or has only blank lines)")
  return prompts


def _check_config(config) -> None:
  """Every check that needs neither the model nor a file, so that a bad field fails
  before any work.

  Raises:
    ConfigError: naming the field, its value and what is expected.
  """
  try:
    parse_mode(config.shared_removal)
  except ValueError as e:
    raise ConfigError(
      f"config field 'shared_removal'={config.shared_removal!r}: {e} "
      "(expected 'none', 'mean:S' or 'top:S' with S >= 1)"
    ) from None
  common.dtype("param_dtype", config.param_dtype)
  common.dtype("dtype", config.dtype)
  for field, choices in (("span", SPANS), ("adapter_sharding", IMPLS), ("offload", OFFLOADS)):
    if config[field] not in choices:
      raise ConfigError(f"config field {field!r}={config[field]!r}: choose from {choices}")
  _adapter_weights(config)
  for field in ("route_layers", "vote_layers"):
    _layer_list(config[field], field)
  for field, router in _routers(config):
    _router_spec(config, router, field)
    if router == "fixed" and not config.fixed_adapter:
      raise ConfigError(
        f"config field 'fixed_adapter'={config.fixed_adapter!r}: {field} 'fixed' needs the "
        "name of the adapter to apply"
      )
  if not isinstance(config.offload_slots, int) or config.offload_slots < 0:
    raise ConfigError(
      f"config field 'offload_slots'={config.offload_slots!r}: expected an integer >= 0 "
      "(0: as many as the library has adapters)"
    )
  _sampler(config)
  n = config.generation.max_new_tokens
  if not isinstance(n, int) or n < 1:
    raise ConfigError(f"config field 'generation.max_new_tokens'={n!r}: expected an integer >= 1")


def _routers(config) -> list[tuple[str, str]]:
  """(config field, router) for the knowledge and, if set apart, the task library."""
  out = [("router", config.router)]
  if config.task_router:
    out.append(("task_router", config.task_router))
  return out


def _adapter_weights(config) -> list[float] | None:
  """``config.adapter_weights`` as floats, one per adapter (None: not given)."""
  weights = common.float_list("adapter_weights", config.adapter_weights)
  n = len(common.split_list(config.adapters))
  if weights and len(weights) != n:
    raise ConfigError(
      f"config field 'adapter_weights'={config.adapter_weights!r}: {len(weights)} "
      f"value{'s' if len(weights) != 1 else ''} for {n} adapters "
      f"(config field 'adapters'={config.adapters!r})"
    )
  return weights or None


def _sampler(config):
  """The sampler of ``config.generation``; ``make_sampler`` checks the values."""
  g = config.generation
  try:
    return make_sampler(g.sampler, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  except SamplerArgumentError as e:
    raise ConfigError(f"config field 'generation.{e.argument}'={e.value!r}: {e}") from None


def _check_layers(config, num_layers: int) -> None:
  """route_layers / vote_layers hold layers of the model (``num_layers`` deep)."""
  for field in ("route_layers", "vote_layers"):
    layers = _layer_list(config[field], field)
    if layers is not None and max(layers) >= num_layers:
      raise ConfigError(
        f"config field {field!r}={config[field]!r}: layer {max(layers)} is outside the "
        f"model's {num_layers} layers (0 to {num_layers - 1})"
      )


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Loads model, tokenizer and adapters, generates, writes ``generations.json``."""
  _check_config(config)  # a bad field fails before any work
  texts = _prompts(config)
  sampler = _sampler(config)
  # Process 0 first: the first use converts / writes the checkpoint into the cache.
  folder = distributed.primary_first(
    lambda: common.resolve_checkpoint(config.checkpoint), "resolve_checkpoint"
  )
  mesh = mesh_from_sizes(dict(config.mesh))
  rules = dict(config.sharding_rules)
  model = load_model(
    folder,
    param_dtype=common.dtype("param_dtype", config.param_dtype),
    dtype=common.dtype("dtype", config.dtype),
    mesh=mesh,
    rules=rules,
  )
  _check_layers(config, model.config.num_hidden_layers)
  tokenizer = Tokenizer.from_dir(folder)

  adapters = [
    load_peft_adapter(p, allow_pickle=config.allow_pickle)
    for p in common.split_list(config.adapters)
  ]
  weights = _adapter_weights(config)
  for a in adapters:
    validate_adapter(a, model.config)
  lora = None
  if adapters and config.merge_adapters:
    model = merge_into_model(model, adapters, weights)
  elif adapters:
    lora = stack_lora(adapters, model.config, weights)

  split = mesh is not None and mesh.shape.get(rules.get("adapter"), 1) > 1
  libraries = _libraries(config, model.config, len(texts), host=split)
  if split:
    libraries = [(_shard(lib, mesh, rules, config), s, f) for lib, s, f in libraries]
  if config.chat_template:
    # The user turn's tokens: the span request-level routers count (config.span).
    prompt_ids, user_spans = [], []
    for t in texts:
      try:
        _, ids, span = user_turn_span(tokenizer, t, config.system_prompt)
      except ValueError:  # the template rewrote the message: count the whole prompt
        logging.warning("User turn not found in the chat prompt of %r: span = prompt", t[:40])
        messages = [{"role": "user", "content": t}]
        if config.system_prompt:
          messages.insert(0, {"role": "system", "content": config.system_prompt})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        span = np.ones(len(ids), bool)
      prompt_ids.append(ids)
      user_spans.append(span)
  else:
    prompt_ids = [tokenizer.encode(t) for t in texts]
    user_spans = [np.ones(len(ids), bool) for ids in prompt_ids]
  if libraries:
    spans = user_spans if config.span == "user" else None
    hook = RoutedAdapters(
      tuple(
        routed(lib, len(texts), spec, fixed_ids=fixed, span=spans if spec.request_level else None)
        for lib, spec, fixed in libraries
      ),
      static=lora,
    )
    lora = hook
  g = config.generation
  out = generate(
    model,
    prompt_ids,
    max_new_tokens=g.max_new_tokens,
    sampler=sampler,
    stop_tokens=tokenizer.eos_token_ids,
    seed=g.seed,
    lora=lora,
    return_routing=bool(libraries) and config.save_routing,
    batch_sharding=_batch_sharding(mesh, rules),
  )
  primary = distributed.is_primary()
  results = []
  for text, ids, reason in zip(texts, out.tokens, out.finish_reason, strict=True):
    reply = tokenizer.decode(ids, skip_special_tokens=True)
    results.append(
      {"prompt": text, "completion": reply, "finish_reason": reason, "num_tokens": len(ids)}
    )
    if primary:
      print(f"\n>>> {text}\n{reply}")
  logging.info(
    "Prefill %.2fs (%d pass%s), decode %.2fs for %d steps",
    out.prefill_s,
    out.prefill_passes,
    "" if out.prefill_passes == 1 else "es",
    out.decode_s,
    out.num_decode_steps,
  )
  if not primary:
    logging.info("Process %d: process 0 writes the outputs", jax.process_index())
    return results
  common.write_json_atomic(os.path.join(workdir, "generations.json"), results)
  if out.routing is not None:
    _save_routing(
      os.path.join(workdir, "routing.npz"), out.routing, [lib for lib, _, _ in libraries]
    )
  return results


def _libraries(config, model_config, num_prompts: int, host=False):
  """(library, router, fixed ids) for each library the config names; ``host``: saved
  libraries stay in host memory until they are sharded."""
  out = []
  task_field = "task_router" if config.task_router else "router"
  for field, router_field, modules in (
    ("library", "router", KNOWLEDGE_MODULES),
    ("task_library", task_field, TASK_MODULES),
  ):
    router = config[router_field]
    path = getattr(config, field)
    if not path:
      continue
    folder = distributed.primary_first(functools.partial(common.resolve_adapters_dir, path), field)
    if os.path.exists(os.path.join(folder, OFFLOAD_MANIFEST)):  # an offloaded library
      lib = OffloadedLibrary.open(folder, slots=config.offload_slots or None)
    else:
      lib = load_or_build_library(
        folder, model_config, modules, allow_pickle=config.allow_pickle, host=host
      )
    offloaded = isinstance(lib, OffloadedLibrary) or (
      field == "library" and config.offload == "host"
    )
    if offloaded and host:
      raise ConfigError(
        f"config field {field!r}: an offloaded library (offload={config.offload!r}, or a "
        "folder written by save_offloaded) with mesh.adapter > 1: a library is either split "
        "over devices (each holds its shard resident) or kept on the host behind one "
        "device's cache; choose one"
      )
    if field == "library":
      lib, _ = remove_shared(lib, config.shared_removal)
      if config.offload == "host" and not isinstance(lib, OffloadedLibrary):
        lib = _offload(lib, config)
    spec = _router_spec(config, router, router_field)
    fixed = None
    if router == "fixed":
      if config.fixed_adapter not in lib.names:
        raise ConfigError(
          f"config field 'fixed_adapter'={config.fixed_adapter!r} is not in "
          f"{field} (names: {list(lib.names)[:5]} ...)"
        )
      fixed = [config.fixed_adapter] * num_prompts
    out.append((lib, spec, fixed))
  return out


_LAYERS_EXPECTED = "expected layer indices like '0-9+20-29' or '0,1,2'"
_LAYER_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def _layer_list(value, field: str = "route_layers"):
  """'0-9+20-29' (or '0,1,2' as a tuple) -> a tuple of layer indices; '' -> None.

  Raises:
    ConfigError: naming ``field`` if ``value`` is not such a list (or a range runs
      backwards).
  """
  listed = isinstance(value, tuple | list)
  text = ",".join(map(str, value)) if listed else str(value).strip()
  if not text:
    return None
  parts = [p for p in text.replace(",", "+").split("+") if p.strip()]
  if not parts:
    raise ConfigError(f"config field {field!r}={value!r}: {_LAYERS_EXPECTED}")
  out = []
  for part in parts:
    m = _LAYER_RANGE.fullmatch(part)
    if m is None:
      raise ConfigError(f"config field {field!r}={value!r}: {_LAYERS_EXPECTED}")
    lo, hi = int(m[1]), int(m[2] or m[1])
    if hi < lo:
      raise ConfigError(
        f"config field {field!r}={value!r}: {_LAYERS_EXPECTED} (the range {part.strip()!r} "
        "runs backwards)"
      )
    out += range(lo, hi + 1)
  return tuple(out)


# RouterSpec argument -> the config field that sets it.
_SPEC_FIELDS = {
  "k": "k",
  "temperature": "temperature",
  "projection": "projection",
  "vote_scope": "vote_scope",
  "vote_score": "vote_score",
  "vote_top_m": "vote_top_m",
  "vote_layers": "vote_layers",
  "vote_modules": "vote_modules",
  "vote_finalists": "vote_finalists",
  "gate": "gate",
  "gate_fallback": "gate_fallback",
  "layers": "route_layers",
}


def _router_spec(config, router: str, field: str = "router") -> RouterSpec:
  """The config's RouterSpec for ``router`` (set by config field ``field``); gate /
  route_layers only where they apply (lag and request_lag), so a task router of another
  kind is unaffected.

  Raises:
    ConfigError: RouterSpec refuses a value; names the config field that holds it.
  """
  gated = router in ("lag", "request_lag")
  modules = tuple(m.strip() for m in config.get("vote_modules", "").split("+") if m.strip())
  kwargs = dict(
    k=config.k,
    temperature=config.temperature,
    projection=config.projection,
    vote_scope=config.vote_scope,
    vote_score=config.vote_score,
    vote_top_m=config.vote_top_m,
    vote_layers=_layer_list(config.vote_layers, "vote_layers"),
    vote_modules=modules or None,
    # Two rounds are a vote's: a task router of another kind is unaffected.
    vote_finalists=config.get("vote_finalists", 0) if router == "vote" else 0,
    gate=config.gate if gated else 0.0,
    gate_fallback=config.gate_fallback,
    layers=_layer_list(config.route_layers, "route_layers") if gated else None,
  )
  try:
    return RouterSpec(router, **kwargs)
  except (TypeError, ValueError) as e:
    error = e
  # Which field: RouterSpec's checks, one argument at a time against its defaults.
  try:
    RouterSpec(router)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config field {field!r}={router!r}: {e}") from None
  for arg, name in _SPEC_FIELDS.items():
    try:
      RouterSpec(router, **{arg: kwargs[arg]})
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config field {name!r}={config[name]!r}: {e}") from None
  raise ConfigError(f"config field {field!r}={router!r}: {error}") from None


def _offload(library, config):
  """The knowledge library with its factors moved to host memory (offload='host')."""
  olib = OffloadedLibrary.from_library(library, slots=config.offload_slots or None)
  logging.info(
    "Library of %d adapters offloaded to host memory (%.2f MB on the host, %.2f MB on the "
    "device with %d cache slots per module)",
    len(library),
    olib.host_nbytes() / 1e6,
    sum(olib.device_nbytes().values()) / 1e6,
    olib.slots["a"],
  )
  return olib


def _batch_sharding(mesh, rules):
  """Rows of the batch split over the rules' ``batch`` axis, when the mesh has it."""
  axis = rules.get("batch")
  if mesh is None or mesh.shape.get(axis, 1) == 1:
    return None
  return NamedSharding(mesh, PartitionSpec(axis))


def _shard(library, mesh, rules, config):
  sharded = shard_library(library, mesh, rules, impl=config.adapter_sharding)
  per_device = max(sharded.nbytes_per_device().values())
  logging.info(
    "Library of %d adapters (%s) sharded over %d devices: %d per device, %.2f MB per device",
    len(library),
    ",".join(library.modules),
    sharded.sharding.size,
    sharded.padded_size // sharded.sharding.size,
    per_device / 1e6,
  )
  return sharded


def _save_routing(path, routing, libraries):
  """routing: module -> tuple over libraries of [num_prompts, L, T] chosen ids."""
  arrays = {}
  for module, per_lib in routing.items():
    # The telemetry tuple holds only the libraries that adapt this module, in order.
    holders = [i for i, lib in enumerate(libraries) if module in lib.modules]
    for i, ids in zip(holders, per_lib, strict=True):
      arrays[f"lib{i}/{module}"] = ids
  for i, lib in enumerate(libraries):
    arrays[f"lib{i}/names"] = np.asarray(lib.names)
  with common.atomic_write(path, "wb") as f:
    np.savez_compressed(f, **arrays)
