"""Peak memory of a library build: adapters streamed from disk against held in memory.

  python -m benchmarks.signature_memory --n=1000

N random rank-6 SmolLM2 adapters on gate/up/down (4.6 MB each) are written once as PEFT
folders under --dir (never all in memory), then ``AdapterLibrary.from_adapters`` builds
the library in a fresh process each way, alternating:

- ``streamed``: from ``AdapterFile``s (what ``load_or_build_library``, the
  ``build_library`` job and library training use): each chunk is read, aligned, written
  into the library's arrays and dropped;
- ``in memory``: every adapter loaded first (what a caller holding ``LoraAdapter``s
  does), then the same build.

Reports each process's peak RSS against the library's size, and the build time (medians
over --runs); writes benchmarks/results/signature_memory.json and a BENCHMARKS.md
section. Goal (issue 15): peak <= 1.5x the library, at unchanged speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from benchmarks.common import command_line, log, run_child
from benchmarks.sections import publish

BEGIN, END = "<!-- signature_memory:begin -->", "<!-- signature_memory:end -->"


def _write_child(out_path: str, n: int, folder: str) -> None:
  from benchmarks.routing.setup import KNOW_ALPHA, KNOW_MODULES, KNOW_RANK, SHAPES
  from lag_jax.adapters import save_peft_adapter
  from lag_jax.testing.libraries import random_lora

  config = SHAPES["smollm2"]
  for i in range(n):  # one at a time: the writer never holds them all
    a = random_lora(config, f"k{i:05d}", KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, seed=i)
    save_peft_adapter(a, os.path.join(folder, a.name))
  with open(out_path, "w") as f:
    json.dump({"n": n}, f)


def _build_child(out_path: str, folder: str, mode: str, chunk: int) -> None:
  import resource

  import jax

  from benchmarks.routing.setup import KNOW_MODULES, SHAPES
  from lag_jax.adapters import AdapterFile, load_peft_adapter
  from lag_jax.routing.library import AdapterLibrary, peft_adapter_dirs

  config = SHAPES["smollm2"]
  dirs = peft_adapter_dirs(folder)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t = time.perf_counter()
  if mode == "streamed":
    adapters = [AdapterFile(d) for d in dirs]
  else:
    adapters = [load_peft_adapter(d) for d in dirs]
  read_s = time.perf_counter() - t
  lib = AdapterLibrary.from_adapters(adapters, config, KNOW_MODULES, chunk=chunk)
  jax.block_until_ready(lib.weights)
  total = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  with open(out_path, "w") as f:
    json.dump(
      {
        "mode": mode,
        "n": len(lib),
        "library_bytes": lib.nbytes(),
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss0,
        "read_s": read_s,
        "total_s": total,
      },
      f,
    )


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=1000)
  p.add_argument("--runs", type=int, default=2)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--dir", default=os.path.expanduser("~/lag_bench_signature_memory"))
  p.add_argument("--keep", action="store_true", help="keep the adapter folders")
  p.add_argument("--no-write", action="store_true")
  args = p.parse_args(argv)
  load0 = os.getloadavg()[0]
  marker = os.path.join(args.dir, f".complete-{args.n}")
  if not os.path.exists(marker):
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    t = time.perf_counter()
    res, why = run_child(_write_child, 7200, n=args.n, folder=args.dir)
    if res is None:
      raise SystemExit(f"writing the adapters failed: {why}")
    open(marker, "w").close()
    log(f"wrote {args.n} adapters in {time.perf_counter() - t:.0f} s")
  samples = {"streamed": [], "in memory": []}
  try:
    for r in range(args.runs):
      for mode in samples:
        res, why = run_child(_build_child, 7200, folder=args.dir, mode=mode, chunk=args.chunk)
        if res is None:
          raise SystemExit(f"{mode} build failed: {why}")
        samples[mode].append(res)
        log(
          f"round {r + 1} {mode}: peak {res['peak_rss_bytes'] / 1e9:.2f} GB for a "
          f"{res['library_bytes'] / 1e9:.2f} GB library, {res['total_s']:.1f} s"
        )
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)
  rows = {}
  for mode, runs in samples.items():
    lib = runs[0]["library_bytes"]
    peak = statistics.median(x["peak_rss_bytes"] for x in runs)
    rows[mode] = {
      "library_gb": lib / 1e9,
      "peak_rss_gb": peak / 1e9,
      "peak_over_library": peak / lib,
      "seconds": statistics.median(x["total_s"] for x in runs),
      "runs": len(runs),
    }
  result = {
    "command": command_line("benchmarks.signature_memory"),
    "n": args.n,
    "chunk": args.chunk,
    "rows": rows,
    "load_avg_1min": [load0, os.getloadavg()[0]],
    "cpus": os.cpu_count(),
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  md = markdown(result)
  print(md)
  if not args.no_write:
    publish("signature_memory", result, md, BEGIN, END)
  return result


def markdown(r: dict) -> str:
  s, m = r["rows"]["streamed"], r["rows"]["in memory"]
  lines = [
    BEGIN,
    "## Signature build: peak memory",
    "",
    f"`{r['command'].strip()}` ({r['date']}; {r['cpus']} cores, 1-min load "
    f"{r['load_avg_1min'][0]:.1f} before, {r['load_avg_1min'][1]:.1f} after): N = {r['n']} "
    f"random rank-6 SmolLM2 adapters on gate/up/down read from PEFT folders, "
    f"`from_adapters(chunk={r['chunk']})`, each build in a fresh process; medians of "
    f"{s['runs']} alternating runs. Peak = the process's maximum RSS (Python, JAX and "
    "the model-free runtime included).",
    "",
    "| adapters | library GB | peak RSS GB | peak / library | seconds |",
    "|---|---|---|---|---|",
  ]
  for name, row in (("streamed (`AdapterFile`)", s), ("all loaded first", m)):
    lines.append(
      f"| {name} | {row['library_gb']:.2f} | {row['peak_rss_gb']:.2f} | "
      f"{row['peak_over_library']:.2f}x | {row['seconds']:.1f} |"
    )
  lines.append(END)
  return "\n".join(lines)


if __name__ == "__main__":
  main()
