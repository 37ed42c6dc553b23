"""Part: one [B, 1] decode step of the whole model per router, against the base."""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import load_avg, log, write_json
from benchmarks.routing.setup import (
  KNOW_ALPHA,
  KNOW_MODULES,
  KNOW_RANK,
  ROUTERS,
  SHAPES,
  TASK_ALPHA,
  TASK_MODULES,
  TASK_N,
  TASK_RANK,
  depth_config,
  library_bytes_per_layer,
  model_ratio,
  real_library,
  synthetic_library,
)
from lag_jax.adapters.apply import stack_lora
from lag_jax.model.kv_cache import KVCache
from lag_jax.model.transformer import CausalLM
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.routers import RouterSpec
from lag_jax.testing.libraries import random_lora

# --- timing helpers -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def _decode_step(graphdef, state, hook, tokens, positions, cache):
  """One [B, 1] decode step of the layer stack (no LM head); weights are arguments."""
  model = nnx.merge(graphdef, state)
  hidden, cache = model(tokens, positions, cache=cache, lora=hook, return_hidden=True)
  return hidden, cache


class Variant:
  """One decode configuration: a hook and its own KV cache (donated step to step)."""

  def __init__(self, name, hook, config, batch, slots):
    self.name, self.hook = name, hook
    self.cache = KVCache.zeros(config, batch, slots)
    self.steps = 1
    self.samples: list[float] = []
    self.first_s = self.warm_s = 0.0

  def run(self, graphdef, state, tokens, positions, steps):
    hidden = None
    for _ in range(steps):
      hidden, self.cache = _decode_step(graphdef, state, self.hook, tokens, positions, self.cache)
    hidden.block_until_ready()


def measure_variants(variants, graphdef, state, tokens, positions, rounds, min_s) -> None:
  """Compiles (first call), warms up, then times all variants in interleaved rounds."""
  for v in variants:
    t = time.perf_counter()
    v.run(graphdef, state, tokens, positions, 1)
    v.first_s = time.perf_counter() - t
    t = time.perf_counter()
    v.run(graphdef, state, tokens, positions, 1)
    v.warm_s = time.perf_counter() - t
    v.steps = max(1, min(50, math.ceil(min_s / max(v.warm_s, 1e-6))))
  for r in range(rounds):
    order = variants[r % len(variants) :] + variants[: r % len(variants)]
    for v in order:
      t = time.perf_counter()
      v.run(graphdef, state, tokens, positions, v.steps)
      v.samples.append((time.perf_counter() - t) / v.steps)


# --- part 1: decode -------------------------------------------------------------------


def row_plan(args, shape: str, n: int) -> int:
  """Depth for a row: the shape's cap, reduced so the knowledge library fits the budget."""
  config = SHAPES[shape]
  cap = config.num_hidden_layers if shape == "smollm2" else args.llama_layers
  per_layer = library_bytes_per_layer(config, n, KNOW_RANK, KNOW_MODULES)
  return int(min(cap, args.max_library_gb * 1e9 // per_layer))


def decode_part(args, results: dict) -> None:
  rows = results.setdefault("decode", [])
  batches = [int(b) for b in args.batches.split(",")]
  ns = [int(n) for n in args.ns.split(",")]
  slots = args.cache_len
  for shape in args.shapes.split(","):
    full = SHAPES[shape]
    models: dict[int, tuple] = {}
    for n in ns:
      depth = row_plan(args, shape, n)
      lib_gb = library_bytes_per_layer(full, n, KNOW_RANK, KNOW_MODULES) / 1e9
      if depth < 1:
        log(
          f"{shape} N={n}: skipped, one layer of the library is {lib_gb:.1f} GB > "
          f"--max_library_gb={args.max_library_gb}"
        )
        rows.append({"shape": shape, "n": n, "skipped": f"one layer needs {lib_gb:.1f} GB"})
        continue
      config = depth_config(full, depth)
      if depth not in models:
        models.clear()
        gc.collect()
        t = time.perf_counter()
        model = CausalLM(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        del model
        single = stack_lora(
          [
            random_lora(config, "single_k", KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, seed=1),
            random_lora(config, "single_t", TASK_RANK, TASK_ALPHA, TASK_MODULES, seed=2),
          ],
          config,
        )
        models[depth] = (graphdef, state, single)
        log(f"{shape}: random model at depth {depth} in {time.perf_counter() - t:.1f} s")
      graphdef, state, single = models[depth]
      t = time.perf_counter()
      real = n <= args.real_max_n
      if real:
        klib, _ = real_library(
          config, n, KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, 1000, "k", args.sig_chunk
        )
        tlib, _ = real_library(
          config, TASK_N, TASK_RANK, TASK_ALPHA, TASK_MODULES, 5000, "t", args.sig_chunk
        )
      else:
        klib = synthetic_library(config, n, KNOW_RANK, KNOW_MODULES, n, "k")
        tlib = synthetic_library(config, TASK_N, TASK_RANK, TASK_MODULES, 7, "t")
      build_s = time.perf_counter() - t
      log(
        f"{shape} N={n} depth={depth}: library {klib.nbytes() / 1e9:.2f} GB built in "
        f"{build_s:.1f} s ({'from_adapters' if real else 'synthetic'}; "
        f"{n * depth * 3 / max(build_s, 1e-9):.0f} adapter-modules/s)"
      )
      for batch in batches:
        rng = np.random.default_rng(batch)
        tokens = jnp.asarray(rng.integers(100, config.vocab_size, (batch, 1)), jnp.int32)
        positions = jnp.full((batch, 1), slots - 28, jnp.int32)
        variants = [
          Variant("base", None, config, batch, slots),
          Variant("single", single, config, batch, slots),
        ]
        for r in ROUTERS:
          spec = RouterSpec(r, k=args.k)
          hook = RoutedAdapters((routed(klib, batch, spec), routed(tlib, batch, spec)))
          variants.append(Variant(r, hook, config, batch, slots))
        load0 = load_avg()
        t = time.perf_counter()
        measure_variants(
          variants, graphdef, state, tokens, positions, args.rounds, args.min_sample_s
        )
        elapsed = time.perf_counter() - t
        base_med = statistics.median(variants[0].samples)
        row = {
          "shape": shape,
          "n": n,
          "batch": batch,
          "depth": depth,
          "k": args.k,
          "library": "from_adapters" if real else "synthetic",
          "library_gb": klib.nbytes() / 1e9,
          "load_avg": [load0, load_avg()],
          "variants": {},
        }
        base_samples = variants[0].samples
        for v in variants:
          med = statistics.median(v.samples)
          mr = model_ratio(config, v.name, n, args.k, batch, slots)
          row["variants"][v.name] = {
            "step_ms": 1e3 * med,
            "layer_ms": 1e3 * med / depth,
            # Paired: each round's time over the base's time in the same round (the
            # machine is shared; pairing cancels slow drifts in contention).
            "ratio": statistics.median(s / b for s, b in zip(v.samples, base_samples)),
            "ratio_of_medians": med / base_med,
            "model_bytes": mr["bytes"],
            "model_flops": mr["flops"],
            "compile_s": max(0.0, v.first_s - v.warm_s),
            "steps_per_sample": v.steps,
            "samples_ms": [1e3 * s for s in v.samples],
          }
        rows.append(row)
        summary = "  ".join(
          f"{name} {d['step_ms']:.1f}ms x{d['ratio']:.2f} (model {d['model_bytes']:.2f})"
          for name, d in row["variants"].items()
        )
        log(
          f"  {shape} N={n} B={batch} L={depth} [{elapsed:.0f} s, "
          f"{sum(v.steps for v in variants) * args.rounds / elapsed:.1f} steps/s, "
          f"load {load0:.1f}]: {summary}"
        )
        del variants
        gc.collect()
      del klib, tlib
      gc.collect()
      write_json(args, results)
