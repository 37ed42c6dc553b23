"""Parts: spectral signatures of N adapters, and the library's memory."""

from __future__ import annotations

import gc
import statistics
import time

import jax
import numpy as np

from benchmarks.common import log, write_json
from benchmarks.routing.setup import (
  KNOW_ALPHA,
  KNOW_MODULES,
  KNOW_RANK,
  SHAPES,
  depth_config,
  random_adapters,
)
from lag_jax.routing.library import AdapterLibrary
from lag_jax.testing.libraries import random_lora

# --- part 3: signatures -------------------------------------------------------------


def signatures_part(args, results: dict) -> None:
  """Signature build of N SmolLM2-shaped adapters through from_adapters, vs dense SVDs.

  Runs in its own process (see ``main``); compilation is done first on the first
  chunk-size + remainder adapters (the same chunk shapes), then the whole build is
  timed once. The process's peak RSS (adapters + library + from_adapters' temporaries)
  is reported by the parent.
  """
  config = SHAPES["smollm2"]
  n, L = args.sig_n, config.num_hidden_layers
  modules_total = n * L * len(KNOW_MODULES)
  res: dict = {"n": n, "layers": L, "adapter_modules": modules_total, "chunk": args.sig_chunk}
  t = time.perf_counter()
  adapters = random_adapters(config, n, KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, 0, "k")
  res["generate_adapters_s"] = time.perf_counter() - t
  warm = adapters[: min(n, args.sig_chunk + n % args.sig_chunk)]
  t = time.perf_counter()
  lib = AdapterLibrary.from_adapters(warm, config, KNOW_MODULES, chunk=args.sig_chunk)
  jax.block_until_ready(lib.weights)
  res["warmup_s"] = time.perf_counter() - t
  res["warmup_adapters"] = len(warm)
  del lib
  gc.collect()
  t = time.perf_counter()
  lib = AdapterLibrary.from_adapters(adapters, config, KNOW_MODULES, chunk=args.sig_chunk)
  jax.block_until_ready(lib.weights)
  ours = time.perf_counter() - t
  res["library_gb"] = lib.nbytes() / 1e9
  del lib
  gc.collect()
  res["ours_s"] = ours
  log(
    f"  ours: {ours:.1f} s for {modules_total} adapter-modules "
    f"({modules_total / ours:.0f}/s; compile + {len(warm)} adapters first: "
    f"{res['warmup_s']:.1f} s)"
  )
  # Dense SVD of s B A (O x I), float32, on a sample; extrapolated.
  per_module = {}
  sample = args.dense_sample
  for m in KNOW_MODULES:
    times = []
    for j in range(max(1, sample // len(KNOW_MODULES))):
      mod = adapters[j].modules[f"model.layers.{j % L}.mlp.{m}"]
      dense = (mod.b.astype(np.float32) * np.float32(mod.scale)) @ mod.a.astype(np.float32)
      t = time.perf_counter()
      np.linalg.svd(dense, full_matrices=False)
      times.append(time.perf_counter() - t)
    per_module[m] = statistics.median(times)
  dense_total = sum(per_module[m] for m in KNOW_MODULES) * n * L
  res["dense_per_matrix_s"] = per_module
  res["dense_sampled"] = max(1, sample // len(KNOW_MODULES)) * len(KNOW_MODULES)
  res["dense_extrapolated_s"] = dense_total
  res["speedup"] = dense_total / ours
  each = ", ".join(f"{m} {1e3 * s:.0f} ms" for m, s in per_module.items())
  log(
    f"  dense np.linalg.svd (float32): {each} per matrix -> {dense_total / 3600:.1f} h "
    f"extrapolated; speedup {res['speedup']:.0f}x"
  )
  results["signatures"] = res
  del adapters
  gc.collect()
  write_json(args, results)


# --- part 4: memory -----------------------------------------------------------------


def memory_part(args, results: dict) -> None:
  out = []
  n = args.memory_n
  for shape in args.shapes.split(","):
    full = SHAPES[shape]
    config = full if shape == "smollm2" else depth_config(full, 1)
    rng = np.random.default_rng(3)
    for label, ranks in (
      ("uniform rank 6", [KNOW_RANK] * n),
      ("mixed ranks 4..8", rng.integers(4, 9, n).tolist()),
    ):
      adapters = [
        random_lora(config, f"m{i}", ranks[i], 2.0 * ranks[i], KNOW_MODULES, seed=100 + i)
        for i in range(n)
      ]
      lib = AdapterLibrary.from_adapters(adapters, config, KNOW_MODULES, chunk=args.sig_chunk)
      lora_only = sum(
        config.num_hidden_layers * (o + i) * r * 4
        for r in ranks
        for o, i in (config.module_shapes()[m] for m in KNOW_MODULES)
      )
      row = {
        "shape": shape,
        "layers": config.num_hidden_layers,
        "label": label,
        "n": n,
        "ranks": ranks,
        "padded_rank": lib.rank,
        "resident_per_adapter": lib.nbytes() / n,
        "exact_per_adapter": lib.exact_nbytes() / n,
        "lora_factors_per_adapter": lora_only / n,
      }
      row["overhead"] = row["resident_per_adapter"] / row["exact_per_adapter"] - 1
      out.append(row)
      log(
        f"memory {shape} ({config.num_hidden_layers} layers) {label}: "
        f"{row['resident_per_adapter'] / 1e3:.1f} KB/adapter resident vs "
        f"{row['exact_per_adapter'] / 1e3:.1f} KB exact 2hr+arrows "
        f"(+{100 * row['overhead']:.1f}%); LoRA factors alone "
        f"{row['lora_factors_per_adapter'] / 1e3:.1f} KB"
      )
      del lib, adapters
  results["memory"] = out
  write_json(args, results)
