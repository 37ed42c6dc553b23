"""Offloaded library benchmark (issue 5, "Libraries larger than device memory").

N = 100,000 synthetic rank-6 knowledge adapters on one SmolLM2-shaped layer (D 576,
F 1536) with gate/up/down: arrows on the device (float32, about 1.1 GB), A* / B* in
bfloat16 on disk (about 7.6 GB, memory-mapped), a device cache of recently used
adapters (``lag_jax.routing.offload``). One [B, 1] decode step of that layer with LAG
(k = 20) is timed against the same layer without adapters (base) and with N = 1,000
all-resident adapters, in three regimes of the offloaded cache:

  miss   fresh random tokens every step: nearly every candidate is fetched;
  hit    the previous step's tokens again: every candidate is cached;
  disk   as miss, with the factor files dropped from the page cache before every
         step (madvise + posix_fadvise DONTNEED), so misses read the disk.

Per step it reports the median time, the bytes moved host -> device and the hit rate;
the library's device bytes next to the resident library's; then full depth (30
layers) by the cost model: per-layer figures times the depth, never materialised
(N = 100k at 30 layers is 228 GB of bfloat16 factors, 456 GB in float32).

Run from the repository root (the malloc settings as in benchmarks/routing.py):

  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
  MALLOC_TOP_PAD_=1073741824 python -m benchmarks.offload

Checks free disk first and scales N down (saying so) when the library would not fit
with ``--min_free_gb`` to spare. The library folder (``--folder``) is reused when it
already holds the same synthetic library, and removed at the end unless ``--keep``.
Writes benchmarks/results/offload.json, offload.png and the section between
``<!-- offload:begin -->`` and ``<!-- offload:end -->`` of benchmarks/results/offload.md
(``--render`` redoes the last two from the JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import mmap
import os
import pathlib
import platform
import re
import resource
import shlex
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import log
from benchmarks.sections import write_section
from lag_jax.model.config import ModelConfig
from lag_jax.model.kv_cache import KVCache
from lag_jax.model.transformer import MLP_MODULES, CausalLM
from lag_jax.routing import arrow_sketch
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.library import AdapterLibrary, LibraryWeights
from lag_jax.routing.offload import (
  MANIFEST,
  OffloadedLibrary,
  OffloadWriter,
)
from lag_jax.routing.routers import RouterSpec

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- offload:begin -->", "<!-- offload:end -->"
FULL_DEPTH = 30
FACTOR_DTYPE, ARROW_DTYPE = jnp.bfloat16, jnp.float32

# SmolLM2-135M's widths; one layer; a reduced vocabulary (no LM head is timed).
SMOLLM2 = ModelConfig(
  model_type="llama",
  vocab_size=4096,
  hidden_size=576,
  intermediate_size=1536,
  num_hidden_layers=1,
  num_attention_heads=9,
  num_key_value_heads=3,
  head_dim=64,
  rope_theta=100000.0,
  tie_word_embeddings=True,
)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=100_000, help="offloaded library size")
  p.add_argument("--resident_n", type=int, default=1000, help="all-resident comparison size")
  p.add_argument("--rank", type=int, default=6)
  p.add_argument("--k", type=int, default=20, help="LAG candidates")
  p.add_argument("--batches", default="1,16")
  p.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
  p.add_argument("--cache_len", type=int, default=128, help="KV cache slots")
  p.add_argument("--slots", type=int, default=4096, help="A* cache slots per module")
  p.add_argument("--b_slots", type=int, default=1024, help="B* cache slots per module")
  p.add_argument("--chunk_rows", type=int, default=64, help="rows per host -> device chunk")
  p.add_argument("--folder", default="/tmp/lag_offload_bench", help="library files")
  p.add_argument("--keep", action="store_true", help="keep the library files afterwards")
  p.add_argument("--min_free_gb", type=float, default=2.0, help="disk to leave free")
  p.add_argument("--write_chunk", type=int, default=4096, help="adapters written at a time")
  p.add_argument("--no_disk_regime", action="store_true", help="skip the page-cache drop")
  p.add_argument(
    "--index_probe",
    type=int,
    default=8,
    help="also time the offloaded library through its arrow index, probing this many "
    "clusters (0: not)",
  )
  p.add_argument("--index_spill", type=int, default=1)
  p.add_argument("--index_dtype", default="float32", help="float32, bfloat16 or int8")
  p.add_argument(
    "--sketch",
    default="64:160",
    help="also time the offloaded library through an arrow sketch (routing/arrow_sketch.py) "
    "of Z dimensions rescoring a pool of P, as Z:P ('': not)",
  )
  p.add_argument(
    "--sketch_rows",
    default="float32",
    choices=("float32", "bfloat16", "none"),
    help="the sketch's adapter-major copy of the arrows for the pool's rescoring "
    "(none: gathered from the arrows' [I, N] layout)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--render", action="store_true", help="only redo markdown + plot from JSON")
  p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "offload.json"))
  p.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "offload.png"))
  p.add_argument("--markdown", default=str(ROOT / "benchmarks" / "results" / "offload.md"))
  args = p.parse_args(argv)
  if args.sketch and not re.fullmatch(r"\d+:\d+", args.sketch):
    p.error(f"--sketch: {args.sketch!r} is not Z:P (sketch dimensions : pool)")
  return args


# --- Sizes ----------------------------------------------------------------------------


def per_adapter_bytes(config: ModelConfig, rank: int) -> dict[str, int]:
  """Bytes of one adapter at one layer over gate/up/down: factors, arrows, valid."""
  shapes = config.module_shapes()
  fi, ai = jnp.dtype(FACTOR_DTYPE).itemsize, jnp.dtype(ARROW_DTYPE).itemsize
  return {
    "factors": sum(rank * (o + i) * fi for o, i in (shapes[m] for m in MLP_MODULES)),
    "arrows": sum(shapes[m][1] * ai for m in MLP_MODULES),
    "valid": len(MLP_MODULES),
  }


def fit_n(args, config) -> tuple[int, str | None]:
  """N, scaled down to what the free disk holds (with --min_free_gb spare)."""
  sizes = per_adapter_bytes(config, args.rank)
  per = sum(sizes.values())
  folder = pathlib.Path(args.folder)
  if _matches(folder, args, args.n):
    return args.n, None
  parent = folder.parent
  parent.mkdir(parents=True, exist_ok=True)
  free = shutil.disk_usage(parent).free
  if folder.exists():
    free += sum(f.stat().st_size for f in folder.glob("*") if f.is_file())
  budget = free - args.min_free_gb * 1e9
  if per * args.n <= budget:
    return args.n, None
  n = max(1000, int(budget // per) // 1000 * 1000)
  return n, (
    f"free disk {free / 1e9:.1f} GB holds {budget / 1e9:.1f} GB with "
    f"{args.min_free_gb:g} GB spare: N scaled down from {args.n} to {n}"
  )


# --- Synthetic library -----------------------------------------------------------------


def synthetic_chunk(seed: int, module: str, start: int, n: int, rank: int, O: int, I: int):
  """Adapters [start, start + n) of one module at one layer: a [1, n, R, I], b [1, n, O, R]
  (float32; rows of unit norm on average; values only steer which ids are chosen)."""
  rng = np.random.default_rng([seed, MLP_MODULES.index(module), start])
  a = rng.random((1, n, rank, I), dtype=np.float32)
  a -= 0.5
  a *= math.sqrt(12.0 / I)
  b = rng.random((1, n, O, rank), dtype=np.float32)
  b -= 0.5
  b *= 0.05
  return a, b


def _bench_meta(args, n) -> dict:
  return {"n": n, "rank": args.rank, "seed": args.seed, "shape": "smollm2", "layers": 1}


def _matches(folder: pathlib.Path, args, n) -> bool:
  try:
    return (
      json.loads((folder / "bench.json").read_text()) == _bench_meta(args, n)
      and (folder / MANIFEST).exists()
    )
  except (OSError, ValueError):
    return False


def write_library(args, config, folder: pathlib.Path, n: int) -> float | None:
  """Writes the synthetic library (bfloat16 factors, float32 arrows) unless the folder
  already holds it; returns seconds spent writing (None when reused)."""
  if _matches(folder, args, n):
    log(f"reusing {folder} (N = {n})")
    return None
  shapes = config.module_shapes()
  t = time.perf_counter()
  names = [f"k{i:06d}" for i in range(n)]
  with OffloadWriter(
    folder,
    names,
    {m: shapes[m] for m in MLP_MODULES},
    num_layers=1,
    rank=args.rank,
    factor_dtype=FACTOR_DTYPE,
    arrow_dtype=ARROW_DTYPE,
  ) as writer:
    for m in MLP_MODULES:
      O, I = shapes[m]
      for start in range(0, n, args.write_chunk):
        stop = min(start + args.write_chunk, n)
        a, b = synthetic_chunk(args.seed, m, start, stop - start, args.rank, O, I)
        writer.write(m, start, a, b)
      log(f"  wrote {m} ({n} adapters)")
  (folder / "bench.json").write_text(json.dumps(_bench_meta(args, n)))
  return time.perf_counter() - t


def resident_library(args, config, n: int) -> AdapterLibrary:
  """The first ``n`` adapters of the same generator, resident (same dtypes as on disk)."""
  shapes = config.module_shapes()
  f: dict[str, dict] = {"a": {}, "b": {}, "arrows": {}, "valid": {}}
  for m in MLP_MODULES:
    O, I = shapes[m]
    parts = [
      synthetic_chunk(args.seed, m, s, min(args.write_chunk, n - s), args.rank, O, I)
      for s in range(0, n, args.write_chunk)
    ]
    a = np.concatenate([p[0] for p in parts], axis=1).astype(FACTOR_DTYPE)
    b = np.concatenate([p[1] for p in parts], axis=1).astype(FACTOR_DTYPE)
    f["a"][m], f["b"][m] = jnp.asarray(a), jnp.asarray(b)
    f["arrows"][m] = jnp.asarray(a[:, :, 0, :].swapaxes(1, 2).astype(ARROW_DTYPE))
    f["valid"][m] = jnp.ones((1, n), bool)
  names = tuple(f"k{i:06d}" for i in range(n))
  return AdapterLibrary(names, MLP_MODULES, args.rank, (args.rank,) * n, LibraryWeights(**f))


def drop_page_cache(olib: OffloadedLibrary) -> None:
  """Evicts the factor files from the page cache: unmap our pages, then fadvise."""
  for d in olib.host.factors.values():
    for x in d.values():
      if not isinstance(x, np.memmap):
        continue
      x._mmap.madvise(mmap.MADV_DONTNEED)
      fd = os.open(x.filename, os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def warm_page_cache(olib: OffloadedLibrary) -> tuple[int, float]:
  """Reads the factor files once, sequentially, so misses find them in the page cache
  (page cache, not process memory). Returns (bytes, seconds)."""
  total, t = 0, time.perf_counter()
  buf = bytearray(64 << 20)
  for d in olib.host.factors.values():
    for x in d.values():
      if not isinstance(x, np.memmap):
        continue
      with open(x.filename, "rb", buffering=0) as f:
        while n := f.readinto(buf):
          total += n
  return total, time.perf_counter() - t


# --- Timing ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, hook, tokens, positions, cache):
  """One [B, 1] decode step of the layer (no LM head); weights are arguments."""
  model = nnx.merge(graphdef, state)
  hidden, _, aux = model(tokens, positions, cache, hook, return_hidden=True, return_aux=True)
  return hidden, aux


class Case:
  """One timed configuration: a hook, its batch, its token regime."""

  def __init__(self, name, hook, batch, regime, olib=None):
    self.name, self.hook, self.batch, self.regime, self.olib = name, hook, batch, regime, olib
    self.times: list[float] = []
    self.bytes_moved = self.bytes_needed = self.hits = self.misses = self.steps = 0


def run_case(case: Case, model_parts, cache, positions, rng, steps: int, fixed_tokens) -> None:
  graphdef, state = model_parts
  vocab = SMOLLM2.vocab_size

  def tokens():
    if case.regime == "hit":
      return fixed_tokens
    return jnp.asarray(rng.integers(0, vocab, (case.batch, 1)), jnp.int32)

  if case.regime == "hit":  # untimed: the cache holds these tokens' adapters
    jax.block_until_ready(_step(graphdef, state, case.hook, fixed_tokens, positions, cache))
  before = case.olib.stats()["total"] if case.olib is not None else None
  for _ in range(steps):
    tok = tokens()
    if case.regime == "disk":
      drop_page_cache(case.olib)
    t = time.perf_counter()
    jax.block_until_ready(_step(graphdef, state, case.hook, tok, positions, cache))
    case.times.append(time.perf_counter() - t)
  if before is not None:
    after = case.olib.stats()["total"]
    case.bytes_moved += after.bytes_moved - before.bytes_moved
    case.bytes_needed += after.bytes_needed - before.bytes_needed
    case.hits += after.hits - before.hits
    case.misses += after.misses - before.misses
  case.steps += steps


def measure(args) -> dict:
  config = SMOLLM2
  res: dict = {
    "command": "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 "
    "MALLOC_TOP_PAD_=1073741824 python -m benchmarks.offload "
    + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    "machine": platform.machine(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "load_average_start": os.getloadavg()[0],
    "k": args.k,
    "rank": args.rank,
    "slots": args.slots,
    "b_slots": args.b_slots,
    "chunk_rows": args.chunk_rows,
    "steps": args.steps,
    "rounds": args.rounds,
    "shape": {"D": config.hidden_size, "F": config.intermediate_size, "layers": 1},
  }
  n, scaled = fit_n(args, config)
  res["n"], res["requested_n"], res["scaled_down"] = n, args.n, scaled
  if scaled:
    log(scaled)
  folder = pathlib.Path(args.folder)
  small = folder.parent / (folder.name + f"_n{args.resident_n}")
  log(f"writing the synthetic library: N = {n} into {folder}")
  res["write_s"] = write_library(args, config, folder, n)
  write_library(args, config, small, args.resident_n)
  res["disk_bytes"] = sum(p.stat().st_size for p in folder.glob("*.npy"))
  res["disk_free_after_gb"] = shutil.disk_usage(folder).free / 1e9

  cache_kw = dict(slots=args.slots, b_slots=args.b_slots, chunk_rows=args.chunk_rows)
  t = time.perf_counter()
  big = OffloadedLibrary.open(folder, **cache_kw)
  res["open_s"] = time.perf_counter() - t
  small_off = OffloadedLibrary.open(small, **cache_kw)
  indexed = None
  if args.index_probe:
    t = time.perf_counter()
    indexed = big.with_index(
      probe=args.index_probe, spill=args.index_spill, arrow_dtype=args.index_dtype
    )
    leaves = jax.tree.leaves(indexed.index)
    first = next(iter(indexed.index.values()))
    res["index"] = {
      "probe": args.index_probe,
      "spill": args.index_spill,
      "dtype": args.index_dtype,
      "build_s": time.perf_counter() - t,
      "clusters": int(first.members.shape[-2]),
      "width": int(first.members.shape[-1]),
      "device_bytes": int(sum(x.nbytes for x in leaves)),
    }
    log(f"arrow index built: {res['index']}")
  sketched = None
  if args.sketch:
    dims, pool = (int(v) for v in args.sketch.split(":"))
    t = time.perf_counter()
    rows_dtype = None if args.sketch_rows == "none" else args.sketch_rows
    sketched = big.with_sketch(dims, rows_dtype)
    res["sketch"] = {
      "dims": dims,
      "pool": pool,
      "rows_dtype": args.sketch_rows,
      "build_s": time.perf_counter() - t,
      "device_bytes": int(sum(x.nbytes for x in jax.tree.leaves(sketched.index))),
      "rows_bytes": int(sum(s.rows.nbytes for s in sketched.index.values() if s.rows is not None)),
      "numbers_read": {
        m: arrow_sketch.numbers_read(n, int(a.shape[-2]), dims, pool) for m, a in big.arrows.items()
      },
    }
    log(f"arrow sketch built: {res['sketch']}")
  resident = resident_library(args, config, args.resident_n)
  model = CausalLM(config, rngs=nnx.Rngs(args.seed))
  graphdef, state = nnx.split(model)
  layer_param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.model.layers)))
  res["memory"] = {
    "layer_params": layer_param_bytes,
    "resident": {"n": args.resident_n, "device": resident.nbytes(), "host": 0},
    "offloaded_small": {
      "n": args.resident_n,
      "device": small_off.device_nbytes(),
      "host": small_off.host_nbytes(),
    },
    "offloaded": {"n": n, "device": big.device_nbytes(), "host": big.host_nbytes()},
  }
  spec = RouterSpec("lag", k=args.k)
  rng = np.random.default_rng(args.seed + 1)
  batches = [int(b) for b in args.batches.split(",")]
  res["batches"] = []
  for B in batches:
    cache = KVCache.zeros(config, B, args.cache_len)
    positions = jnp.full((B, 1), args.cache_len // 2, jnp.int32)
    fixed_tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, 1)), jnp.int32)
    hooks = {
      "base": None,
      "resident": RoutedAdapters((routed(resident, B, spec),)),
      "offloaded_small": RoutedAdapters((routed(small_off, B, spec),)),
      "offloaded": RoutedAdapters((routed(big, B, spec),)),
    }
    if indexed is not None:
      ispec = RouterSpec("lag", k=args.k, index_probe=args.index_probe)
      hooks["offloaded_index"] = RoutedAdapters((routed(indexed, B, ispec),))
    if sketched is not None:
      sspec = RouterSpec("lag", k=args.k, index_sketch=dims, index_probe=pool)
      hooks["offloaded_sketch"] = RoutedAdapters((routed(sketched, B, sspec),))
    # Correctness at the resident size: the same ids and hidden states.
    h0, aux0 = _step(graphdef, state, hooks["resident"], fixed_tokens, positions, cache)
    h1, aux1 = _step(graphdef, state, hooks["offloaded_small"], fixed_tokens, positions, cache)
    ids_equal = all(
      bool(np.array_equal(np.asarray(a), np.asarray(b)))
      for a, b in zip(jax.tree.leaves(aux0), jax.tree.leaves(aux1), strict=True)
    )
    check = {"ids_equal": ids_equal, "max_abs_diff": float(np.max(np.abs(h0 - h1)))}
    log(f"B={B}: offloaded vs resident at N={args.resident_n}: {check}")
    cases = [Case("base", None, B, "-"), Case("resident", hooks["resident"], B, "-")]
    regimes = ["miss", "hit"] + ([] if args.no_disk_regime else ["disk"])
    for name, olib in (("offloaded_small", small_off), ("offloaded", big)):
      cases += [Case(name, hooks[name], B, r, olib) for r in regimes]
    if indexed is not None:  # the disk regime is the exact one's: misses move alike
      cases += [
        Case("offloaded_index", hooks["offloaded_index"], B, r, indexed) for r in ("miss", "hit")
      ]
    if sketched is not None:
      cases += [
        Case("offloaded_sketch", hooks["offloaded_sketch"], B, r, sketched) for r in ("miss", "hit")
      ]
    for c in cases:  # compile (untimed)
      t = time.perf_counter()
      jax.block_until_ready(_step(graphdef, state, c.hook, fixed_tokens, positions, cache))
      log(f"  compiled {c.name}/{c.regime} B={B} in {time.perf_counter() - t:.1f} s")
    # The page-cache drops of the disk regime would leave later miss rounds reading the
    # disk: the disk regime runs after the interleaved rounds of the others.
    for olib in (small_off, big):
      nbytes, secs = warm_page_cache(olib)
      log(f"  page cache warmed: {nbytes / 1e9:.2f} GB in {secs:.1f} s")
      res.setdefault("page_cache_warm", []).append({"bytes": nbytes, "s": secs, "batch": B})
    for group in (
      [c for c in cases if c.regime != "disk"],
      [c for c in cases if c.regime == "disk"],
    ):
      for r in range(args.rounds if group else 0):
        for c in group:
          run_case(c, (graphdef, state), cache, positions, rng, args.steps, fixed_tokens)
        log(
          f"  round {r + 1}/{args.rounds}: "
          + ", ".join(f"{c.name}/{c.regime} {1e3 * statistics.median(c.times):.1f}" for c in group)
          + " ms"
        )
    rows = []
    for c in cases:
      rows.append(
        {
          "variant": c.name,
          "regime": c.regime,
          "median_ms": 1e3 * statistics.median(c.times),
          "p25_ms": 1e3 * float(np.percentile(c.times, 25)),
          "p75_ms": 1e3 * float(np.percentile(c.times, 75)),
          "bytes_per_step": c.bytes_moved / c.steps if c.olib is not None else 0.0,
          "needed_per_step": c.bytes_needed / c.steps if c.olib is not None else 0.0,
          "hit_rate": c.hits / (c.hits + c.misses) if c.hits + c.misses else None,
          "misses_per_step": c.misses / c.steps if c.olib is not None else 0.0,
          "steps": c.steps,
        }
      )
    res["batches"].append({"batch": B, "check": check, "rows": rows})
  res["load_average_end"] = os.getloadavg()[0]
  res["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  res["full_depth"] = full_depth(res, config, args)
  if not args.keep:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(small, ignore_errors=True)
    res["removed_files"] = True
  return res


def full_depth(res: dict, config: ModelConfig, args) -> dict:
  """Per-layer figures scaled to FULL_DEPTH layers (the cost model: each layer routes
  alike, so bytes, memory and step time add up layer by layer)."""
  sizes = per_adapter_bytes(config, args.rank)
  n, L = res["n"], FULL_DEPTH
  mem = res["memory"]
  cache_layer = mem["offloaded"]["device"]["caches"]
  out = {
    "layers": L,
    "offloaded_arrow_bytes": L * n * (sizes["arrows"] + sizes["valid"]),
    "offloaded_cache_bytes": L * cache_layer,
    "offloaded_device_bytes": L * n * (sizes["arrows"] + sizes["valid"]) + L * cache_layer,
    "offloaded_host_bytes": L * n * sizes["factors"],
    "offloaded_host_bytes_f32": 2 * L * n * sizes["factors"],
    "resident_device_bytes": L * mem["resident"]["device"],
    "all_resident_device_bytes": L * n * sum(sizes.values()),
    "layer_param_bytes": L * mem["layer_params"],
    "batches": [],
  }
  for b in res["batches"]:
    rows = {(r["variant"], r["regime"]): r for r in b["rows"]}
    entry = {"batch": b["batch"]}
    for key, r in rows.items():
      entry["/".join(k for k in key if k != "-")] = {
        "step_ms": L * r["median_ms"],
        "bytes_per_step": L * r["bytes_per_step"],
        "bytes_per_token": L * r["bytes_per_step"] / b["batch"],
      }
    out["batches"].append(entry)
  # Worst case per token and layer (every candidate and winner a miss), from shapes.
  shapes = config.module_shapes()
  fi = jnp.dtype(FACTOR_DTYPE).itemsize
  worst = sum(
    args.k * args.rank * shapes[m][1] * fi + shapes[m][0] * args.rank * fi for m in MLP_MODULES
  )
  out["worst_bytes_per_token_layer"] = worst
  out["worst_bytes_per_token"] = L * worst
  return out


# --- Report --------------------------------------------------------------------------------


def _gb(x) -> str:
  return f"{x / 1e9:,.2f} GB" if x >= 1e9 else f"{x / 1e6:,.1f} MB"


def _bytes(x) -> str:
  if x >= 1e6:
    return f"{x / 1e6:,.2f} MB"
  if x >= 1e3:
    return f"{x / 1e3:,.1f} KB"
  return f"{x:,.0f} B"


LABEL = {
  "base": "base (no adapters)",
  "resident": "resident",
  "offloaded_small": "offloaded",
  "offloaded": "offloaded",
  "offloaded_index": "offloaded, arrow index",
  "offloaded_sketch": "offloaded, arrow sketch",
}


def render(res: dict) -> str:
  mem = res["memory"]
  n, rn = res["n"], mem["resident"]["n"]
  fd = res["full_depth"]
  lines = [
    BEGIN,
    "## Libraries larger than device memory: an offloaded library (`benchmarks/offload.py`)",
    "",
    f"N = {n:,} synthetic rank-{res['rank']} knowledge adapters on one SmolLM2-shaped layer "
    f"(D {res['shape']['D']}, F {res['shape']['F']}) with gate/up/down: arrows on the device "
    f"({_gb(mem['offloaded']['device']['arrows'])} float32), A* / B* in bfloat16 in memory-"
    f"mapped files ({_gb(mem['offloaded']['host'])}; {_gb(res['disk_bytes'])} on disk with "
    "the arrows' copy), a device cache of "
    f"{res['slots']:,} A* and {res['b_slots']:,} B* slots per module (LRU over (layer, id), "
    f"{_gb(mem['offloaded']['device']['caches'])}), rows moved {res['chunk_rows']} at a time. "
    f"One [B, 1] decode step of the layer (attention + MLP, 128-slot KV cache, no LM head), "
    f"LAG k = {res['k']}, against base and N = {rn:,} all-resident adapters (same dtypes). "
    f"Medians of {res['rounds']} interleaved rounds x {res['steps']} steps. "
    f"Machine: {res['cpu_count']} CPUs ({res['machine']}), jax {res['jax']}, 1-min load "
    f"{res['load_average_start']:.1f} -> {res['load_average_end']:.1f}; here the device is "
    "the CPU, so host -> device transfers are memcpys and 'device' bytes are the bytes of "
    "the jax arrays held.",
  ]
  if res.get("scaled_down"):
    lines += ["", f"**Scaled down:** {res['scaled_down']}."]
  if res.get("index"):
    ix = res["index"]
    lines += [
      "",
      f"*Arrow index* rows: the same N = {n:,} library with `with_index` "
      f"({ix['clusters']:,} clusters of {ix['width']} per module, {ix['dtype']} arrows, "
      f"spill {ix['spill']}; built in {ix['build_s']:.0f} s, {_gb(ix['device_bytes'])} on "
      f"the device) and `RouterSpec('lag', k={res['k']}, index_probe={ix['probe']})`: "
      f"per token the Arrow filter reads {ix['clusters']:,} centroids and "
      f"{ix['probe']} x {ix['width']} arrows instead of all {n:,} (recall: "
      "`benchmarks/arrow_index.py`).",
    ]
  if res.get("sketch"):
    sk = res["sketch"]
    share = ", ".join(f"{m} {100 * v:.1f}%" for m, v in sk["numbers_read"].items())
    rows = sk.get("rows_dtype", "none")
    rows = None if rows == "none" else rows
    held = (
      f", of which {_gb(sk.get('rows_bytes', 0))} the adapter-major copy of the arrows "
      "the pool is rescored from"
      if rows
      else "; the pool's arrows gathered from the [I, N] arrows"
    )
    lines += [
      "",
      f"*Arrow sketch* rows: the same N = {n:,} library with `with_sketch({sk['dims']}, "
      f"rows_dtype={rows!r})` (built in {sk['build_s']:.0f} s, {_gb(sk['device_bytes'])} "
      f"on the device{held}) and "
      f"`RouterSpec('lag', k={res['k']}, index_sketch={sk['dims']}, "
      f"index_probe={sk['pool']})`: per token the Arrow filter reads {n:,} x {sk['dims']} "
      f"sketch numbers and the pool's {sk['pool']} arrows, a share of the exact scan's "
      f"numbers of {share}. The arrows here are random, so the sketch's recall on them "
      'means nothing; its recall on real arrows: BENCHMARKS.md, "Arrow filter".',
    ]
  lines += [
    "",
    "Regimes: *miss* = fresh random tokens each step (the candidates are new adapters; "
    "the factor files were read once beforehand, so rows come from the page cache); "
    "*hit* = the previous step's tokens again (every candidate cached on the device); "
    "*disk* = miss with the factor files dropped from the page cache before each step "
    "(madvise + fadvise DONTNEED), so rows come from the disk (its rounds run after the "
    "others'). base, resident, miss and hit rounds are interleaved.",
    "",
    "| B | library | N | regime | step ms (p25-p75) | vs base | vs resident | "
    "moved / step (rows needed) | hit rate |",
    "|---:|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for b in res["batches"]:
    rows = b["rows"]
    base = next(r for r in rows if r["variant"] == "base")["median_ms"]
    resid = next(r for r in rows if r["variant"] == "resident")["median_ms"]
    for r in rows:
      nn = {"base": "-", "resident": rn, "offloaded_small": rn}.get(r["variant"], n)
      hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.0f}%"
      moved = (
        "-"
        if r["variant"] in ("base", "resident")
        else f"{_bytes(r['bytes_per_step'])} ({_bytes(r.get('needed_per_step', 0.0))})"
      )
      lines.append(
        f"| {b['batch']} | {LABEL[r['variant']]} | {nn if nn == '-' else f'{nn:,}'} | "
        f"{r['regime']} | {r['median_ms']:.1f} ({r['p25_ms']:.1f}-{r['p75_ms']:.1f}) | "
        f"{r['median_ms'] / base:.2f}x | {r['median_ms'] / resid:.2f}x | {moved} | {hit} |"
      )
  checks = ", ".join(
    f"B={b['batch']}: ids {'equal' if b['check']['ids_equal'] else 'DIFFER'}, "
    f"max |diff| {b['check']['max_abs_diff']:.1e}"
    for b in res["batches"]
  )
  off_dev = sum(mem["offloaded"]["device"].values())
  lines += ["", "Findings (computed from the table):", ""] + findings(res)
  lines += [
    "",
    f"Device bytes of the library (one layer): resident N = {rn:,}: "
    f"{_gb(mem['resident']['device'])}; offloaded N = {n:,}: {_gb(off_dev)} "
    f"(arrows {_gb(mem['offloaded']['device']['arrows'])}, caches "
    f"{_gb(mem['offloaded']['device']['caches'])}) with {_gb(mem['offloaded']['host'])} of "
    f"factors on disk; the layer's own weights: {_gb(mem['layer_params'])}. "
    f"Offloaded vs resident at N = {rn:,} on the same tokens: {checks}. "
    f"Peak RSS {res['max_rss_gb']:.1f} GB.",
    "",
    f"**Full depth ({fd['layers']} layers), by the cost model** (per-layer figures x "
    f"{fd['layers']}; nothing materialised):",
    "",
    "| | device | host / disk |",
    "|---|---:|---:|",
    f"| all resident, N = {n:,} | {_gb(fd['all_resident_device_bytes'])} | - |",
    f"| offloaded, N = {n:,}: arrows + valid | {_gb(fd['offloaded_arrow_bytes'])} | "
    f"{_gb(fd['offloaded_host_bytes'])} bf16 ({_gb(fd['offloaded_host_bytes_f32'])} f32) |",
    f"| offloaded: caches at {fd['layers']}x the slots (the same per-layer capacity) | "
    f"{_gb(fd['offloaded_cache_bytes'])} | - |",
    f"| resident, N = {rn:,} | {_gb(fd['resident_device_bytes'])} | - |",
    f"| model layers (float32) | {_gb(fd['layer_param_bytes'])} | - |",
    "",
    f"| B | offloaded N = {n:,}: miss ms / step | hit ms / step | with the arrow index: "
    "miss / hit ms | with the arrow sketch: miss / hit ms | "
    f"offloaded N = {rn:,}: hit ms | resident N = {rn:,} ms | base ms | "
    "moved per token (miss) |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]

  def pair(e, v):
    if f"{v}/hit" not in e:
      return "-"
    return f"{e[f'{v}/miss']['step_ms']:.0f} / {e[f'{v}/hit']['step_ms']:.0f}"

  for e in fd["batches"]:
    lines.append(
      f"| {e['batch']} | {e['offloaded/miss']['step_ms']:.0f} | "
      f"{e['offloaded/hit']['step_ms']:.0f} | {pair(e, 'offloaded_index')} | "
      f"{pair(e, 'offloaded_sketch')} | "
      f"{e['offloaded_small/hit']['step_ms']:.0f} | {e['resident']['step_ms']:.0f} | "
      f"{e['base']['step_ms']:.0f} | {_bytes(e['offloaded/miss']['bytes_per_token'])} |"
    )
  lines += [
    "",
    f"Worst case per token (every candidate a miss): {_bytes(fd['worst_bytes_per_token_layer'])} "
    f"per layer, {_bytes(fd['worst_bytes_per_token'])} over {fd['layers']} layers; at 25 GB/s "
    f"(PCIe 4.0 x16-class host -> device) that is "
    f"{1e3 * fd['worst_bytes_per_token'] / 25e9:.2f} ms per token, on top of reading "
    f"{_gb(fd['offloaded_arrow_bytes'])} of arrows per decode step.",
    "",
    "```",
    res["command"],
    "```",
    END,
  ]
  return "\n".join(lines) + "\n"


def _speedup(before: float, after: float) -> str:
  r = before / after
  return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def findings(res: dict) -> list[str]:
  """Bullet points read off the measurements."""
  mem = res["memory"]
  n, rn = res["n"], mem["resident"]["n"]
  out = []
  for b in res["batches"]:
    r = {(x["variant"], x["regime"]): x for x in b["rows"]}
    B = b["batch"]
    resident = r["resident", "-"]["median_ms"]
    s_hit = r["offloaded_small", "hit"]
    hit, miss = r["offloaded", "hit"], r["offloaded", "miss"]
    trips = 2 * 3  # A* and B* plans per routed module, gate/up/down
    text = (
      f"- B = {B}: at the same N = {rn:,}, the offloaded library with every candidate cached "
      f"costs {s_hit['median_ms'] - resident:+.1f} ms per step over the resident one: the "
      f"{trips} host round trips per layer (about "
      f"{(s_hit['median_ms'] - resident) / trips:.2f} ms each here). At N = {n:,} the step "
      f"({hit['median_ms']:.1f} ms with every candidate cached) is the on-device arrow "
      f"scoring over all N; bringing in the misses ({_bytes(miss['needed_per_step'])} of "
      f"rows, {100 * (1 - miss['hit_rate']):.0f}% of the candidates) adds "
      f"{miss['median_ms'] - hit['median_ms']:.1f} ms from the page cache"
    )
    if ("offloaded", "disk") in r:
      disk = r["offloaded", "disk"]
      text += f" and {disk['median_ms'] - hit['median_ms']:.0f} ms from a cold disk"
    out.append(text + ".")
    for variant, what in (("offloaded_index", "arrow index"), ("offloaded_sketch", "arrow sketch")):
      if (variant, "hit") not in r:
        continue
      ih, im = r[variant, "hit"], r[variant, "miss"]
      out.append(
        f"- B = {B}, {what}: N = {n:,} with every candidate cached takes "
        f"{ih['median_ms']:.1f} ms per layer against {hit['median_ms']:.1f} ms for the exact "
        f"filter ({_speedup(hit['median_ms'], ih['median_ms'])}); against N = {rn:,} "
        f"offloaded ({s_hit['median_ms']:.1f} ms) that is "
        f"{ih['median_ms'] / s_hit['median_ms']:.2f}x, against N = {rn:,} resident "
        f"({resident:.1f} ms) {ih['median_ms'] / resident:.2f}x (issue 15's goal: N = 10^5 "
        f"<= 2x N = 10^3). With misses: {im['median_ms']:.1f} ms."
      )
  off = sum(mem["offloaded"]["device"].values())
  fd = res["full_depth"]
  out.append(
    f"- Device memory for N = {n:,}: {_gb(off)} per layer instead of "
    f"{_gb(fd['all_resident_device_bytes'] / fd['layers'])} all resident "
    f"({fd['all_resident_device_bytes'] / fd['layers'] / off:.1f}x less); at "
    f"{fd['layers']} layers {_gb(fd['offloaded_arrow_bytes'])} of arrows (plus caches) "
    f"against {_gb(fd['all_resident_device_bytes'])}. The arrow scoring is now the step: "
    "LAG.md's n h term (n h arrow bytes read per step, 2 n h FLOPs per token); bfloat16 "
    "arrows would halve the bytes (not measured here)."
  )
  return out


def plot(res: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
  n, rn = res["n"], res["memory"]["resident"]["n"]
  batches = res["batches"]

  def label(r):
    size = {"base": "", "resident": f"\n{rn:,}", "offloaded_small": f"\n{rn:,}"}
    head = {
      "base": "base",
      "resident": "resident",
      "offloaded_small": "offl.",
      "offloaded": "offl.",
      "offloaded_index": "offl.+index",
      "offloaded_sketch": "offl.+sketch",
    }
    tail = "" if r["regime"] == "-" else f"\n{r['regime']}"
    return head[r["variant"]] + size.get(r["variant"], f"\n{n:,}") + tail

  rows0 = batches[0]["rows"]
  x = np.arange(len(rows0))
  width = 0.8 / len(batches)
  for i, b in enumerate(batches):
    ms = [r["median_ms"] for r in b["rows"]]
    err = [
      [r["median_ms"] - r["p25_ms"] for r in b["rows"]],
      [r["p75_ms"] - r["median_ms"] for r in b["rows"]],
    ]
    axes[0].bar(x + i * width, ms, width, yerr=err, label=f"B = {b['batch']}")
  axes[0].set_xticks(x + width * (len(batches) - 1) / 2)
  axes[0].set_xticklabels([label(r) for r in rows0], fontsize=7)
  axes[0].set_yscale("log")
  axes[0].set_ylabel("decode step of one layer, ms (median, p25-p75)")
  axes[0].set_title(f"LAG k = {res['k']}, SmolLM2-shaped layer, gate/up/down", fontsize=9)
  moving = [j for j, r in enumerate(rows0) if r["variant"].startswith("offloaded")]
  moving = [j for j in moving if rows0[j]["regime"] != "hit"]
  x2 = np.arange(len(moving))
  for i, b in enumerate(batches):
    moved = [b["rows"][j]["bytes_per_step"] / 1e6 for j in moving]
    needed = [b["rows"][j].get("needed_per_step", 0.0) / 1e6 for j in moving]
    axes[1].bar(x2 + i * width, moved, width, label=f"B = {b['batch']} moved", alpha=0.5)
    axes[1].bar(x2 + i * width, needed, width * 0.5, label=f"B = {b['batch']} rows needed")
  axes[1].set_xticks(x2 + width * (len(batches) - 1) / 2)
  axes[1].set_xticklabels([label(rows0[j]) for j in moving], fontsize=7)
  axes[1].set_ylabel("MB host -> device per step (hit regime: 0)")
  axes[1].set_title("offloaded: bytes moved per decode step (misses only)", fontsize=9)
  for ax in axes:
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.render:
    res = json.loads(pathlib.Path(args.json).read_text())
  else:
    res = measure(args)
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
  write_section(args.markdown, render(res), BEGIN, END)
  plot(res, args.plot)
  log(f"wrote {args.json}, {args.markdown}, {args.plot}")


if __name__ == "__main__":
  main()
