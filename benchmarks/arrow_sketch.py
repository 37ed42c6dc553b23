"""The Arrow filter of one decode token: exact scan against the arrow sketch, by N.

  python -m benchmarks.arrow_sketch --ns=1000,10000,100000 --sketches=32:80,64:160

One decode step's filter (B = 1, T = 1, top k = 20) on SmolLM2's three MLP modules of one
layer (I = 576, 576, 1536): |x . arrow| for all N then top-k (what ``lag_decision``
does), against ``lag_jax/routing/arrow_sketch.py`` (all N scored in Z dimensions, a pool
of P rescored exactly from the sketch's adapter-major float32 rows, with_sketch's
default). Time only: the sketch's recall depends on the arrows, and is measured on a
real library by ``routing_scale`` (``index_sketches``); random arrows here.
Prints a markdown table (ms per layer, the three modules summed; medians) and writes
benchmarks/results/arrow_sketch.json.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.arrow_index import _exact
from benchmarks.common import LoadMonitor, command_line, load_sentence, time_fn, write_json
from lag_jax.routing import arrow_sketch as sk

WIDTHS = (576, 576, 1536)  # gate_proj, up_proj, down_proj inputs
ROOT = os.path.dirname(os.path.abspath(__file__))


_search = jax.jit(sk.search, static_argnames=("k", "pool"))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ns", default="1000,10000,100000")
  p.add_argument("--sketches", default="32:80,64:160", help="Z:P pairs")
  p.add_argument("--k", type=int, default=20)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--json", default=os.path.join(ROOT, "results", "arrow_sketch.json"))
  args = p.parse_args(argv)
  sketches = [tuple(int(v) for v in s.split(":")) for s in args.sketches.split(",")]
  k_arr = jnp.zeros(args.k)
  rows = []
  with LoadMonitor() as monitor:
    for n in (int(v) for v in args.ns.split(",")):
      row = {"n": n, "exact_ms": 0.0, **{f"{z}:{pool}": 0.0 for z, pool in sketches}}
      for m, dim in enumerate(WIDTHS):
        rng = np.random.default_rng(n + m)
        a = rng.standard_normal((dim, n)).astype(np.float32)
        a /= np.linalg.norm(a, axis=0)
        arrows = jnp.asarray(a)
        x = jnp.asarray(rng.standard_normal((1, 1, dim)).astype(np.float32))
        allowed = jnp.ones((1, n), bool)
        row["exact_ms"] += (
          1e3
          * time_fn(
            lambda arrows=arrows, x=x: jax.block_until_ready(_exact(arrows, x, k_arr)),
            0.2,
            args.reps,
          )["median_s"]
        )
        # Each Z once, as with_sketch builds it (the rows included).
        built = {z: jax.tree.map(jnp.asarray, sk.build_sketch(a, z)) for z in dict(sketches)}
        for z, pool in sketches:
          s = built[z]
          row[f"{z}:{pool}"] += (
            1e3
            * time_fn(
              lambda s=s, arrows=arrows, x=x, allowed=allowed, pool=pool: jax.block_until_ready(
                _search(s, arrows, x, allowed, k=args.k, pool=pool)
              ),
              0.2,
              args.reps,
            )["median_s"]
          )
      rows.append(row)
  result = {
    "command": command_line("benchmarks.arrow_sketch"),
    "k": args.k,
    "rows": rows,
    "load": monitor.summary(),
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "backend": jax.default_backend(),
  }
  labels = [f"{z}:{pool}" for z, pool in sketches]
  base = rows[0]["exact_ms"]
  lines = [
    f"`{result['command']}` ({result['date']}, {result['backend']}; "
    + load_sentence(result["load"], peer=False)
    + ")",
    "",
    "| N | exact ms | "
    + " | ".join(f"sketch {lab} ms | vs exact | vs exact at N = {rows[0]['n']}" for lab in labels)
    + " |",
    "|---" * (2 + 3 * len(labels)) + "|",
  ]
  for r in rows:
    cells = [f"{r['n']}", f"{r['exact_ms']:.3f}"]
    for lab in labels:
      cells += [f"{r[lab]:.3f}", f"{r[lab] / r['exact_ms']:.2f}x", f"{r[lab] / base:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  md = "\n".join(lines)
  print(md)
  write_json(args, result)
  return result


if __name__ == "__main__":
  main()
