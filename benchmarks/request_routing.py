"""What request-level routing costs: prefill and decode time of ``generate`` per router.

  python -m benchmarks.request_routing [--n=16] [--k=4] [--batch=4] [--runs=2]

The packaged SmolLM2-135M-Instruct with a random knowledge library (N adapters, rank
6, gate/up/down) routed by: no library (base), ``fixed`` (one LoRA per request, the
oracle's cost), ``lag`` (the paper), ``vote`` (pass 1 prefills with per-token LAG and
votes, pass 2 prefills again with the winner, decode applies it: expected 2 prefills
and decode at fixed's cost), ``request_lag`` (one prefill; decode reranks k
candidates per request: cost independent of N) and ``lag`` gated with a vote fallback
(2 prefills; decode pays lag plus the fallback's LoRA). Prompts are pseudo-random ids
(routing cost does not depend on the text), greedy, EOS disabled. Each router
compiles in a warm-up call; the median of ``--runs`` timed calls is reported.
Writes benchmarks/results/request_routing.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import numpy as np

from lag_jax.adapters import random_lora
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.generation.generate import generate
from lag_jax.jobs.common import resolve_checkpoint
from lag_jax.routing import AdapterLibrary, RoutedAdapters, RouterSpec, routed

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=16, help="adapters in the library")
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--max_new_tokens", type=int, default=16)
  p.add_argument("--runs", type=int, default=2)
  args = p.parse_args(argv)

  model = load_model(resolve_checkpoint("smollm2"))
  adapters = [
    random_lora(model.config, f"a{i}", 6, 12.0, ("gate_proj", "up_proj", "down_proj"), seed=i)
    for i in range(args.n)
  ]
  library = AdapterLibrary.from_adapters(adapters, model.config)
  rng = np.random.default_rng(0)
  prompts = [
    list(rng.integers(0, model.config.vocab_size, args.prompt_len)) for _ in range(args.batch)
  ]
  routers = {
    "base": None,
    "fixed": RouterSpec("fixed"),
    f"lag(k={args.k})": RouterSpec("lag", k=args.k),
    f"vote(k={args.k})": RouterSpec("vote", k=args.k),
    f"request_lag(k={args.k})": RouterSpec("request_lag", k=args.k),
    f"lag+gate(k={args.k})": RouterSpec("lag", k=args.k, gate=0.1),
  }
  rows = {}
  for name, spec in routers.items():
    hook = None
    if spec is not None:
      fixed = list(range(args.batch)) if spec.name == "fixed" else None
      hook = RoutedAdapters((routed(library, args.batch, spec, fixed_ids=fixed),))
    times = []
    for _ in range(args.runs + 1):  # the first call compiles
      out = generate(model, prompts, max_new_tokens=args.max_new_tokens, lora=hook)
      times.append((out.prefill_s, out.decode_s, out.num_decode_steps, out.prefill_passes))
    prefill = statistics.median(t[0] for t in times[1:])
    decode = statistics.median(t[1] for t in times[1:])
    steps = times[-1][2]
    rows[name] = dict(
      prefill_s=prefill,
      prefill_passes=times[-1][3],
      decode_s=decode,
      decode_ms_per_step=1000 * decode / steps,
      compile_s=times[0][0] + times[0][1] - prefill - decode,
    )
    print(
      f"{name:>20}: prefill {prefill:.3f}s ({times[-1][3]} pass), decode "
      f"{1000 * decode / steps:.1f} ms/step, compile ~{rows[name]['compile_s']:.0f}s",
      flush=True,
    )
  base = rows["base"]
  for r in rows.values():
    r["prefill_vs_base"] = r["prefill_s"] / base["prefill_s"]
    r["decode_vs_base"] = r["decode_ms_per_step"] / base["decode_ms_per_step"]
  result = dict(
    args=vars(args),
    machine=dict(platform=platform.platform(), processor=platform.processor()),
    rows=rows,
  )
  out_path = ROOT / "benchmarks" / "results" / "request_routing.json"
  out_path.write_text(json.dumps(result, indent=1))
  print("| router | prefill passes | prefill x base | decode ms/step | decode x base |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    print(
      f"| {name} | {r['prefill_passes']} | {r['prefill_vs_base']:.2f} | "
      f"{r['decode_ms_per_step']:.1f} | {r['decode_vs_base']:.2f} |"
    )


if __name__ == "__main__":
  main()
