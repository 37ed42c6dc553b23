"""``python -m benchmarks.routing``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import os
import time

import benchmarks.routing as routing_package
from benchmarks.common import (
  LoadMonitor,
  command_line,
  log,
  machine_info,
  refuse_if_loaded,
  run_child,
  write_json,
)
from benchmarks.routing.parts import RUN_ORDER, _child_part
from benchmarks.routing.report import analysis, markdown, plot, row_label
from benchmarks.routing.setup import BEGIN, END, ROOT
from benchmarks.sections import write_section


def parse_args(argv):
  p = argparse.ArgumentParser(description=routing_package.__doc__.split("\n")[0])
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
  p.add_argument(
    "--merge_from",
    default="",
    help="with --render: first replace the decode / profile rows of --json by those of "
    "this results file (a re-measurement of some rows, e.g. on a quiet machine); the "
    "report names the command that measured them",
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
    "--peft_ours_ns",
    default="1000",
    help="sizes where only our side runs (PEFT's loading alone would take hours)",
  )
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
    "--require_quiet",
    action="store_true",
    help="stop without writing when the PEFT comparison ran on a loaded machine",
  )
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


ROW_KEYS = ("shape", "batch", "n")
MERGED_PARTS = ("decode", "profile")


def merge_rows(results: dict, new: dict, source: str) -> None:
  """Replace ``results``' decode / profile rows by ``new``'s rows of the same (shape,
  batch, n) (appending the others), and record where they came from."""
  parts = [p for p in MERGED_PARTS if new.get(p)]
  if not parts:
    raise SystemExit(f"--merge_from {source}: no {' / '.join(MERGED_PARTS)} rows to merge")
  for part in parts:
    rows = results.setdefault(part, [])
    for row in new[part]:
      key = tuple(row.get(k) for k in ROW_KEYS)
      at = [i for i, r in enumerate(rows) if tuple(r.get(k) for k in ROW_KEYS) == key]
      if at:
        rows[at[0]] = row
      else:
        rows.append(row)
  results.setdefault("remeasured", []).append(
    {
      "parts": parts,
      "rows": sorted({row_label(r) for p in parts for r in new[p]}),
      "command": new["command"],
      "machine": new["machine"],
      "total_s": new.get("total_s"),
    }
  )


def main(argv=None):
  args = parse_args(argv)
  if args.render:
    with open(args.json) as f:
      results = json.load(f)
    if args.merge_from:
      with open(args.merge_from) as f:
        merge_rows(results, json.load(f), args.merge_from)
    results["analysis"] = analysis(results)
    write_json(args, results)
    if args.plot:
      plot(args, results)
    if args.markdown:
      write_section(args.markdown, markdown(results), BEGIN, END, header="# Benchmarks\n")
    print(markdown(results))
    return
  t_start = time.perf_counter()
  results: dict = {"command": command_line("benchmarks.routing"), "args": vars(args)}
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
    with LoadMonitor() as monitor:
      res, reason = run_child(_child_part, args.child_timeout_s, part=part, args_dict=unit_args)
    if part == "peft":  # the comparison against a peer: was the machine quiet?
      results["peft_load"] = monitor.summary()
      refuse_if_loaded(results["peft_load"], args.require_quiet, "benchmarks.routing peft")
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
