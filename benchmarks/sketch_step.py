"""A whole decode step at N = 10^5 through the arrow sketch against N = 10^3 exact, resident.

  python -m benchmarks.sketch_step --n=100000 --sketches=32:160,64:320

Issue 15's goal: the N = 10^5 decode step <= 2x the N = 10^3 one. ``benchmarks.offload``
times the N = 10^5 library offloaded (its factors memory-mapped, a device cache), whose
host round trips per layer weigh as much as the filter; this one holds both libraries
resident on the device, so the difference between the rows is the routing alone. One
[B, 1] decode step of one SmolLM2-shaped layer (attention + the MLP's gate / up / down
routed, a 128-slot KV cache, no LM head), LAG k = 20, the same synthetic rank-6 adapters
as ``benchmarks.offload`` (bfloat16 factors, float32 arrows). A sketch whose batch of
pools (B x P) would hold N adapters or more is skipped at that batch: its rescoring
alone would read more than the exact scan.

  base          the layer without adapters;
  N = 1,000     resident, the exact Arrow filter (the goal's reference);
  N = n exact   resident, the exact filter over all n arrows;
  N = n Z:P     resident, through the arrow sketch (``with_sketch(Z)``, float32 rows).

Rounds are interleaved (every case once per round, in turn); medians of the rounds.
A calibrated sketch (routing/calibration.py) costs what a plain one of the same Z:P
costs (the same shapes; only the basis differs), so the arrows here are random and the
sketch plain: time only. Recall on real arrows: BENCHMARKS.md ("Arrow filter").
One N = 10^5 layer holds ~7.6 GB of bfloat16 factors, 1.1 GB of arrows and 1.1 GB of
the sketch's rows: it needs ~12 GB of memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import LoadMonitor, command_line, load_sentence, log, write_json
from benchmarks.offload import SMOLLM2, _step, resident_library
from lag_jax.model.kv_cache import KVCache
from lag_jax.model.transformer import CausalLM
from lag_jax.routing import arrow_sketch
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.routers import RouterSpec

ROOT = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=100_000, help="the large library")
  p.add_argument("--reference_n", type=int, default=1000, help="the goal's reference size")
  p.add_argument("--sketches", default="32:160,64:320", help="Z:P pairs")
  p.add_argument("--batches", default="1,16")
  p.add_argument("--k", type=int, default=20)
  p.add_argument("--rank", type=int, default=6)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps", type=int, default=10, help="timed steps per case and round")
  p.add_argument("--cache_len", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=os.path.join(ROOT, "results", "sketch_step.json"))
  args = p.parse_args(argv)
  sketches = [tuple(int(v) for v in s.split(":")) for s in args.sketches.split(",")]
  gen = types.SimpleNamespace(seed=args.seed, rank=args.rank, write_chunk=4096)
  t0 = time.perf_counter()
  small = resident_library(gen, SMOLLM2, args.reference_n)
  big = resident_library(gen, SMOLLM2, args.n)
  log(f"libraries built in {time.perf_counter() - t0:.1f} s")
  sketched = {}
  for z in sorted({z for z, _ in sketches}):
    t0 = time.perf_counter()
    sketched[z] = big.with_sketch(z)
    log(f"sketch Z={z} built in {time.perf_counter() - t0:.1f} s")
  model = CausalLM(SMOLLM2, rngs=nnx.Rngs(args.seed))
  graphdef, state = nnx.split(model)
  step = _step  # jitted, weights and library as arguments
  widths = {m: int(a.shape[-2]) for m, a in big.weights.arrows.items()}
  rows = []
  with LoadMonitor() as monitor:
    for B in (int(b) for b in args.batches.split(",")):
      spec = RouterSpec("lag", k=args.k)
      cases = {
        "base": None,
        f"N = {args.reference_n:,} exact": RoutedAdapters((routed(small, B, spec),)),
        f"N = {args.n:,} exact": RoutedAdapters((routed(big, B, spec),)),
      }
      for z, pool in sketches:
        if B * pool >= args.n:  # the batch's pools alone read more than the exact scan
          log(f"B={B}: sketch {z}:{pool} skipped (B x P >= N)")
          continue
        sspec = RouterSpec("lag", k=args.k, index_sketch=z, index_probe=pool)
        cases[f"N = {args.n:,} sketch {z}:{pool}"] = RoutedAdapters(
          (routed(sketched[z], B, sspec),)
        )
      cache = KVCache.zeros(SMOLLM2, B, args.cache_len)
      positions = jnp.full((B, 1), args.cache_len // 2, jnp.int32)
      rng = np.random.default_rng(args.seed + B)
      tokens = [
        jnp.asarray(rng.integers(0, SMOLLM2.vocab_size, (B, 1)), jnp.int32)
        for _ in range(args.steps)
      ]
      for name, hook in cases.items():  # compile (untimed)
        t = time.perf_counter()
        jax.block_until_ready(step(graphdef, state, hook, tokens[0], positions, cache))
        log(f"  compiled {name} B={B} in {time.perf_counter() - t:.1f} s")
      times = {name: [] for name in cases}
      for _ in range(args.rounds):
        for name, hook in cases.items():
          t = time.perf_counter()
          for tok in tokens:
            jax.block_until_ready(step(graphdef, state, hook, tok, positions, cache))
          times[name].append((time.perf_counter() - t) / len(tokens))
      ref = statistics.median(times[f"N = {args.reference_n:,} exact"])
      base = statistics.median(times["base"])
      for name, ts in times.items():
        ms = statistics.median(ts)
        z_p = name.split("sketch ")[1] if "sketch" in name else None
        read = None
        if z_p is not None:
          z, pool = (int(v) for v in z_p.split(":"))
          # numbers read by the filter per token, as a share of the exact scan at n
          read = sum(
            arrow_sketch.numbers_read(args.n, i, z, pool) * args.n * i for i in widths.values()
          ) / (args.n * sum(widths.values()))
        rows.append(
          {
            "batch": B,
            "case": name,
            "ms": 1e3 * ms,
            "p25_ms": 1e3 * float(np.percentile(ts, 25)),
            "p75_ms": 1e3 * float(np.percentile(ts, 75)),
            "vs_reference": ms / ref,
            "vs_base": ms / base,
            "filter_read_share": read,
          }
        )
        log(f"B={B} {name}: {1e3 * ms:.2f} ms ({ms / ref:.2f}x N = {args.reference_n:,})")
  result = {
    "command": command_line("benchmarks.sketch_step"),
    "n": args.n,
    "reference_n": args.reference_n,
    "k": args.k,
    "rows": rows,
    "load": monitor.summary(),
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "backend": jax.default_backend(),
    "cpus": os.cpu_count(),
  }
  lines = [
    f"`{result['command']}` ({result['date']}, {result['backend']}, {result['cpus']} CPUs; "
    + load_sentence(result["load"], peer=False)
    + ")",
    "",
    f"| B | library, filter | step ms (p25-p75) | vs N = {args.reference_n:,} exact "
    "| vs base | filter reads (share of the exact scan at this N) |",
    "|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    share = "-" if r["filter_read_share"] is None else f"{100 * r['filter_read_share']:.1f}%"
    lines.append(
      f"| {r['batch']} | {r['case']} | {r['ms']:.2f} ({r['p25_ms']:.2f}-{r['p75_ms']:.2f}) "
      f"| {r['vs_reference']:.2f}x | {r['vs_base']:.2f}x | {share} |"
    )
  md = "\n".join(lines)
  print(md)
  result["markdown"] = md
  write_json(args, result)
  return result


if __name__ == "__main__":
  main()
