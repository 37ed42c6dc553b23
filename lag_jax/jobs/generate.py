"""The ``generate`` job: answer prompts with a base model and optional PEFT adapters.

Several processes (``lag_jax.distributed``): every process loads the same model,
adapters, libraries and prompts and places its own devices' shards; with a ``data``
mesh axis each feeds its own rows of the batch; all get the merged results and
process 0 alone writes them.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from lag_jax import distributed
from lag_jax.adapters import load_peft_adapter, merge_into_model, stack_lora, validate_adapter
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.generation import generate, make_sampler
from lag_jax.jobs import common
from lag_jax.model.sharding import mesh_from_sizes
from lag_jax.routing import RoutedAdapters, RouterSpec, load_or_build_library, routed
from lag_jax.routing.library import KNOWLEDGE_MODULES, TASK_MODULES
from lag_jax.routing.sharded import shard_library
from lag_jax.routing.shared import parse_mode, remove_shared
from lag_jax.routing.spans import user_turn_span
from lag_jax.text.tokenizer import Tokenizer


def _prompts(config) -> list[str]:
  if config.prompts_file:
    with open(config.prompts_file) as f:
      lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    if config.prompts_file.endswith(".jsonl"):
      return [json.loads(ln)["prompt"] for ln in lines]
    return lines
  prompts = list(config.prompts)
  if not prompts:
    raise ValueError("config field 'prompts' is empty and no 'prompts_file' is given")
  return prompts


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Loads model, tokenizer and adapters, generates, writes ``generations.json``."""
  parse_mode(config.shared_removal)  # a bad value fails before any work
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
  tokenizer = Tokenizer.from_dir(folder)

  adapters = [
    load_peft_adapter(p, allow_pickle=config.allow_pickle)
    for p in common.split_list(config.adapters)
  ]
  weights = [float(w) for w in common.split_list(config.adapter_weights)] or None
  if weights is not None and len(weights) != len(adapters):
    raise ValueError(
      f"config field 'adapter_weights' has {len(weights)} values for {len(adapters)} adapters"
    )
  for a in adapters:
    validate_adapter(a, model.config)
  lora = None
  if adapters and config.merge_adapters:
    model = merge_into_model(model, adapters, weights)
  elif adapters:
    lora = stack_lora(adapters, model.config, weights)

  texts = _prompts(config)
  split = mesh is not None and mesh.shape.get(rules.get("adapter"), 1) > 1
  libraries = _libraries(config, model.config, host=split)
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
  if config.span not in ("user", "prompt"):
    raise ValueError(f"config field 'span'={config.span!r}: choose 'user' or 'prompt'")
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
  sampler = make_sampler(
    g.sampler,
    temperature=g.temperature,
    top_k=g.top_k or None,
    top_p=g.top_p if g.top_p < 1.0 else None,
  )
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


def _libraries(config, model_config, host=False):
  """(library, router, fixed ids) for each library the config names; ``host``: saved
  libraries stay in host memory until they are sharded."""
  out = []
  for field, router, modules in (
    ("library", config.router, KNOWLEDGE_MODULES),
    ("task_library", config.task_router or config.router, TASK_MODULES),
  ):
    path = getattr(config, field)
    if not path:
      continue
    folder = distributed.primary_first(functools.partial(common.resolve_adapters_dir, path), field)
    lib = load_or_build_library(
      folder, model_config, modules, allow_pickle=config.allow_pickle, host=host
    )
    if field == "library":
      lib, _ = remove_shared(lib, config.shared_removal)
    spec = _router_spec(config, router)
    fixed = None
    if router == "fixed":
      if config.fixed_adapter not in lib.names:
        raise ValueError(
          f"config field 'fixed_adapter'={config.fixed_adapter!r} is not in "
          f"{field} (names: {list(lib.names)[:5]} ...)"
        )
      fixed = [config.fixed_adapter] * len(_prompts(config))
    out.append((lib, spec, fixed))
  return out


def _layer_list(value: str):
  """'0-9+20-29' (or '0,1,2' as a tuple) -> a tuple of layer indices; '' -> None."""
  if isinstance(value, tuple | list):
    return tuple(int(v) for v in value) or None
  out = []
  for part in filter(None, str(value).replace(",", "+").split("+")):
    lo, _, hi = part.partition("-")
    out += list(range(int(lo), int(hi or lo) + 1))
  return tuple(out) or None


def _router_spec(config, router: str) -> RouterSpec:
  """The config's RouterSpec for ``router``; gate / route_layers only where they apply
  (lag and request_lag), so a task router of another kind is unaffected."""
  gated = router in ("lag", "request_lag")
  return RouterSpec(
    router,
    k=config.k,
    temperature=config.temperature,
    projection=config.projection,
    vote_scope=config.vote_scope,
    vote_score=config.vote_score,
    vote_top_m=config.vote_top_m,
    vote_layers=_layer_list(config.vote_layers),
    gate=config.gate if gated else 0.0,
    gate_fallback=config.gate_fallback,
    layers=_layer_list(config.route_layers) if gated else None,
  )


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
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
