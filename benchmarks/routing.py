"""Routing benchmarks: decode-step cost of Arrow / LAG / SpectR against the cost model,
against PEFT's Arrow, signature build time and library memory (issue 3, items 1-4).

Run from the repository root (the malloc settings keep glibc from returning and
re-faulting large buffers between steps, which makes CPU timings erratic here):

  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
  MALLOC_TOP_PAD_=1073741824 python -m benchmarks.routing

The default took about 20 minutes on 2 cores before the prefill part and the extra
profile rows were added. The full sweep (adds the 3B-shaped slice
at N = 10,000 with a one-layer 8.7 GB library, 9 rounds, PEFT's loading timed for 15 min):

  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
  MALLOC_TOP_PAD_=1073741824 python -m benchmarks.routing --full

Parts (``--parts``, comma-separated):
  memory      resident library bytes per adapter against the exact 2 h r count (+ arrows),
              uniform rank 6 and mixed ranks 4..8 (padded to 8).
  signatures  spectral signatures of N = 1000 SmolLM2-shaped rank-6 adapters on
              gate/up/down (30 layers) through ``AdapterLibrary.from_adapters``, against a
              dense SVD of s B A timed on a sample of adapter-modules and extrapolated.
  decode      one [B, 1] decode step with a 128-slot KV cache, jitted with the weights,
              the library and the cache as arguments (nnx.split; never closed over), for
              base / single LoRA / Arrow (hard) / LAG (k = 20) / SpectR, interleaved rounds,
              medians; measured ratio to base next to the cost-model ratio (LAG.md).
              The layer stack is timed (``return_hidden=True``: embedding, L layers, final
              norm; no LM head), so the 3B slice uses a reduced vocabulary (4096).
  profile     per-op micro-benchmarks of one layer's routed modules at decode shapes
              ([B, 1]): arrow scores, top-k, the library's candidate projections
              (``gather_adapters``, ``project_all``), apply, whole routers (``route_lag``
              with each projection), and the previous block gather / 4-D einsum for
              comparison, to explain the decode ratios.
  prefill     one layer's LAG routing (gate/up/down, SmolLM2 shapes) for a [1, T] prefill
              at N = 100 and 1000: ``route_lag`` with projection gather / dense / auto (and
              grouped where it is affordable on CPU), against the arrow scores alone.
  peft        our ``arrow_softmax`` (top_k 3) against PEFT's ``create_arrow_model`` on the
              real packaged SmolLM2, same prompts, greedy, tokens/s.

Random libraries. Knowledge libraries larger than ``--real_max_n`` adapters are built
directly as ``LibraryWeights`` (A* rows random and unit-norm, B* random, arrows = A*[:, 0]):
routing cost does not depend on the values. The smaller ones go through PEFT-style
adapters (``random_lora``) and ``AdapterLibrary.from_adapters`` (the real path); the
table marks which. Depths are reduced where a library would exceed
``--max_library_gb``; each row states its depth, and ratios compare equal depths.

Every unit of work (signatures, memory, each decode and profile row, prefill, PEFT) runs
in its own spawned process, so multi-GB libraries are returned to the OS in between (with
the malloc settings above glibc keeps freed heap memory); ``--child_timeout_s`` bounds
each unit's wall time (a unit past it is killed and recorded as failed).

Writes benchmarks/results/routing.json, benchmarks/results/routing.png and the section
between ``<!-- routing:begin -->`` and ``<!-- routing:end -->`` of BENCHMARKS.md
(``--render`` rewrites the section and the plot from the JSON without measuring).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import multiprocessing
import os
import pathlib
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.sections import write_section
from lag_jax.adapters.apply import stack_lora
from lag_jax.model.config import ModelConfig
from lag_jax.model.kv_cache import KVCache
from lag_jax.model.transformer import ATTENTION_MODULES, MLP_MODULES, CausalLM
from lag_jax.routing import core
from lag_jax.routing.core import arrow_scores, project_all
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.routers import LayerLibrary, RouterSpec
from lag_jax.testing.libraries import module_shapes, random_library, random_lora


def route_lag(x, ll, allowed, k, projection="auto"):
  """The paper's LAG at one module (the routing core's decision and apply)."""
  return core.apply_hard(ll, core.lag_decision(ll, x, None, allowed, k, projection))


def route_arrow(x, ll, allowed):
  return core.route_arrow(ll, x, allowed)


def route_spectr(x, ll, allowed):
  return core.route_spectr(ll, x, None, allowed)


def _project_candidates(x, a, cand, projection):
  del projection  # the gather path
  return core.contract(x, core.gather_adapters(a, cand))


def _apply_selected(z, b, sel):
  return jnp.einsum("btr,btor->bto", z, b[sel].astype(z.dtype))


ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- routing:begin -->", "<!-- routing:end -->"
KNOW_MODULES, TASK_MODULES = MLP_MODULES, ATTENTION_MODULES
KNOW_RANK, KNOW_ALPHA, TASK_RANK, TASK_ALPHA, TASK_N = 6, 12.0, 8, 16.0, 5
ROUTERS = ("arrow", "lag", "spectr")
LABELS = {
  "base": "base",
  "single": "single LoRA",
  "arrow": "Arrow (hard)",
  "lag": "LAG",
  "spectr": "SpectR",
}

SHAPES = {
  # SmolLM2-135M: the real architecture; random weights (values do not change timing).
  "smollm2": ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
  ),
  # Llama-3.2-3B widths; a slice of a few layers; vocabulary reduced (no LM head timed).
  "llama3b": ModelConfig(
    model_type="llama",
    vocab_size=4096,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    tie_word_embeddings=True,
  ),
}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--full",
    action="store_true",
    help="full sweep: 3B slice at N=10000 (1 layer, 8.7 GB), 9 rounds, PEFT load cap 900 s",
  )
  p.add_argument("--parts", default="memory,signatures,decode,profile,prefill,peft")
  p.add_argument(
    "--render",
    action="store_true",
    help="only rewrite the markdown section and the plot from the existing --json file",
  )
  p.add_argument("--shapes", default="smollm2,llama3b")
  p.add_argument("--ns", default="10,100,1000,10000", help="knowledge library sizes")
  p.add_argument("--batches", default="1,16")
  p.add_argument("--k", type=int, default=20, help="LAG candidates")
  p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median)")
  p.add_argument(
    "--min_sample_s",
    type=float,
    default=0.25,
    help="each timing sample runs enough steps to last about this long",
  )
  p.add_argument(
    "--max_library_gb",
    type=float,
    default=5.0,
    help="knowledge-library budget per row; depth is reduced to fit",
  )
  p.add_argument("--llama_layers", type=int, default=2, help="depth cap of the 3B slice")
  p.add_argument("--cache_len", type=int, default=128, help="KV cache slots")
  p.add_argument(
    "--real_max_n",
    type=int,
    default=100,
    help="libraries up to this N go through from_adapters (the real path)",
  )
  p.add_argument("--sig_n", type=int, default=1000)
  p.add_argument("--sig_chunk", type=int, default=64, help="from_adapters chunk")
  p.add_argument(
    "--dense_sample",
    type=int,
    default=20,
    help="adapter-modules timed with a dense SVD (then extrapolated)",
  )
  p.add_argument(
    "--child_timeout_s",
    type=float,
    default=6 * 3600.0,
    help="wall-clock limit of each unit's child process (a safety net; past it the unit "
    "is killed and recorded as failed)",
  )
  p.add_argument("--memory_n", type=int, default=20)
  p.add_argument("--profile_reps", type=int, default=5)
  p.add_argument(
    "--profile_layers",
    type=int,
    default=8,
    help="layers scanned in the per-op profile (data streams from memory)",
  )
  p.add_argument("--prefill_ns", default="100,1000", help="library sizes of the prefill part")
  p.add_argument("--prefill_t", type=int, default=128, help="prefill length T")
  p.add_argument(
    "--prefill_grouped_ns",
    default="100",
    help="N at which the prefill part also times projection='grouped' (XLA:CPU lowers "
    "ragged_dot densely: hundreds of times slower)",
  )
  p.add_argument(
    "--prefill_grouped_max_s",
    type=float,
    default=20.0,
    help="skip the grouped projection if one call takes longer than this",
  )
  p.add_argument("--peft_ns", default="10,100")
  p.add_argument(
    "--peft_try_n",
    type=int,
    default=1000,
    help="time PEFT's adapter loading towards this N under --peft_cap_s (0: skip)",
  )
  p.add_argument("--peft_cap_s", type=float, default=150.0)
  p.add_argument("--peft_top_k", type=int, default=3)
  p.add_argument("--peft_prompt_len", type=int, default=16)
  p.add_argument("--peft_new_tokens", type=int, default=16)
  p.add_argument("--peft_runs", type=int, default=5)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  p.add_argument(
    "--markdown",
    default=str(ROOT / "BENCHMARKS.md"),
    help="file whose routing section is rewritten; '' to skip",
  )
  p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "routing.json"))
  p.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "routing.png"))
  args = p.parse_args(argv)
  if args.full:
    args.max_library_gb = max(args.max_library_gb, 9.0)
    args.rounds = max(args.rounds, 9)
    args.peft_cap_s = max(args.peft_cap_s, 900.0)
  return args


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> float:
  return os.getloadavg()[0]


# --- cost model (LAG.md) ------------------------------------------------------------


def base_cost(config: ModelConfig, batch: int, slots: int) -> tuple[float, float]:
  """(FLOPs, bytes moved) of one decode step of one layer without adapters.

  Every weight is read once per step (shared by the batch); each token does 2 O I
  FLOPs per module, and attention over ``slots`` cache slots (2 H E S for scores, the
  same for the weighted sum) reading its own K and V (2 S K E floats).
  """
  shapes = config.module_shapes()
  weights = sum(o * i for o, i in shapes.values())
  H, K, E = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  flops = batch * (2 * weights + 4 * H * E * slots)
  moved = 4 * weights + batch * 4 * 2 * slots * K * E
  return float(flops), float(moved)


def module_cost(
  router: str, n: int, r: int, k: int, O: int, I: int, batch: int
) -> tuple[float, float]:
  """Extra (FLOPs, bytes) per decode step at one module, from LAG.md's table.

  FLOPs per token: Arrow 2 n h (+ one adapter, 2 r (h + O)); SpectR 2 n h r (+ 2 r O);
  LAG 2 h (n + r k) (+ 2 r O). Bytes: arrows / the whole A* are shared by the batch
  (n h, resp. n r h floats); gathered candidates are per token, at most the library.
  """
  k = min(k, n)
  if router == "single":
    return float(batch * 2 * r * (I + O)), float(4 * r * (I + O))
  if router == "arrow":
    return (
      float(batch * (2 * n * I + 2 * r * (I + O))),
      float(4 * n * I + min(n, batch) * 4 * r * (I + O)),
    )
  if router == "lag":
    return (
      float(batch * (2 * I * (n + r * k) + 2 * r * O)),
      float(4 * n * I + min(n, batch * k) * 4 * r * I + min(n, batch) * 4 * r * O),
    )
  if router == "spectr":
    return (
      float(batch * (2 * n * r * I + 2 * r * O)),
      float(4 * n * r * I + min(n, batch) * 4 * r * O),
    )
  raise ValueError(router)


def model_ratio(config: ModelConfig, variant: str, n: int, k: int, batch: int, slots: int) -> dict:
  """Cost-model step-time ratio to base (FLOPs and bytes versions), per layer."""
  f0, b0 = base_cost(config, batch, slots)
  shapes = config.module_shapes()
  if variant == "base":
    return {"flops": 1.0, "bytes": 1.0}
  f, b = f0, b0
  for m in KNOW_MODULES:
    O, I = shapes[m]
    df, db = module_cost("single" if variant == "single" else variant, n, KNOW_RANK, k, O, I, batch)
    f, b = f + df, b + db
  for m in TASK_MODULES:
    O, I = shapes[m]
    df, db = module_cost(
      "single" if variant == "single" else variant, TASK_N, TASK_RANK, k, O, I, batch
    )
    f, b = f + df, b + db
  return {"flops": f / f0, "bytes": b / b0}


def library_bytes_per_layer(config: ModelConfig, n: int, rank: int, modules) -> int:
  """Resident float32 bytes of one layer of a library: A*, B*, arrows, valid."""
  shapes = config.module_shapes()
  return sum(n * (4 * ((shapes[m][0] + shapes[m][1]) * rank + shapes[m][1]) + 1) for m in modules)


# --- libraries ----------------------------------------------------------------------


def depth_config(config: ModelConfig, depth: int) -> ModelConfig:
  return dataclasses.replace(config, num_hidden_layers=depth)


def synthetic_library(config, n, rank, modules, seed, prefix) -> AdapterLibrary:
  """A library of ``n`` random adapters built directly as LibraryWeights (random unit
  rows of A*, small random B*; only the shapes matter for timing)."""
  shapes = module_shapes(config, modules)
  return random_library(
    n, shapes, config.num_hidden_layers, rank=rank, seed=seed, orthonormal=False, prefix=prefix
  )


def random_adapters(
  config: ModelConfig, n: int, rank: int, alpha: float, modules, seed: int, prefix: str, ranks=None
):
  return [
    random_lora(
      config, f"{prefix}{i}", rank if ranks is None else ranks[i], alpha, modules, seed=seed + i
    )
    for i in range(n)
  ]


def real_library(
  config: ModelConfig, n: int, rank: int, alpha: float, modules, seed: int, prefix: str, chunk: int
) -> tuple[AdapterLibrary, float]:
  """PEFT-style random adapters through AdapterLibrary.from_adapters; (library, build s)."""
  adapters = random_adapters(config, n, rank, alpha, modules, seed, prefix)
  t = time.perf_counter()
  lib = AdapterLibrary.from_adapters(adapters, config, modules, chunk=chunk)
  jax.block_until_ready(lib.weights)
  return lib, time.perf_counter() - t


# --- child processes ----------------------------------------------------------------


def run_child(target, timeout_s: float, **kwargs) -> tuple[dict | None, str | None]:
  """Runs ``target(out_path, **kwargs)`` in a spawned process.

  Returns (result, None), or (None, reason) if it timed out or failed.
  """
  ctx = multiprocessing.get_context("spawn")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    proc = ctx.Process(target=target, args=(out,), kwargs=kwargs)
    t = time.perf_counter()
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
      proc.kill()
      proc.join()
      log(f"child {target.__name__} did not finish in {timeout_s:.0f} s: killed")
      return None, f"timeout ({timeout_s:.0f} s)"
    if proc.exitcode != 0 or not os.path.exists(out):
      log(f"child {target.__name__} failed (exit code {proc.exitcode})")
      return None, f"exit code {proc.exitcode}"
    with open(out) as f:
      res = json.load(f)
    res["wall_s"] = time.perf_counter() - t
    return res, None


# --- timing helpers -----------------------------------------------------------------


def time_fn(fn, min_s: float, reps: int, limit_s: float | None = None) -> dict:
  """Median seconds per call of ``fn()`` (which must block), over ``reps`` samples.

  With ``limit_s``, a first (compiling) or second call slower than that ends it early:
  the result then has ``skipped`` (why) instead of ``median_s``.
  """
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  if limit_s is not None and first > limit_s:
    return {
      "skipped": f"first call (with compile) took {first:.1f} s > {limit_s:g} s",
      "first_s": first,
    }
  t = time.perf_counter()
  fn()
  warm = time.perf_counter() - t
  if limit_s is not None and warm > limit_s:
    return {"skipped": f"a call took {warm:.1f} s > {limit_s:g} s", "first_s": first}
  calls = max(1, min(200, math.ceil(min_s / max(warm, 1e-6))))
  samples = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(calls):
      fn()
    samples.append((time.perf_counter() - t) / calls)
  return {
    "median_s": statistics.median(samples),
    "samples_s": samples,
    "first_s": first,
    "calls": calls,
  }


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


# --- per-op profile -------------------------------------------------------------------


def _scan_layers(fn, stacked, *shared):
  """Runs fn(layer_slice, *shared) for every layer of ``stacked`` (leading L) in a scan,
  as the decoder does, so every op streams its data from memory as in a decode step."""

  def body(carry, layer):
    return carry, fn(layer, *shared)

  return jax.lax.scan(body, 0, stacked)[1]


def _lib_list(a, b, arrows, valid):
  return [LayerLibrary(*t) for t in zip(a, b, arrows, valid, strict=True)]


@jax.jit
def _op_base(ws, xin):
  return _scan_layers(
    lambda w, xin: [jnp.einsum("bti,oi->bto", x, wi) for x, wi in zip(xin, w)], ws, xin
  )


@jax.jit
def _op_scores(arrows, xin, allowed):
  return _scan_layers(
    lambda ar, xin, allowed: [
      arrow_scores(x, LayerLibrary(None, None, ai, None), allowed) for x, ai in zip(xin, ar)
    ],
    arrows,
    xin,
    allowed,
  )


@functools.partial(jax.jit, static_argnames="k")
def _op_topk(scores, k):
  return _scan_layers(lambda s: [jax.lax.top_k(si, k)[1] for si in s], scores)


@jax.jit
def _op_gather(layer_xs, xin):
  """route_lag's candidate projection with projection='gather' (the library's code path:
  ``gather_adapters``, rows of A* viewed as [N R, I], then A*_c x)."""
  return _scan_layers(
    lambda t, xin: [_project_candidates(x, a, c, "gather") for x, a, c in zip(xin, *t)],
    layer_xs,
    xin,
  )


@jax.jit
def _op_project_all(a, xin):
  """The library's projection onto all N adapters (``project_all``: one 2-D matmul)."""
  return _scan_layers(lambda al, xin: [project_all(x, ai) for x, ai in zip(xin, al)], a, xin)


@jax.jit
def _op_prev_gather_block(layer_xs, xin):
  """Previous implementation, for comparison: the [N, R, I] blocks indexed directly."""
  return _scan_layers(
    lambda t, xin: [jnp.einsum("bti,btcri->btcr", x, a[c]) for x, a, c in zip(xin, *t)],
    layer_xs,
    xin,
  )


@jax.jit
def _op_prev_project_4d(a, xin):
  """Previous implementation, for comparison: the 4-D einsum 'bti,nri->btnr'."""
  return _scan_layers(
    lambda al, xin: [jnp.einsum("bti,nri->btnr", x, ai) for x, ai in zip(xin, al)], a, xin
  )


@jax.jit
def _op_apply(layer_xs):
  return _scan_layers(lambda t: [_apply_selected(z, b, s) for z, b, s in zip(*t)], layer_xs)


@functools.partial(jax.jit, static_argnames=("name", "k", "projection"))
def _op_router(lib_xs, xin, allowed, name, k, projection="auto"):
  def fn(t, xin, allowed):
    libs = _lib_list(*t)
    if name == "lag":
      return [route_lag(x, ll, allowed, k, projection)[0] for x, ll in zip(xin, libs)]
    if name == "arrow":
      return [route_arrow(x, ll, allowed)[0] for x, ll in zip(xin, libs)]
    return [route_spectr(x, ll, allowed)[0] for x, ll in zip(xin, libs)]

  return _scan_layers(fn, lib_xs, xin, allowed)


def auto_projection(n: int, tokens: int, k: int) -> str:
  """What route_lag's projection='auto' picks (RouterSpec: gather while the gathered
  candidate rows, tokens * min(k, N), are fewer than the library's N; dense otherwise)."""
  return "gather" if n > tokens * min(k, n) else "dense"


# Per-op profile columns: (key, label). Keys of the previous version of this benchmark
# (hand-written copies of the router pieces) are kept so an old routing.json renders.
PROFILE_OPS = (
  ("base_matvec", "base matvecs"),
  ("arrow_scores", "arrow scores"),
  ("top_k", "top-k"),
  ("gather_adapters_project", "`gather_adapters` + project (k cand.)"),
  ("prev_gather_block_project", "previous: A*[cand] block gather + project"),
  ("gather_project", "A*[cand] block gather + project (old run)"),
  ("gather_rows_project", "rows of [N R, I] gather + project (old run, benchmark's copy)"),
  ("apply_B", "apply B*"),
  ("project_all", "`project_all` (all N)"),
  ("prev_project_4d", "previous: 4-D einsum 'bti,nri->btnr'"),
  ("spectr_proj_2d", "projection on [N R, I] (old run, benchmark's copy)"),
  ("route_lag", "route_lag"),
  ("route_lag_gather", "route_lag gather"),
  ("route_lag_dense", "route_lag dense"),
  ("route_arrow", "route_arrow"),
  ("route_spectr", "route_spectr"),
)


def profile_part(args, results: dict) -> None:
  """The three knowledge modules, op by op, scanned over layers like the decoder.

  Every op gets its arrays as arguments and runs inside a lax.scan over the layers
  (like the decoder), so data streams from memory instead of sitting in the 32 MB L3
  between calls. Times are per layer. The candidate projections and routers are the
  library's own functions; the two ``prev_*`` ops are the implementations they replaced.
  """
  out = results.setdefault("profile", [])
  ns = [int(n) for n in args.ns.split(",")]
  for shape in args.shapes.split(","):
    full = SHAPES[shape]
    shapes = full.module_shapes()
    for n in ns:
      depth = min(row_plan(args, shape, n), args.profile_layers)
      if depth < 1:
        continue
      config = depth_config(full, depth)
      rng = np.random.default_rng(0)
      ws = [
        jnp.asarray(rng.standard_normal((depth, *shapes[m]), np.float32) * 0.02)
        for m in KNOW_MODULES
      ]
      lib = synthetic_library(config, n, KNOW_RANK, KNOW_MODULES, n, "k")
      w = lib.weights
      a = [w.a[m] for m in KNOW_MODULES]
      b = [w.b[m] for m in KNOW_MODULES]
      arrows = [w.arrows[m] for m in KNOW_MODULES]
      valid = [w.valid[m] for m in KNOW_MODULES]
      for batch in [int(bb) for bb in args.batches.split(",")]:
        xin = [
          jnp.asarray(rng.standard_normal((batch, 1, shapes[m][1]), np.float32))
          for m in KNOW_MODULES
        ]
        allowed = jnp.ones((batch, n), bool)
        k = min(args.k, n)
        scores = _op_scores(arrows, xin, allowed)
        cand = _op_topk(scores, k)
        z = _op_gather((a, cand), xin)
        z_sel = [zi[:, :, :, 0] for zi in z]
        sel = [c[..., 0] for c in cand]
        lib_xs = (a, b, arrows, valid)
        router = functools.partial(_op_router, k=args.k)
        ops = {
          "base_matvec": (_op_base, (ws, xin)),
          "arrow_scores": (_op_scores, (arrows, xin, allowed)),
          "top_k": (functools.partial(_op_topk, k=k), (scores,)),
          "gather_adapters_project": (_op_gather, ((a, cand), xin)),
          "prev_gather_block_project": (_op_prev_gather_block, ((a, cand), xin)),
          "apply_B": (_op_apply, ((z_sel, b, sel),)),
          "project_all": (_op_project_all, (a, xin)),
          "prev_project_4d": (_op_prev_project_4d, (a, xin)),
          "route_lag": (functools.partial(router, name="lag"), (lib_xs, xin, allowed)),
          "route_lag_gather": (
            functools.partial(router, name="lag", projection="gather"),
            (lib_xs, xin, allowed),
          ),
          "route_lag_dense": (
            functools.partial(router, name="lag", projection="dense"),
            (lib_xs, xin, allowed),
          ),
          "route_arrow": (functools.partial(router, name="arrow"), (lib_xs, xin, allowed)),
          "route_spectr": (functools.partial(router, name="spectr"), (lib_xs, xin, allowed)),
        }
        row = {
          "shape": shape,
          "n": n,
          "batch": batch,
          "k": k,
          "layers": depth,
          "auto_projection": auto_projection(n, batch, args.k),
          "ops_ms": {},
        }
        for name, (fn, fargs) in ops.items():
          res = time_fn(
            lambda fn=fn, fargs=fargs: jax.block_until_ready(fn(*fargs)),
            args.min_sample_s,
            args.profile_reps,
          )
          row["ops_ms"][name] = 1e3 * res["median_s"] / depth
        o = row["ops_ms"]
        log(
          f"profile {shape} N={n} B={batch} ({depth} layers; ms per layer, 3 MLP modules): "
          + ", ".join(f"{k_}={v:.3f}" for k_, v in o.items())
          + f"; route_lag ({row['auto_projection']}) / base "
          f"{o['route_lag'] / o['base_matvec']:.2f}"
        )
        out.append(row)
        del scores, cand, z, z_sel, sel
      del lib, w, a, b, arrows, valid, ws
      gc.collect()
      write_json(args, results)


# --- prefill ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "projection"))
def _prefill_lag(lib_xs, xin, mask, k, projection):
  """One layer's route_lag on the three knowledge modules: (deltas, chosen ids)."""
  outs = [
    route_lag(x, ll, mask & ll.valid[None, :], k, projection)
    for x, ll in zip(xin, _lib_list(*lib_xs))
  ]
  return [o[0] for o in outs], [o[1] for o in outs]


@jax.jit
def _prefill_scores(lib_xs, xin, mask):
  """The floor: only the arrow scores of the three modules."""
  return [arrow_scores(x, ll, mask & ll.valid[None, :]) for x, ll in zip(xin, _lib_list(*lib_xs))]


@jax.jit
def _prefill_base(ws, xin):
  """The three modules' own (base) matmuls, for scale."""
  return [jnp.einsum("bti,oi->bto", x, w) for x, w in zip(xin, ws)]


def prefill_part(args, results: dict) -> None:
  """One layer's LAG routing for a [1, T] prefill, by projection, SmolLM2 shapes.

  route_lag on gate/up/down of one layer (jitted, arrays as arguments), with the
  candidates' A* x computed by gathering, by one dense matmul onto all N adapters, by
  'auto' (what the library picks), and by the grouped ragged_dot where asked for; next
  to the arrow scores alone (the floor any projection adds to) and the base matmuls.
  Medians over --profile_reps samples, ms per layer.
  """
  config = depth_config(SHAPES["smollm2"], 1)
  shapes = config.module_shapes()
  T, batch = args.prefill_t, 1
  grouped_ns = {int(n) for n in args.prefill_grouped_ns.split(",") if n}
  rng = np.random.default_rng(11)
  xin = [
    jnp.asarray(rng.standard_normal((batch, T, shapes[m][1]), np.float32)) for m in KNOW_MODULES
  ]
  ws = [jnp.asarray(rng.standard_normal(shapes[m], np.float32) * 0.02) for m in KNOW_MODULES]
  rows = results.setdefault("prefill", [])
  for n in [int(n) for n in args.prefill_ns.split(",")]:
    lib = synthetic_library(config, n, KNOW_RANK, KNOW_MODULES, n, "k")
    w = lib.weights
    lib_xs = tuple(
      [f[m][0] for m in KNOW_MODULES] for f in (w.a, w.b, w.arrows, w.valid)
    )  # one layer: a [N, R, I], b [N, O, R], arrows [I, N], valid [N] per module
    mask = jnp.ones((batch, n), bool)
    k = min(args.k, n)
    row = {
      "shape": "smollm2",
      "n": n,
      "t": T,
      "batch": batch,
      "k": k,
      "rank": KNOW_RANK,
      "auto_projection": auto_projection(n, batch * T, args.k),
      "reps": args.profile_reps,
      "ms": {},
      "first_call_s": {},
      "skipped": {},
      "same_choice_as_gather": {},
    }

    def timed(label, fn, limit_s=None, row=row):
      res = time_fn(
        lambda: jax.block_until_ready(fn()), args.min_sample_s, args.profile_reps, limit_s
      )
      row["first_call_s"][label] = res["first_s"]
      if "skipped" in res:
        row["skipped"][label] = res["skipped"]
        log(f"prefill N={row['n']} {label}: skipped, {res['skipped']}")
        return
      row["ms"][label] = 1e3 * res["median_s"]

    timed("base", functools.partial(_prefill_base, ws, xin))
    timed("arrow_scores", functools.partial(_prefill_scores, lib_xs, xin, mask))
    projections = ["gather", "dense", "auto"] + (["grouped"] if n in grouped_ns else [])
    chosen = {}
    for proj in projections:
      limit = args.prefill_grouped_max_s if proj == "grouped" else None
      fn = functools.partial(_prefill_lag, lib_xs, xin, mask, args.k, proj)
      timed(proj, fn, limit)
      if proj in row["ms"]:
        chosen[proj] = np.concatenate([np.asarray(c).ravel() for c in fn()[1]])
    for proj, ids in chosen.items():
      if proj != "gather" and "gather" in chosen:
        row["same_choice_as_gather"][proj] = float(np.mean(ids == chosen["gather"]))
    o = row["ms"]
    log(
      f"prefill smollm2 N={n} [1, {T}] k={k} (ms per layer, 3 MLP modules; auto -> "
      f"{row['auto_projection']}): "
      + ", ".join(f"{p}={v:.2f}" for p, v in o.items())
      + (f"; skipped {sorted(row['skipped'])}" if row["skipped"] else "")
    )
    rows.append(row)
    del lib, w, lib_xs, chosen
    gc.collect()
    write_json(args, results)


def scan_slice_part(args, results: dict) -> None:
  """Matvecs on layer slices of a stacked [L, O, I] array against separate arrays.

  The decoder keeps every parameter (and the library) stacked on a leading layer axis
  and scans over it. XLA:CPU materialises each layer's slice before the dot; this
  measures what that costs at three sizes: a SmolLM2 MLP weight, a Llama-3B MLP
  weight, and the arrows of a 10,000-adapter library at I = 1536 (an [I, N] slice).
  """
  rng = np.random.default_rng(1)
  rows = []
  for label, L, O, I in (
    ("smollm2 gate_proj [1536, 576]", 30, 1536, 576),
    ("llama3b gate_proj [8192, 3072]", 2, 8192, 3072),
    ("arrows N=10000, I=1536 [10000, 1536]", 3, 10000, 1536),
  ):
    stacked = jnp.asarray(rng.standard_normal((L, O, I), np.float32))
    separate = [jnp.asarray(np.asarray(stacked[i])) for i in range(L)]
    x = jnp.ones((1, I), jnp.float32)

    def body(c, wl):
      return c, jnp.einsum("bi,oi->bo", c, wl)

    fns = {
      "scan": (jax.jit(lambda x, w: jax.lax.scan(body, x, w)[1]), stacked),
      "static_slices": (
        jax.jit(lambda x, w, L=L: [jnp.einsum("bi,oi->bo", x, w[i]) for i in range(L)]),
        stacked,
      ),
      "separate_arrays": (
        jax.jit(lambda x, ws: [jnp.einsum("bi,oi->bo", x, w) for w in ws]),
        separate,
      ),
    }
    row = {"label": label, "layers": L, "shape": [O, I], "mb_per_layer": 4 * O * I / 1e6}
    for name, (fn, w) in fns.items():
      res = time_fn(lambda fn=fn, w=w, x=x: jax.block_until_ready(fn(x, w)), 0.3, args.profile_reps)
      row[name + "_ms_per_layer"] = 1e3 * res["median_s"] / L
      row[name + "_gbs"] = 4 * O * I * L / res["median_s"] / 1e9
    rows.append(row)
    log(
      f"layer slices, {label}, {L} layers: scan {row['scan_ms_per_layer']:.2f} ms/layer "
      f"({row['scan_gbs']:.1f} GB/s), static slices {row['static_slices_ms_per_layer']:.2f} "
      f"({row['static_slices_gbs']:.1f} GB/s), separate arrays "
      f"{row['separate_arrays_ms_per_layer']:.2f} ({row['separate_arrays_gbs']:.1f} GB/s)"
    )
    del stacked, separate
    gc.collect()
  results["scan_slice"] = rows
  write_json(args, results)


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


# --- part 2: PEFT -----------------------------------------------------------------------


def peft_part(args, results: dict) -> None:
  import peft
  import torch
  import transformers
  from peft.tuners.lora.config import ArrowConfig

  from lag_jax.adapters.peft_io import save_peft_adapter
  from lag_jax.assets import smollm2_checkpoint
  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.generation.generate import generate
  from lag_jax.generation.sampling import Greedy

  torch.set_num_threads(args.threads)
  folder = str(smollm2_checkpoint())
  model = load_model(folder)
  config = model.config
  prompt = np.random.default_rng(0).integers(100, config.vocab_size, args.peft_prompt_len).tolist()
  new = args.peft_new_tokens
  gen_cfg = transformers.GenerationConfig(
    do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0
  )
  ns = [int(n) for n in args.peft_ns.split(",")]
  rows = results.setdefault("peft", [])
  tmp = tempfile.mkdtemp(prefix="routing-peft-", dir="/tmp")
  try:
    for n in ns:
      row: dict = {"n": n, "top_k": args.peft_top_k, "prompt_len": len(prompt), "new_tokens": new}
      t = time.perf_counter()
      adapters = random_adapters(config, n, KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, 0, "k")
      paths = []
      for a in adapters:
        paths.append(os.path.join(tmp, f"{n}-{a.name}"))
        save_peft_adapter(a, paths[-1])
      row["write_adapters_s"] = time.perf_counter() - t
      t = time.perf_counter()
      lib = AdapterLibrary.from_adapters(adapters, config, KNOW_MODULES, chunk=args.sig_chunk)
      jax.block_until_ready(lib.weights)
      row["ours_library_s"] = time.perf_counter() - t
      del adapters
      hook = RoutedAdapters((routed(lib, 1, RouterSpec("arrow_softmax", k=args.peft_top_k)),))

      def ours(hook=hook):
        out = generate(model, [prompt], max_new_tokens=new, sampler=Greedy(), lora=hook)
        assert len(out.tokens[0]) == new
        return out.prefill_s + out.decode_s, out.decode_s, out.num_decode_steps

      t = time.perf_counter()
      ours()
      row["ours_first_call_s"] = time.perf_counter() - t
      t0 = time.perf_counter()
      base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
      try:
        peft_model = peft.create_arrow_model(
          base, paths, ArrowConfig(top_k=args.peft_top_k, router_temperature=1.0)
        ).eval()
      except (MemoryError, RuntimeError) as e:
        row["peft_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(f"peft N={n}: create_arrow_model failed: {row['peft_error']}")
        continue
      row["peft_create_s"] = time.perf_counter() - t0
      ids = torch.tensor([prompt])

      @torch.inference_mode()
      def theirs(tokens=new, peft_model=peft_model, ids=ids):
        cfg = (
          gen_cfg
          if tokens == new
          else transformers.GenerationConfig(
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            eos_token_id=None,
            pad_token_id=0,
          )
        )
        t = time.perf_counter()
        out = peft_model.generate(input_ids=ids, generation_config=cfg)
        assert out.shape[1] == len(prompt) + tokens
        return time.perf_counter() - t

      # PEFT builds its prototypes (power iteration) on the first forward pass.
      row["peft_first_call_s"] = theirs(1)
      log(
        f"peft N={n}: wrote {n} adapters in {row['write_adapters_s']:.1f} s, "
        f"create_arrow_model {row['peft_create_s']:.1f} s "
        f"({row['peft_create_s'] / n:.2f} s/adapter), first call "
        f"{row['peft_first_call_s']:.1f} s; ours library {row['ours_library_s']:.1f} s, "
        f"first call {row['ours_first_call_s']:.1f} s"
      )
      ours_t, theirs_t = [], []
      for r in range(args.peft_runs):
        ours_t.append(ours())
        t = theirs()
        theirs_t.append(t)
        log(f"  run {r}: ours {new / ours_t[-1][0]:.1f} tok/s, PEFT {new / t:.2f} tok/s")
      o = statistics.median(x[0] for x in ours_t)
      od = statistics.median(x[1] / x[2] for x in ours_t)
      p = statistics.median(theirs_t)
      row.update(
        {
          "ours_tok_s": new / o,
          "peft_tok_s": new / p,
          "speedup": p / o,
          "ours_decode_step_ms": 1e3 * od,
          "ours_runs_s": [x[0] for x in ours_t],
          "peft_runs_s": theirs_t,
        }
      )
      rows.append(row)
      log(
        f"peft N={n}: ours {row['ours_tok_s']:.1f} tok/s vs PEFT {row['peft_tok_s']:.2f} "
        f"tok/s -> {row['speedup']:.1f}x"
      )
      del peft_model, base, lib, hook
      gc.collect()
      write_json(args, results)
    if args.peft_try_n:
      results["peft_load_probe"] = peft_load_probe(args, folder, config, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  # Extrapolate PEFT's per-run time linearly in N from the two smallest sizes.
  ok = [r for r in rows if "peft_tok_s" in r]
  if len(ok) >= 2:
    # Per-run time: linear in N. Loading: c(N) = a N + b N^2 (each load_adapter call
    # walks every module, whose adapter dicts grow), fitted through the two points.
    (n0, t0_), (n1, t1_) = [(r["n"], new / r["peft_tok_s"]) for r in ok[:2]]
    slope = (t1_ - t0_) / (n1 - n0)
    (c0, c1) = ok[0]["peft_create_s"], ok[1]["peft_create_s"]
    b2 = max(0.0, (c1 / n1 - c0 / n0) / (n1 - n0))
    a1 = c0 / n0 - b2 * n0
    results["peft_extrapolation"] = {
      "per_run_s_at": {str(n): t0_ + slope * (n - n0) for n in (1000, 10000)},
      "per_adapter_s": slope,
      "create_fit": {"a": a1, "b": b2},
      "create_s_at": {str(n): a1 * n + b2 * n * n for n in (1000, 10000)},
    }


def peft_load_probe(args, folder: str, config: ModelConfig, tmp: str) -> dict:
  """Loads up to --peft_try_n adapters the way create_arrow_model does, under a time cap.

  create_arrow_model is ``PeftModel.from_pretrained`` for the first adapter and one
  ``load_adapter`` call per further adapter (then a compatibility scan); this times each
  call, stops at --peft_cap_s, and extrapolates the per-adapter time (which grows with
  the number already loaded) to N adapters.
  """
  import peft
  import torch
  import transformers

  from lag_jax.adapters.peft_io import save_peft_adapter

  def write(i):
    path = os.path.join(tmp, f"probe-{i}")
    save_peft_adapter(
      random_lora(config, f"p{i}", KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, seed=50000 + i), path
    )
    return path

  n = args.peft_try_n
  base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  path = write(0)
  t0 = time.perf_counter()
  model = peft.PeftModel.from_pretrained(base, path, adapter_name="task_0")
  times = [time.perf_counter() - t0]
  spent = times[0]
  for i in range(1, n):
    path = write(i)
    t = time.perf_counter()
    model.load_adapter(path, adapter_name=f"task_{i}")
    times.append(time.perf_counter() - t)
    spent += times[-1]
    shutil.rmtree(path, ignore_errors=True)
    if i % 50 == 0:
      log(
        f"  PEFT load probe: {i + 1} adapters loaded in {spent:.0f} s "
        f"(last 50: {statistics.mean(times[-50:]):.2f} s/adapter)"
      )
    if spent > args.peft_cap_s:
      break
  loaded = len(times)
  slope, intercept = np.polyfit(np.arange(loaded), np.asarray(times), 1)

  def total(m):  # sum over i < m of (intercept + slope i)
    return intercept * m + slope * m * (m - 1) / 2

  res = {
    "target_n": n,
    "cap_s": args.peft_cap_s,
    "loaded": loaded,
    "load_s": spent,
    "per_adapter_first_s": statistics.mean(times[1:11]) if loaded > 11 else times[-1],
    "per_adapter_last_s": statistics.mean(times[-10:]),
    "fit": {"intercept_s": float(intercept), "slope_s": float(slope)},
    "extrapolated_load_s": {str(m): float(total(m)) for m in (100, 1000, 10000)},
    "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
  }
  log(
    f"PEFT load probe: {loaded} of {n} adapters in {spent:.0f} s (cap {args.peft_cap_s:.0f} s); "
    f"per adapter {res['per_adapter_first_s']:.2f} s at first, "
    f"{res['per_adapter_last_s']:.2f} s at the end; extrapolated load time for 1000: "
    f"{total(1000) / 3600:.1f} h, 10,000: {total(10000) / 3600:.0f} h"
  )
  del model, base
  gc.collect()
  return res


# --- output ---------------------------------------------------------------------------


def machine_info() -> dict:
  import torch
  import transformers

  src = np.ones(1 << 27, np.float32)
  dst = np.empty_like(src)
  best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))
  flops = 2 * 2048**3 / min(_timed(lambda: jax.block_until_ready(mm(a))) for _ in range(5))
  try:
    import peft

    peft_version = peft.__version__
  except ImportError:
    peft_version = None
  return {
    "nproc": os.cpu_count(),
    "machine": platform.machine(),
    "processor": platform.processor(),
    "copy_bandwidth_gbs": 2 * src.nbytes / best / 1e9,
    "matmul_gflops": flops / 1e9,
    "versions": {
      "jax": jax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "peft": peft_version,
      "python": platform.python_version(),
    },
    "malloc_env": {
      k: os.environ.get(k)
      for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
    },
  }


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def command_line() -> str:
  env = " ".join(
    f"{k}={os.environ[k]}"
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
    if k in os.environ
  )
  cmd = "python -m benchmarks.routing " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  return f"{env} {cmd}".strip()


def write_json(args, results: dict) -> None:
  if not args.json:
    return
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(results, f, indent=1)
    f.write("\n")


def plot(args, results: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in results.get("decode", []) if "variants" in r]
  keys = sorted(
    {(r["shape"], r["batch"]) for r in rows}, key=lambda k: (list(SHAPES).index(k[0]), k[1])
  )
  if not keys:
    return
  ncols = min(2, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
  colors = {"single": "tab:gray", "arrow": "tab:blue", "lag": "tab:green", "spectr": "tab:red"}
  for ax, (shape, batch) in zip(axes.flat, keys):
    sel = sorted(
      (r for r in rows if r["shape"] == shape and r["batch"] == batch), key=lambda r: r["n"]
    )
    ns = [r["n"] for r in sel]
    for v in ("single", "arrow", "lag", "spectr"):
      ax.plot(
        ns,
        [r["variants"][v]["ratio"] for r in sel],
        "o-",
        color=colors[v],
        label=f"{LABELS[v]} measured",
      )
      ax.plot(
        ns,
        [r["variants"][v]["model_bytes"] for r in sel],
        "--",
        color=colors[v],
        alpha=0.7,
        label=f"{LABELS[v]} cost model (bytes)",
      )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("knowledge adapters N")
    ax.set_ylabel("decode-step time / base")
    depths = ", ".join(f"N={r['n']}: {r['depth']}L" for r in sel)
    ax.set_title(f"{shape}, batch {batch}\n({depths})", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.plot), exist_ok=True)
  fig.savefig(args.plot, dpi=120)
  plt.close(fig)


def prefill_sentence(pf: list[dict]) -> str:
  """One sentence on the prefill rows, computed from their numbers."""
  rows = [r for r in pf if all(x in r["ms"] for x in ("arrow_scores", "gather", "dense", "auto"))]
  if not rows:
    return "No prefill row has all of gather, dense and auto timed."
  r0 = rows[0]
  faster = ["dense" if r["ms"]["dense"] < r["ms"]["gather"] else "gather" for r in rows]
  right = sum(r["auto_projection"] == f for r, f in zip(rows, faster))
  return (
    f"At T = {r0['t']} ({r0['batch'] * r0['t'] * r0['k']} gathered candidate rows per "
    f"module), the dense projection took "
    + " and ".join(f"{r['ms']['dense'] / r['ms']['gather']:.2f}x" for r in rows)
    + " the gather's time at "
    + " and ".join(f"N = {r['n']}" for r in rows)
    + ", so auto's pick ("
    + ", ".join(f"{r['auto_projection']} at N = {r['n']}" for r in rows)
    + f") was the faster of the two at {right} of {len(rows)} sizes, and `route_lag` "
    f"with auto took "
    + " and ".join(f"{r['ms']['auto'] / r['ms']['arrow_scores']:.1f}x" for r in rows)
    + " the arrow-scores floor."
  )


def min_ratio(row: dict, name: str) -> float:
  """Fastest sample of a variant over the base's fastest sample, same row."""
  v = row["variants"]
  return min(v[name]["samples_ms"]) / min(v["base"]["samples_ms"])


def _fmt_bytes(x: float) -> str:
  return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.1f} KB"


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [
    BEGIN,
    "## Routing (`benchmarks/routing.py`)",
    "",
    f"Machine: {m['nproc']} CPUs ({m['machine']}), shared with other jobs (load "
    f"averages are in routing.json), copy bandwidth {m['copy_bandwidth_gbs']:.1f} GB/s, "
    f"float32 matmul {m['matmul_gflops']:.0f} GFLOP/s; jax {m['versions']['jax']}, "
    f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
    f"peft {m['versions']['peft']}. Total run time {results.get('total_s', 0) / 60:.0f} "
    f"min.",
    "",
    "```",
    results["command"],
    "```",
    "",
  ]
  dec = [r for r in results.get("decode", []) if "variants" in r]
  if dec:
    k = dec[0]["k"]
    lines += [
      "### Decode step: measured time ratio to base (cost-model ratio, bytes moved)",
      "",
      f"One [B, 1] decode step of the layer stack with a {results['args']['cache_len']}-slot "
      f"KV cache, jitted with weights, library and cache as arguments; median of "
      f"{results['args']['rounds']} interleaved rounds after warm-up (compile times below). "
      f"Knowledge library rank {KNOW_RANK} on gate/up/down with N adapters plus a task "
      f"library of {TASK_N} rank-{TASK_RANK} adapters on q/k/v/o, both routed with the "
      f"row's router; single LoRA = one rank-6 MLP adapter + one rank-8 attention "
      f"adapter, static. LAG k = {k}. Cells: measured ratio (cost-model ratio, bytes "
      f"moved per step); the measured ratio is the median over rounds of the variant's "
      f"time over the base's time in the same round. Libraries marked * were built through "
      f"`AdapterLibrary.from_adapters`, the others directly as `LibraryWeights`.",
      "",
      "| shape | B | N | layers | base ms/step | base ms/layer | single | Arrow (hard) "
      "| LAG | SpectR |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in dec:
      v = r["variants"]
      cells = " | ".join(
        f"{v[x]['ratio']:.2f} ({v[x]['model_bytes']:.2f})"
        for x in ("single", "arrow", "lag", "spectr")
      )
      star = "*" if r["library"] == "from_adapters" else ""
      lines.append(
        f"| {r['shape']} | {r['batch']} | {r['n']}{star} | {r['depth']} "
        f"| {v['base']['step_ms']:.1f} | {v['base']['layer_ms']:.2f} | {cells} |"
      )
    skipped = [r for r in results.get("decode", []) if "skipped" in r]
    for r in skipped:
      lines.append(
        f"\n{r['shape']} N={r['n']} skipped: {r['skipped']} (raise "
        f"`--max_library_gb`, e.g. `--full`)."
      )
    lines += [
      "",
      "LAG against its cost model (goal: measured / model <= 1.15). 'median' is the "
      "paired median ratio above; 'fastest' is the ratio of each variant's fastest sample to "
      "the base's fastest, which discounts bursts from other jobs on this shared machine:",
      "",
      "| shape | B | N | layers | LAG ms/layer | measured, median | measured, fastest "
      "| model (bytes) | model (FLOPs) | median / model (bytes) | fastest / model (bytes) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in dec:
      g = r["variants"]["lag"]
      q = g["ratio"] / g["model_bytes"]
      qm = min_ratio(r, "lag") / g["model_bytes"]
      lines.append(
        f"| {r['shape']} | {r['batch']} | {r['n']} | {r['depth']} "
        f"| {g['layer_ms']:.2f} | {g['ratio']:.2f} | {min_ratio(r, 'lag'):.2f} "
        f"| {g['model_bytes']:.2f} | {g['model_flops']:.2f} "
        f"| {q:.2f}{' ok' if q <= 1.15 else ''} | {qm:.2f}{' ok' if qm <= 1.15 else ''} |"
      )
    lines += [
      "",
      "Compile time (first call minus a warm call), seconds:",
      "",
      "| shape | B | N | base | single | Arrow | LAG | SpectR |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in dec:
      v = r["variants"]
      lines.append(
        f"| {r['shape']} | {r['batch']} | {r['n']} | "
        + " | ".join(
          f"{v[x]['compile_s']:.1f}" for x in ("base", "single", "arrow", "lag", "spectr")
        )
        + " |"
      )
  prof = results.get("profile")
  if prof:
    cols = [(key, label) for key, label in PROFILE_OPS if any(key in r["ops_ms"] for r in prof)]
    old_run = any("gather_project" in r["ops_ms"] for r in prof)
    auto = any("auto_projection" in r for r in prof)
    lines += [
      "",
      "### Where LAG's time goes: the three MLP modules op by op, ms per layer",
      "",
      "Each op runs in a lax.scan over the row's layers with its arrays as "
      "arguments (data streams from memory, as in a decode step)."
      + (
        " The projections and routers are the library's functions "
        "(`lag_jax/routing/routers.py`); 'previous' columns time the implementations they "
        "replaced, for comparison. 'auto' is the projection `route_lag` picks at that row."
        if not old_run
        else " These rows come from a run of an earlier version of this benchmark: the "
        "routers as they were then, and the benchmark's own copies of the candidate "
        "gather and projection."
      ),
      "",
      "| shape | B | N | layers | "
      + ("auto | " if auto else "")
      + " | ".join(label for _, label in cols)
      + " |",
      "|---|---:|---:|---:|" + ("---|" if auto else "") + "---:|" * len(cols),
    ]
    for r in prof:
      o = r["ops_ms"]
      lines.append(
        f"| {r['shape']} | {r['batch']} | {r['n']} | {r['layers']} | "
        + (f"{r.get('auto_projection', '-')} | " if auto else "")
        + " | ".join(f"{o[key]:.3f}" if key in o else "-" for key, _ in cols)
        + " |"
      )
  pf = results.get("prefill")
  if pf:
    p0 = pf[0]
    grouped = any("grouped" in r["ms"] or "grouped" in r.get("skipped", {}) for r in pf)
    lines += [
      "",
      f"### Prefill: one layer's LAG routing for a [{p0['batch']}, {p0['t']}] prompt",
      "",
      f"SmolLM2 shapes (gate/up/down; hidden 576, intermediate 1536), a random rank-"
      f"{p0['rank']} library of N adapters, k = {p0['k']}; `route_lag` on the three modules "
      f"of one layer, jitted with the arrays as arguments, by candidate projection; median "
      f"of {p0['reps']} samples, ms per layer. The arrow scores alone are the floor every "
      f"projection adds to; 'auto' gathers while the gathered rows (B T k) are fewer than N "
      f"and projects densely otherwise.",
      "",
      "| N | base matmuls | arrow scores (floor) | gather | dense | auto (picks) "
      + ("| grouped " if grouped else "")
      + "|",
      "|---:|---:|---:|---:|---:|---:|" + ("---:|" if grouped else ""),
    ]
    for r in pf:
      o = r["ms"]

      def cell(key, o=o, r=r):
        if key in o:
          return f"{o[key]:.2f}"
        return "skipped" if key in r.get("skipped", {}) else "-"

      lines.append(
        f"| {r['n']} | {cell('base')} | {cell('arrow_scores')} | {cell('gather')} "
        f"| {cell('dense')} | {cell('auto')} ({r['auto_projection']}) "
        + (f"| {cell('grouped')} " if grouped else "")
        + "|"
      )
    if grouped:
      g = [r for r in pf if "grouped" in r["ms"] and "dense" in r["ms"]]
      sk = [r for r in pf if "grouped" in r.get("skipped", {})]
      lines += [
        "",
        "grouped: `jax.lax.ragged_dot_general` over (token, candidate) pairs sorted by "
        "adapter, meant for TPU / GPU prefill; XLA:CPU lowers ragged_dot densely, hence "
        "hundreds of times slower here, so it is timed only at "
        + ", ".join(f"N = {r['n']}" for r in pf if "grouped" in r["first_call_s"])
        + (
          " ("
          + ", ".join(
            f"{r['ms']['grouped'] / r['ms']['dense']:.0f}x dense at N = {r['n']}" for r in g
          )
          + ")"
          if g
          else ""
        )
        + (
          "; skipped where one call took too long: "
          + "; ".join(f"N = {r['n']}: {r['skipped']['grouped']}" for r in sk)
          if sk
          else ""
        )
        + ".",
      ]
    lines += ["", prefill_sentence(pf)]
  sc = results.get("scan_slice")
  if sc:
    lines += [
      "",
      "### Matvecs on layer slices of stacked arrays (the decoder's layout) vs separate arrays",
      "",
      "One [1, I] x [I, O] product per layer, median ms per layer (GB/s of weights read):",
      "",
      "| matrix | layers | MB/layer | lax.scan over [L, O, I] | static slices w[i] "
      "| L separate arrays |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sc:
      lines.append(
        f"| {r['label']} | {r['layers']} | {r['mb_per_layer']:.1f} "
        f"| {r['scan_ms_per_layer']:.2f} ({r['scan_gbs']:.1f}) "
        f"| {r['static_slices_ms_per_layer']:.2f} ({r['static_slices_gbs']:.1f}) "
        f"| {r['separate_arrays_ms_per_layer']:.2f} ({r['separate_arrays_gbs']:.1f}) |"
      )
  pe = results.get("peft")
  if pe:
    p0 = pe[0]
    lines += [
      "",
      "### Against PEFT's Arrow (torch CPU), real SmolLM2",
      "",
      f"Greedy decoding of {p0['new_tokens']} new tokens after a {p0['prompt_len']}-token "
      f"prompt, batch 1, N random rank-6 adapters on gate/up/down; ours "
      f"`arrow_softmax` top_k {p0['top_k']} through `generate`, PEFT "
      f"`create_arrow_model` with `ArrowConfig(top_k={p0['top_k']})`; median of "
      f"interleaved runs; tokens/s = new tokens / (prefill + decode).",
      "",
      "| N | ours tok/s | PEFT tok/s | speedup (medians) | speedup (fastest runs) "
      "| ours library build s | ours first call s | PEFT create_arrow_model s "
      "| PEFT first call s |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in pe:
      if "peft_tok_s" not in r:
        lines.append(f"| {r['n']} | | failed: {r.get('peft_error', '')} | | | | | | |")
        continue
      lines.append(
        f"| {r['n']} | {r['ours_tok_s']:.1f} | {r['peft_tok_s']:.2f} "
        f"| {r['speedup']:.1f}x | {min(r['peft_runs_s']) / min(r['ours_runs_s']):.1f}x "
        f"| {r['ours_library_s']:.1f} "
        f"| {r['ours_first_call_s']:.1f} | {r['peft_create_s']:.1f} "
        f"| {r['peft_first_call_s']:.1f} |"
      )
    ex = results.get("peft_extrapolation")
    if ex:
      lines += [
        "",
        f"Extrapolated from the two smallest N: PEFT's time per run grows by "
        f"{ex['per_adapter_s']:.3f} s per adapter (about "
        f"{ex['per_run_s_at']['1000']:.0f} s per run at N = 1000, "
        f"{ex['per_run_s_at']['10000']:.0f} s at N = 10,000), and "
        f"`create_arrow_model` grows quadratically (fit {ex['create_fit']['a']:.3f} N + "
        f"{ex['create_fit']['b']:.5f} N^2 s): about "
        f"{ex['create_s_at']['1000'] / 3600:.1f} h to load 1000 adapters, "
        f"{ex['create_s_at']['10000'] / 3600:.0f} h for 10,000.",
      ]
  lp = results.get("peft_load_probe")
  if lp:
    lines += [
      "",
      f"Where PEFT stops: loading adapters the way `create_arrow_model` does "
      f"(`PeftModel.from_pretrained`, then one `load_adapter` per adapter), capped at "
      f"{lp['cap_s']:.0f} s: {lp['loaded']} of {lp['target_n']} adapters loaded in "
      f"{lp['load_s']:.0f} s; each call took {lp['per_adapter_first_s']:.2f} s at first and "
      f"{lp['per_adapter_last_s']:.2f} s at the end (it walks every module, whose adapter "
      f"dicts keep growing). The linear fit of the per-call time gives "
      f"{lp['extrapolated_load_s']['1000'] / 3600:.1f} h to load 1000 adapters and "
      f"{lp['extrapolated_load_s']['10000'] / 3600:.0f} h for 10,000, before PEFT's first "
      f"forward pass, which then builds every prototype by power iteration; 10,000 "
      f"SmolLM2 rank-6 adapters are also about 46 GB of factors, twice this machine's RAM.",
    ]
  sig = results.get("signatures")
  if sig:
    rss = sig.get("unit_max_rss_gb")
    lines += [
      "",
      "### Signature build",
      "",
      f"N = {sig['n']} SmolLM2-shaped rank-6 adapters on gate/up/down, "
      f"{sig['layers']} layers ({sig['adapter_modules']} adapter-modules), "
      f"`AdapterLibrary.from_adapters(chunk={sig['chunk']})`, float32, "
      f"timed once after compiling on the first {sig['warmup_adapters']} adapters "
      f"({sig['warmup_s']:.1f} s).",
      "",
      "| | seconds | adapter-modules/s |",
      "|---|---:|---:|",
      f"| ours: batched thin SVD from the factors | {sig['ours_s']:.1f} "
      f"| {sig['adapter_modules'] / sig['ours_s']:.0f} |",
      f"| dense `np.linalg.svd` of s B A (float32), extrapolated from {sig['dense_sampled']} "
      f"matrices | {sig['dense_extrapolated_s']:.0f} "
      f"| {sig['adapter_modules'] / sig['dense_extrapolated_s']:.1f} |",
      "",
      f"Speedup over dense: {sig['speedup']:.0f}x. Dense per matrix: "
      + ", ".join(f"{mm} {1e3 * s:.0f} ms" for mm, s in sig["dense_per_matrix_s"].items())
      + f". Generating the {sig['n']} random PEFT adapters took "
      f"{sig['generate_adapters_s']:.0f} s (not counted)."
      + (
        f" Peak RSS of this step: {rss:.1f} GB for a {sig['library_gb']:.1f} GB library "
        f"(the adapters themselves hold about {sig['n'] * 4.56e-3:.1f} GB)."
        if rss
        else ""
      ),
    ]
  mem = results.get("memory")
  if mem:
    lines += [
      "",
      "### Library memory per adapter (gate/up/down, float32)",
      "",
      "| shape | layers | ranks | padded to | resident | exact 2hr + arrows | overhead "
      "| LoRA factors alone |",
      "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in mem:
      lines.append(
        f"| {r['shape']} | {r['layers']} | {r['label']} | {r['padded_rank']} "
        f"| {_fmt_bytes(r['resident_per_adapter'])} "
        f"| {_fmt_bytes(r['exact_per_adapter'])} | {100 * r['overhead']:.1f}% "
        f"| {_fmt_bytes(r['lora_factors_per_adapter'])} |"
      )
  if results.get("analysis"):
    lines += ["", "### Analysis", ""] + results["analysis"]
  lines.append(END)
  return "\n".join(lines)


def analysis(results: dict) -> list[str]:
  """Data-driven findings for the markdown section."""
  out: list[str] = []
  dec = [r for r in results.get("decode", []) if "variants" in r]
  if dec:
    qs = [(r, r["variants"]["lag"]["ratio"] / r["variants"]["lag"]["model_bytes"]) for r in dec]
    ok = sum(q <= 1.15 for _, q in qs)
    ok_min = sum(min_ratio(r, "lag") / r["variants"]["lag"]["model_bytes"] <= 1.15 for r in dec)
    worst_r, worst_q = max(qs, key=lambda t: t[1])
    out.append(
      f"- LAG's measured ratio is within 1.15x of the bytes cost model in {ok} of {len(qs)} "
      f"rows (measured / model {min(q for _, q in qs):.2f} to {worst_q:.2f}; worst "
      f"{worst_r['shape']} B={worst_r['batch']} N={worst_r['n']}); with the fastest "
      f"samples, in {ok_min} of {len(dec)}. On the 3B slice LAG tracks the model (the base "
      f"step is itself slow there, see the layer-slice table); on SmolLM2 it does not, "
      f"for the reasons below. A static single LoRA measures "
      f"{min(min_ratio(r, 'single') for r in dec):.2f}-"
      f"{max(min_ratio(r, 'single') for r in dec):.2f}x base (fastest samples): at batch 1 "
      f"the program with a static LoRA runs a few percent faster than the one without any "
      f"adapter, so the no-adapter program is not a hard floor."
    )
  small = [r for r in dec if r["n"] == min(x["n"] for x in dec) and r["batch"] == 1]
  for r in sorted(small, key=lambda x: x["variants"]["base"]["layer_ms"])[:1]:
    extra = (min_ratio(r, "lag") - 1) * r["variants"]["base"]["layer_ms"]
    routed_modules = len(KNOW_MODULES) + len(TASK_MODULES)
    out.append(
      f"- Fixed cost per routed module: at {r['shape']} N={r['n']}, B=1 the libraries are "
      f"tiny (the bytes model adds {100 * (r['variants']['lag']['model_bytes'] - 1):.0f}%), "
      f"yet LAG adds {extra:.2f} ms per layer over {routed_modules} routed modules, about "
      f"{extra / routed_modules:.3f} ms each: some twenty small XLA:CPU ops per module "
      f"(scores, mask, top-k, gathers, norms, argmax, selects) and, while B min(k, N) >= N, "
      f"the dense projection onto all N adapters. Next to a "
      f"{r['variants']['base']['layer_ms']:.2f} ms layer that is "
      f"{100 * extra / r['variants']['base']['layer_ms']:.0f}%; next to a 3B layer it "
      f"vanishes."
    )
  prof = results.get("profile", [])
  for r in prof:
    biggest = max(p["n"] for p in prof if p["shape"] == r["shape"])
    if not (r["n"] == 1000 or (r["n"] == biggest and r["batch"] == 1)):
      continue
    o = r["ops_ms"]
    config = SHAPES[r["shape"]]
    shapes = config.module_shapes()
    base_bytes = sum(4 * shapes[m][0] * shapes[m][1] for m in KNOW_MODULES)
    arrow_bytes = sum(4 * r["n"] * shapes[m][1] for m in KNOW_MODULES)
    cand = min(r["n"], r["batch"] * r["k"])
    gather_bytes = sum(4 * cand * KNOW_RANK * shapes[m][1] for m in KNOW_MODULES)
    head = (
      f"- {r['shape']}, B={r['batch']}, N={r['n']}, per layer: the three MLP matvecs take "
      f"{o['base_matvec']:.2f} ms ({base_bytes / 1e6 / o['base_matvec']:.1f} GB/s) and "
      f"`route_lag` {o['route_lag']:.2f} ms"
    )
    scores = (
      f"Arrow scores {o['arrow_scores']:.2f} ms ({arrow_bytes / base_bytes:.2f}x the base "
      f"bytes; measured {o['arrow_scores'] / o['base_matvec']:.2f}x the base time), top-k "
      f"{o['top_k']:.2f} ms"
    )
    if "gather_adapters_project" in o:
      g = o["gather_adapters_project"]
      out.append(
        f"{head} (auto: {r['auto_projection']}; with gather {o['route_lag_gather']:.2f} ms, "
        f"dense {o['route_lag_dense']:.2f} ms). {scores}, `gather_adapters` + projection "
        f"{g:.2f} ms for {gather_bytes / 1e6:.1f} MB ({gather_bytes / 1e6 / g:.1f} GB/s; the "
        f"cost model prices it at {gather_bytes / base_bytes:.2f}x base), apply "
        f"{o['apply_B']:.2f} ms. The previous block gather A*[cand] took "
        f"{o['prev_gather_block_project']:.2f} ms for the same projection "
        f"({o['prev_gather_block_project'] / g:.1f}x)."
      )
    else:  # a routing.json from the previous version of this benchmark
      out.append(
        f"{head}. {scores}, candidate gather + projection {o['gather_project']:.2f} ms for "
        f"{gather_bytes / 1e6:.1f} MB ({gather_bytes / 1e6 / o['gather_project']:.1f} GB/s; "
        f"the cost model prices it at {gather_bytes / base_bytes:.2f}x base), apply "
        f"{o['apply_B']:.2f} ms. Gathering rows of A* viewed as [N R, I] instead took "
        f"{o['gather_rows_project']:.2f} ms."
      )
  new_rows = [p for p in prof if "project_all" in p["ops_ms"]]
  if new_rows:
    big = max(new_rows, key=lambda p: (p["n"], -p["batch"]))
    o = big["ops_ms"]

    def spread(key, ref):
      ratios = [p["ops_ms"][key] / p["ops_ms"][ref] for p in new_rows]
      return f"{min(ratios):.1f}-{max(ratios):.1f}x"

    right = sum(
      (p["ops_ms"]["route_lag_dense"] < p["ops_ms"]["route_lag_gather"])
      == (p["auto_projection"] == "dense")
      for p in new_rows
    )
    out.append(
      f"- `project_all` (A* as one [N R, I] matrix, a single 2-D matmul) takes "
      f"{o['project_all']:.1f} ms per layer at {big['shape']} N={big['n']} B={big['batch']}, "
      f"against {o['prev_project_4d']:.1f} ms for the previous 4-D einsum 'bti,nri->btnr' "
      f"({o['prev_project_4d'] / o['project_all']:.1f}x); `route_spectr`, built on it, takes "
      f"{o['route_spectr']:.1f} ms. Over the {len(new_rows)} profile rows the previous block "
      f"gather took {spread('prev_gather_block_project', 'gather_adapters_project')} the "
      f"time of `gather_adapters` + projection, and the 4-D einsum "
      f"{spread('prev_project_4d', 'project_all')} that of `project_all`. `route_lag`'s "
      f"auto projection (dense while B min(k, N) >= N) picked the faster of gather and "
      f"dense in {right} of {len(new_rows)} rows."
    )
  elif prof:
    big = max(prof, key=lambda p: (p["n"], -p["batch"]))
    o = big["ops_ms"]
    out.append(
      f"- In this run `route_spectr` still used a 4-D einsum 'bti,nri->btnr', which made "
      f"XLA:CPU transpose the layer's whole A* [N, R, I] every step: "
      f"{o['route_spectr']:.1f} ms per layer at {big['shape']} N={big['n']} B={big['batch']}, "
      f"against {o['spectr_proj_2d']:.1f} ms for the same projection with A* reshaped to a "
      f"2-D [N R, I] matrix (einsum 'bti,ji->btj', no transpose; the library's "
      f"`project_all` now does this). `route_lag` takes the dense path whenever "
      f"B min(k, N) >= N (N <= k at batch 1, N <= 16 k at batch 16), and `uniform` always "
      f"does."
    )
  sc = results.get("scan_slice")
  if sc:
    worst = min(sc, key=lambda r: r["scan_gbs"] / r["separate_arrays_gbs"])
    out.append(
      "- The stacked-layer layout is the largest slow path on XLA:CPU, for base and routed "
      "variants alike: a matvec on a layer slice of a stacked [L, O, I] array runs at "
      + ", ".join(f"{r['scan_gbs']:.1f} GB/s ({r['label'].split(' [')[0]})" for r in sc)
      + f", against {worst['separate_arrays_gbs']:.1f} GB/s on separate arrays "
      f"({worst['separate_arrays_gbs'] / worst['scan_gbs']:.0f}x) for the same matrix: "
      f"each slice is copied before the dot, which costs little while a slice fits the "
      f"32 MB L3 (SmolLM2) and a lot beyond (3B weights, the arrows of 10,000 adapters). "
      f"It inflates the 3B base step (so the 3B ratios look better than a faster base "
      f"would give) and LAG's arrow scores at N = 10,000."
    )
  sig = results.get("signatures")
  if sig:
    out.append(
      f"- Signatures: {sig['adapter_modules']} adapter-modules in {sig['ours_s']:.1f} s "
      f"({'goal < 60 s met' if sig['ours_s'] < 60 else 'goal < 60 s missed'}), "
      f"{sig['speedup']:.0f}x faster than dense SVDs "
      f"({'goal >= 50x met' if sig['speedup'] >= 50 else 'goal >= 50x missed'})."
      + (
        f" Peak memory of the signature unit: {sig['unit_max_rss_gb']:.1f} GB RSS to build a "
        f"{sig['library_gb']:.1f} GB library from about {sig['n'] * 4.56e-3:.1f} GB of "
        f"adapters ({sig['unit_max_rss_gb'] / sig['library_gb']:.1f}x the library)."
        if sig.get("unit_max_rss_gb")
        else ""
      )
    )
  pe = [r for r in results.get("peft", []) if "speedup" in r]
  if pe:
    out.append(
      "- Against PEFT's Arrow: "
      + ", ".join(
        f"N={r['n']} {r['speedup']:.1f}x (medians; fastest runs "
        f"{min(r['peft_runs_s']) / min(r['ours_runs_s']):.1f}x)"
        for r in pe
      )
      + " faster (goal >= 5x at N = 100). "
      "PEFT stacks every adapter's A and B in every Arrow layer on every forward pass and "
      "computes all N adapters' outputs before mixing the top k, so its per-token cost is "
      "dense in N (like SpectR), and `create_arrow_model` loads adapters one "
      "`load_adapter` call at a time."
    )
  mem = results.get("memory", [])
  for r in mem:
    if not r["label"].startswith("mixed"):
      continue
    uni = next(
      (m for m in mem if m["shape"] == r["shape"] and m["label"].startswith("uniform")), None
    )
    arrows = (
      f"; a uniform-rank library carries only the arrows, "
      f"{100 * (uni['exact_per_adapter'] / uni['lora_factors_per_adapter'] - 1):.0f}% "
      f"over the LoRA factors"
      if uni
      else ""
    )
    out.append(
      f"- Mixed ranks ({r['shape']}): padding to rank {r['padded_rank']} costs "
      f"{100 * r['overhead']:.0f}% over the exact count{arrows}."
    )
  return out


_PARTS = {
  "signatures": "signatures_part",
  "memory": "memory_part",
  "decode": "decode_part",
  "profile": "profile_part",
  "scan_slice": "scan_slice_part",
  "prefill": "prefill_part",
  "peft": "peft_part",
}
# Parts in the order they run (scan_slice runs with profile).
RUN_ORDER = ("signatures", "memory", "decode", "profile", "prefill", "peft")


def _child_part(out_path: str, part: str, args_dict: dict) -> None:
  """Child process: one unit of work; its memory goes back to the OS when it exits."""
  args = argparse.Namespace(**args_dict)
  args.json = ""
  results: dict = {}
  globals()[_PARTS[part]](args, results)
  results["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  with open(out_path, "w") as f:
    json.dump(results, f)


def main(argv=None):
  args = parse_args(argv)
  if args.render:
    with open(args.json) as f:
      results = json.load(f)
    results["analysis"] = analysis(results)
    write_json(args, results)
    if args.plot:
      plot(args, results)
    if args.markdown:
      write_section(args.markdown, markdown(results), BEGIN, END, header="# Benchmarks\n")
    print(markdown(results))
    return
  t_start = time.perf_counter()
  results: dict = {"command": command_line(), "args": vars(args)}
  results["machine"] = machine_info()
  log(f"machine: {results['machine']}")
  parts = args.parts.split(",")
  unknown = sorted(set(parts) - set(RUN_ORDER) - {""})
  if unknown:
    raise SystemExit(f"unknown --parts {unknown}; choose from {list(RUN_ORDER)}")
  # Every unit runs in its own process: libraries of several GB are freed for sure
  # (with the malloc settings above glibc never returns freed heap memory to the OS).
  units = []
  for part in RUN_ORDER:
    if part not in parts:
      continue
    if part in ("decode", "profile"):
      for shape in args.shapes.split(","):
        for n in args.ns.split(","):
          units.append((part, {"shapes": shape, "ns": n}))
      if part == "profile":
        units.append(("scan_slice", {}))
    else:
      units.append((part, {}))
  for part, override in units:
    unit_args = {**vars(args), **override}
    t = time.perf_counter()
    res, reason = run_child(_child_part, args.child_timeout_s, part=part, args_dict=unit_args)
    if res is None:
      results.setdefault("failures", []).append({"part": part, **override, "reason": reason})
      log(f"unit {part} {override} failed ({reason}); continuing")
      continue
    if part == "signatures" and "signatures" in res:
      res["signatures"]["unit_max_rss_gb"] = res.get("max_rss_gb")
    log(
      f"unit {part} {override} done in {time.perf_counter() - t:.0f} s "
      f"(max RSS {res.get('max_rss_gb', 0):.1f} GB)"
    )
    for key, value in res.items():
      if key in ("max_rss_gb", "wall_s"):
        continue
      if isinstance(value, list):
        results.setdefault(key, []).extend(value)
      else:
        results[key] = value
    write_json(args, results)
  results["total_s"] = time.perf_counter() - t_start
  results["analysis"] = analysis(results)
  write_json(args, results)
  if args.plot:
    plot(args, results)
  if args.markdown:
    write_section(args.markdown, markdown(results), BEGIN, END, header="# Benchmarks\n")
  print(markdown(results))


if __name__ == "__main__":
  main()
