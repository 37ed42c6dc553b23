"""Communication of routing over a library sharded on 8 devices: shard_map vs plain jit.

Run from the repository root (8 simulated CPU devices; the flag is set here):

  python -m benchmarks.sharding

One layer's library at one module, shaped like SmolLM2-135M's gate_proj (I = 576,
O = 1536), rank 8, split along N over an ``adapter`` mesh axis of 8 devices. Each
router is compiled twice on the same sharded arrays:

  shard_map  ``route_batch_sharded``: local top-k, all-gather of (score, id)
             candidates, owner-side norms / products, one psum of [B, T, O].
  jit        ``routers.route_batch`` (the single-device code) under jax.jit with the
             library's NamedSharding; XLA's SPMD partitioner decides what to move.

The collectives are read from ``.lower(...).compile().as_text()``: per collective, the
bytes each device contributes (operand) and receives (result). An all-gather's result
is D times its operand; an all-reduce's is its operand (ring all-reduce moves about
2 (D - 1) / D of it per device). Counts are per routed module and layer: the decoder
runs them once per layer and module in its layer scan.

Writes benchmarks/results/sharding.json and benchmarks/results/sharding.md (a section
for BENCHMARKS.md, between ``<!-- sharding:begin -->`` and ``<!-- sharding:end -->``).
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lag_jax.model.sharding import mesh_from_sizes  # noqa: E402
from lag_jax.routing.routers import LayerLibrary, RouterSpec  # noqa: E402
from lag_jax.routing.sharded import (  # noqa: E402
  AdapterSharding,
  hlo_collectives,
  route_batch_sharded,
  shard_library,
)
from lag_jax.testing.libraries import random_library  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROUTERS = {
  "lag k=20": RouterSpec("lag", k=20),
  "arrow": RouterSpec("arrow"),
  "spectr": RouterSpec("spectr"),
  "arrow_softmax k=20": RouterSpec("arrow_softmax", k=20),
  "uniform": RouterSpec("uniform"),
  "fixed": RouterSpec("fixed"),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ns", default="1024,8192", help="library sizes N (comma-separated)")
  p.add_argument("--decode_batch", type=int, default=8, help="B of the [B, 1] decode step")
  p.add_argument("--prefill", default="1x128", help="BxT of the prefill case, at the first N")
  p.add_argument("--in_dim", type=int, default=576)
  p.add_argument("--out_dim", type=int, default=1536)
  p.add_argument("--rank", type=int, default=8)
  return p.parse_args(argv)


@functools.partial(jax.jit, static_argnames=("specs", "sharding"))
def _route(specs, router_index, x, lib, mask, fixed, sharding):
  return route_batch_sharded(specs, router_index, x, LayerLibrary(*lib), mask, fixed, sharding)


def measure(n, batch, tokens, args, mesh, check=False):
  shapes = {"gate_proj": (args.out_dim, args.in_dim)}
  library = random_library(n, shapes, 1, rank=args.rank, orthonormal=False)
  sharded = shard_library(library, mesh)
  del library
  w = sharded.weights
  lib = tuple(getattr(w, f)["gate_proj"][0] for f in ("a", "b", "arrows", "valid"))
  shard_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in lib)
  x = np.random.default_rng(1).standard_normal((batch, tokens, args.in_dim), np.float32)
  mask = np.ones((batch, sharded.padded_size), bool)
  index, fixed = np.zeros(batch, np.int32), np.arange(batch, dtype=np.int32)
  rows = []
  for name, spec in ROUTERS.items():
    outs = {}
    for impl in ("shard_map", "jit"):
      sharding = AdapterSharding(mesh, impl=impl)
      t0 = time.perf_counter()
      compiled = _route.lower((spec,), index, x, lib, mask, fixed, sharding).compile()
      compile_s = time.perf_counter() - t0
      found = hlo_collectives(compiled.as_text())
      if check:
        outs[impl] = jax.device_get(compiled(index, x, lib, mask, fixed))
      rows.append(
        dict(
          n=n,
          batch=batch,
          tokens=tokens,
          router=name,
          impl=impl,
          compile_s=round(compile_s, 2),
          collectives=found,
          count=len(found),
          operand_bytes=sum(c["operand_bytes"] for c in found),
          result_bytes=sum(c["result_bytes"] for c in found),
          largest_operand_bytes=max((c["largest_operand_bytes"] for c in found), default=0),
          library_shard_bytes=shard_bytes,
        )
      )
      print(
        f"N={n} B={batch} T={tokens} {name:18s} {impl:9s} {len(found):2d} collectives, "
        f"operands {rows[-1]['operand_bytes']:>12,d} B, results {rows[-1]['result_bytes']:>12,d} B"
      )
    if check:
      (d1, c1), (d2, c2) = outs["shard_map"], outs["jit"]
      np.testing.assert_array_equal(c1, c2)
      np.testing.assert_allclose(d1, d2, atol=1e-3, rtol=1e-5)
  return rows


def _kb(b: int) -> str:
  return f"{b / 1024:,.1f}" if b < 10 * 1024**2 else f"{b / 1024**2:,.0f} M"


def render(results) -> str:
  rows = results["rows"]
  cfg = results["config"]
  out = [
    "<!-- sharding:begin -->",
    "## Sharded library: communication of shard_map routing vs plain jit",
    "",
    f"One layer of a library at one module shaped like SmolLM2-135M's gate_proj "
    f"(I = {cfg['in_dim']}, O = {cfg['out_dim']}, rank {cfg['rank']}, float32), split "
    f"along N over 8 simulated CPU devices (`adapter` mesh axis). Per device and per "
    "routed module and layer: the bytes each device contributes to collectives "
    "(operands) and receives (results), read from the compiled HLO "
    "(`python -m benchmarks.sharding`, jax " + results["jax"] + "). "
    "`shard_map` is `lag_jax.routing.sharded.route_batch_sharded`; `jit` is the "
    "single-device `route_batch` jitted on the same NamedSharding-sharded arrays, "
    "partitioned by XLA. KiB unless marked M (MiB).",
    "",
    "| N | B x T | router | library shard / device | shard_map: collectives, operand / result KiB "
    "| jit: collectives, operand / result KiB | jit / shard_map (results) |",
    "|---|---|---|---|---|---|---|",
  ]
  by_key = {(r["n"], r["batch"], r["tokens"], r["router"], r["impl"]): r for r in rows}
  for (n, b, t, router, impl), r in by_key.items():
    if impl != "shard_map":
      continue
    j = by_key[(n, b, t, router, "jit")]
    ratio = j["result_bytes"] / max(r["result_bytes"], 1)
    out.append(
      f"| {n:,} | {b} x {t} | {router} | {_kb(r['library_shard_bytes'])} | "
      f"{r['count']}, {_kb(r['operand_bytes'])} / {_kb(r['result_bytes'])} | "
      f"{j['count']}, {_kb(j['operand_bytes'])} / {_kb(j['result_bytes'])} | {ratio:,.0f}x |"
    )
  out += [
    "",
    "- shard_map moves the same bytes at every N: for lag and arrow_softmax an "
    "all-gather of k (score, id) pairs per token and shard (s32[2, B, T, k]: scores bit-cast), for "
    "lag a pmax of the k candidates' norms (f32[B, T, k]), for arrow / spectr one "
    "(value, id) pair per token and shard, and for every router one all-reduce of the "
    "[B, T, O] output; nothing per token grows with the library.",
    "- XLA's partitioning of the single-device code: lag and arrow_softmax all-gather "
    "the [B, T, N] arrow scores (top_k over the sharded axis; grows with N), and every "
    "router that gathers candidates by id (lag, arrow, spectr, arrow_softmax, fixed) "
    "turns the gather from the sharded library into a masked local gather plus an "
    "all-reduce of the gathered library rows: A* [B, T, k, R, I] and B* [B, T, O, R] "
    "per step for lag, B* [B, T, k, O, R] for arrow_softmax (183x the shard_map "
    "bytes). For arrow / spectr XLA does reduce the argmax itself (N-independent), but "
    "still moves the winner's B* rows (and for arrow its A* rows) instead of the "
    "[B, T, O] product. uniform "
    "is the same program both ways (one psum of [B, T, O]).",
    "- So shard_map is the default (`AdapterSharding.impl`, config `adapter_sharding`): "
    "7-186x fewer bytes here and no per-token term in N; `jit` stays as an option for "
    "comparison. Both give the same ids and outputs (checked at the first N).",
    "<!-- sharding:end -->",
    "",
  ]
  return "\n".join(out)


def main(argv=None):
  args = parse_args(argv)
  mesh = mesh_from_sizes({"data": 1, "model": 1, "adapter": -1})
  assert mesh.shape["adapter"] == 8, mesh
  ns = [int(s) for s in args.ns.split(",")]
  pb, pt = (int(s) for s in args.prefill.split("x"))
  rows = []
  for i, n in enumerate(ns):
    rows += measure(n, args.decode_batch, 1, args, mesh, check=i == 0)
  rows += measure(ns[0], pb, pt, args, mesh)
  results = dict(
    config=vars(args),
    jax=jax.__version__,
    devices=len(jax.devices()),
    platform=platform.platform(),
    rows=rows,
  )
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "sharding.json").write_text(json.dumps(results, indent=1))
  (RESULTS / "sharding.md").write_text(render(results))
  print(render(results))


if __name__ == "__main__":
  main()
