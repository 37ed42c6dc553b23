"""What request-level routing costs: prefill and decode time of ``generate`` per router.

  python -m benchmarks.request_routing [--n=16,1000] [--k=4] [--batch=4] [--runs=2]

The packaged SmolLM2-135M-Instruct with a random knowledge library (N adapters, rank
6, gate/up/down) routed by: no library (base), ``fixed`` (one LoRA per request, the
oracle's cost), ``lag`` (the paper), ``vote`` (pass 1 prefills with per-token LAG and
votes, pass 2 prefills again with the winner, decode applies it: expected 2 prefills
and decode at fixed's cost), ``request_lag`` (one prefill; decode reranks k
candidates per request: cost independent of N) and ``lag`` gated with a vote fallback
(2 prefills; decode pays lag plus the fallback's LoRA), and lag / vote on the library
with four shared directions removed (``routing/shared.py``: SpectR norms see P x, one more
[I, 4] projection per routed module and token). Prompts are pseudo-random ids
(routing cost does not depend on the text), greedy, EOS disabled. Each router
compiles in a warm-up round; routers take turns within each timed round and the median
of ``--runs`` rounds is reported, per library size N.
Writes benchmarks/results/request_routing.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import numpy as np

from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.generation.generate import generate
from lag_jax.jobs.common import resolve_checkpoint
from lag_jax.routing import AdapterLibrary, RoutedAdapters, RouterSpec, remove_shared, routed
from lag_jax.testing.libraries import random_lora

ROOT = pathlib.Path(__file__).resolve().parent.parent


def router_table(k: int) -> dict:
  """Every router, by its reported name (None: no library, the base model)."""
  return {
    "base": None,
    "fixed": (RouterSpec("fixed"), "none"),
    f"lag(k={k})": (RouterSpec("lag", k=k), "none"),
    f"vote(k={k})": (RouterSpec("vote", k=k), "none"),
    f"vote-score(k={k})": (RouterSpec("vote", k=k, vote_score="score"), "none"),
    f"request_lag(k={k})": (RouterSpec("request_lag", k=k), "none"),
    f"lag+gate(k={k})": (RouterSpec("lag", k=k, gate=0.1), "none"),
    f"request_lag+gate(k={k})": (RouterSpec("request_lag", k=k, gate=0.1), "none"),
    f"lag(k={k}) [shared top:4]": (RouterSpec("lag", k=k), "top:4"),
    f"vote(k={k}) [shared top:4]": (RouterSpec("vote", k=k), "top:4"),
    # A vote in two rounds: a third prefill (the finalists' round), the same decode.
    f"vote-final2-score(k={k}) [shared mean:4]": (
      RouterSpec("vote", k=k, vote_score="score", vote_finalists=2),
      "mean:4",
    ),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", default="16", help="library sizes, comma-separated")
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--max_new_tokens", type=int, default=16)
  p.add_argument("--runs", type=int, default=2, help="timed rounds (all routers per round)")
  p.add_argument("--routers", default="", help="subset of the router names (comma-separated)")
  args = p.parse_args(argv)

  model = load_model(resolve_checkpoint("smollm2"))
  rng = np.random.default_rng(0)
  prompts = [
    list(rng.integers(0, model.config.vocab_size, args.prompt_len)) for _ in range(args.batch)
  ]
  table = router_table(args.k)
  if args.routers:
    wanted = [r.strip() for r in args.routers.split(",")]
    table = {name: v for name, v in table.items() if name == "base" or name.split("(")[0] in wanted}
  results = {}
  for n in [int(v) for v in args.n.split(",")]:
    adapters = [
      random_lora(model.config, f"a{i}", 6, 12.0, ("gate_proj", "up_proj", "down_proj"), seed=i)
      for i in range(n)
    ]
    library = AdapterLibrary.from_adapters(adapters, model.config)
    del adapters
    libraries = {"none": library}
    hooks = {}
    for name, entry in table.items():
      if entry is None:
        hooks[name] = None
        continue
      spec, shared = entry
      if shared not in libraries:
        libraries[shared] = remove_shared(library, shared)[0]
      fixed = list(range(args.batch)) if spec.name == "fixed" else None
      hooks[name] = RoutedAdapters((routed(libraries[shared], args.batch, spec, fixed_ids=fixed),))
    times = {name: [] for name in hooks}
    # Round-robin over routers, so that load drifts on a shared machine hit them alike;
    # round 0 compiles.
    for round_ in range(args.runs + 1):
      for name, hook in hooks.items():
        out = generate(model, prompts, max_new_tokens=args.max_new_tokens, lora=hook)
        times[name].append((out.prefill_s, out.decode_s, out.num_decode_steps, out.prefill_passes))
        if round_ == 0:
          print(f"N={n} {name}: compiled", flush=True)
    rows = {}
    for name, t in times.items():
      prefill = statistics.median(x[0] for x in t[1:])
      decode = statistics.median(x[1] for x in t[1:])
      steps = t[-1][2]
      rows[name] = dict(
        prefill_s=prefill,
        prefill_passes=t[-1][3],
        decode_s=decode,
        decode_ms_per_step=1000 * decode / steps,
      )
    base = rows["base"]
    lag = rows.get(f"lag(k={args.k})")
    for r in rows.values():
      r["prefill_vs_base"] = r["prefill_s"] / base["prefill_s"]
      r["decode_vs_base"] = r["decode_ms_per_step"] / base["decode_ms_per_step"]
      if lag is not None:
        r["decode_vs_lag"] = r["decode_ms_per_step"] / lag["decode_ms_per_step"]
    results[str(n)] = rows
  result = dict(
    args=vars(args),
    machine=dict(platform=platform.platform(), processor=platform.processor()),
    rows=results,
  )
  out_path = ROOT / "benchmarks" / "results" / "request_routing.json"
  out_path.write_text(json.dumps(result, indent=1))
  print(
    "| N | router | prefill passes | prefill x base | decode ms/step | decode x base "
    "| decode x lag |"
  )
  print("|---:|---|---:|---:|---:|---:|---:|")
  for n, rows in results.items():
    for name, r in rows.items():
      vs_lag = f"{r['decode_vs_lag']:.2f}" if "decode_vs_lag" in r else "-"
      print(
        f"| {n} | {name} | {r['prefill_passes']} | {r['prefill_vs_base']:.2f} | "
        f"{r['decode_ms_per_step']:.1f} | {r['decode_vs_base']:.2f} | {vs_lag} |"
      )


if __name__ == "__main__":
  main()
