"""What checking a saved library costs: AdapterLibrary.load with and without
verification (a sha256 of every array against library.json, and a NaN / Inf scan).

  python -m benchmarks.library_load --n=200

A random library of SmolLM2-135M's MLP shapes (30 layers, gate/up/down, rank 6, float32;
random factors, since only bytes matter here) is saved once under --dir and loaded
--runs times each way, alternating; medians go to benchmarks/results/library_load.json
and a BENCHMARKS.md section, with the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from benchmarks.sections import write_section
from lag_jax.routing.library import AdapterLibrary
from lag_jax.testing.libraries import random_library

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {"gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}  # (O, I)
BEGIN, END = "<!-- library_load:begin -->", "<!-- library_load:end -->"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=200, help="adapters (4.56 MB each)")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--dir", default=os.path.expanduser("~/lag_bench_library_load"))
  args = p.parse_args(argv)
  load_before = os.getloadavg()[0]
  library = random_library(args.n, SHAPES, 30, rank=6, orthonormal=False)
  shutil.rmtree(args.dir, ignore_errors=True)
  t = time.perf_counter()
  library.save(args.dir)
  save_s = time.perf_counter() - t
  times = {False: [], True: []}
  try:
    for _ in range(args.runs):
      for verify in (False, True):
        t = time.perf_counter()
        AdapterLibrary.load(args.dir, host=True, verify=verify)
        times[verify].append(time.perf_counter() - t)
  finally:
    shutil.rmtree(args.dir, ignore_errors=True)
  off, on = statistics.median(times[False]), statistics.median(times[True])
  gb = library.nbytes() / 1e9
  result = {
    "n": args.n,
    "gb": gb,
    "save_s": save_s,
    "load_s": off,
    "load_verified_s": on,
    "verify_gb_per_s": gb / max(on - off, 1e-9),
    "runs": args.runs,
    "load_avg_1min": [load_before, os.getloadavg()[0]],
    "cpus": os.cpu_count(),
  }
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  with open(os.path.join(HERE, "results", "library_load.json"), "w") as f:
    json.dump(result, f, indent=1)
  section = "\n".join(
    [
      BEGIN,
      "## Checking a saved library at load",
      "",
      "`python -m benchmarks.library_load --n=200` (random SmolLM2-shaped MLP library, "
      f"N = {args.n}, {gb:.2f} GB float32; medians of {args.runs} alternating loads; "
      f"{result['cpus']} cores, 1-min load {load_before:.1f} before, "
      f"{result['load_avg_1min'][1]:.1f} after):",
      "",
      "| load | seconds | vs unverified |",
      "|---|---|---|",
      f"| `verify=False` | {off:.2f} | 1.00x |",
      f"| `verify=True` (sha256 per array, NaN / Inf scan) | {on:.2f} | {on / off:.2f}x |",
      "",
      f"Verification reads {result['verify_gb_per_s']:.1f} GB/s (two hashing threads); the "
      f"save, digests included, took {save_s:.1f} s.",
      END,
    ]
  )
  write_section(os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"), section, BEGIN, END)
  print(section)
  return result


if __name__ == "__main__":
  main()
