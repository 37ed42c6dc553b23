"""Scaling of sharded LAG routing with the library size N and the device count D.

Issue 5, "Benchmarks": per-token decode cost and per-device memory against N from
10^3 to 10^5 and against D = 1, 2, 4, 8 simulated devices, next to the cost model.

Run from the repository root (each D runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D``; the script sets it):

  python -m benchmarks.sharding_scaling

One layer slice of SmolLM2-135M's gate_proj (I = 576, O = 1536), N synthetic rank-6
adapters: A* rows random unit vectors, arrows = A*[:, 0] (float32, as in
benchmarks/offload.py), A* / B* in bfloat16 (B* values tiled from 1,000 random
adapters: the cost does not depend on them). The full depth at N = 100,000 (30 layers,
gate/up/down) would be about 260 GB, which fits no single device; the slice is 2.6 GB.
D = 1 is the single-device ``routers.route_batch``; D > 1 is
``route_batch_sharded`` (shard_map over an ``adapter`` mesh axis of D devices) on
``shard_library``'s placement. One jitted [B, 1] decode step of LAG (k = 20) is timed
(median of reps after warm-up) for B = 1 and 16.

The D simulated devices share the same 2 CPU cores, so time against D shows the
overhead of sharding (collectives, per-shard dispatch), not a speed-up; per-device
bytes are exact (read from the arrays' shards).

Cost model (per device and decode step; LAG's bytes-moved terms): the arrow scores read
N / D arrows of I floats, then per token the k candidates' A* rows (k R I) and one
B* (O R): bytes = N / D * I * 4 + B * (k R I + O R) * 2. Predicted time = bytes / BW,
with BW calibrated once per B from D = 1 at the largest N (the ideal for D real
devices, each with that bandwidth). Per-device library bytes = N / D * (R I 2 + O R 2
+ I 4 + 1).

Writes benchmarks/results/sharding_scaling.json, sharding_scaling.png and
sharding_scaling.md (between ``<!-- sharding_scaling:begin -->`` and ``:end -->``);
``--render`` redoes the last two from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

from benchmarks.common import log

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- sharding_scaling:begin -->", "<!-- sharding_scaling:end -->"
IN_DIM, OUT_DIM = 576, 1536
FULL_LAYERS, FULL_MODULES = 30, (("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576))
FACTOR_BYTES, ARROW_BYTES = 2, 4  # bfloat16 A* / B*, float32 arrows


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ns", default="1000,10000,100000", help="library sizes N")
  p.add_argument("--devices", default="1,2,4,8", help="simulated device counts D")
  p.add_argument("--batches", default="1,16", help="decode batch sizes B (T = 1)")
  p.add_argument("--rank", type=int, default=6)
  p.add_argument("--k", type=int, default=20)
  p.add_argument("--reps", type=int, default=51, help="timed steps per (N, D, B), at most")
  p.add_argument("--budget_s", type=float, default=5.0, help="timing seconds per (N, D, B)")
  p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  p.add_argument("--render", action="store_true", help="only redo markdown + plot from JSON")
  return p.parse_args(argv)


# --- Cost model -------------------------------------------------------------------


def model_library_bytes(n: int, d: int, rank: int) -> float:
  per = rank * IN_DIM * FACTOR_BYTES + OUT_DIM * rank * FACTOR_BYTES + IN_DIM * ARROW_BYTES + 1
  return -(-n // d) * per


def model_step_bytes(n: int, d: int, b: int, rank: int, k: int) -> float:
  arrows = -(-n // d) * IN_DIM * ARROW_BYTES
  per_token = (k * rank * IN_DIM + OUT_DIM * rank) * FACTOR_BYTES
  return arrows + b * per_token


def full_depth_bytes(n: int, rank: int) -> float:
  per = sum(rank * (i + o) * FACTOR_BYTES + i * ARROW_BYTES + 1 for _, i, o in FULL_MODULES)
  return FULL_LAYERS * n * per


# --- Worker: one D ------------------------------------------------------------------


def worker(args) -> None:
  import functools
  import statistics

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from lag_jax.model.sharding import mesh_from_sizes
  from lag_jax.routing import routers
  from lag_jax.routing.library import AdapterLibrary, LibraryWeights
  from lag_jax.routing.routers import LayerLibrary, RouterSpec
  from lag_jax.routing.sharded import (
    AdapterSharding,
    hlo_collectives,
    route_batch_sharded,
    shard_library,
  )

  D = args.worker
  assert len(jax.devices()) == D, (jax.devices(), D)
  mesh = mesh_from_sizes({"data": 1, "model": 1, "adapter": -1}) if D > 1 else None
  sharding = AdapterSharding(mesh) if mesh is not None else None
  spec = (RouterSpec("lag", k=args.k),)
  R = args.rank

  @functools.partial(jax.jit, static_argnums=(1,))
  def make_a(key, n):
    a = jax.random.normal(key, (1, n, R, IN_DIM), jnp.float32)
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    return a.astype(jnp.bfloat16), jnp.swapaxes(a[:, :, 0, :], 1, 2)  # arrows [1, I, n]

  @functools.partial(jax.jit, static_argnums=(1,))
  def make_b(key, n):
    base = min(n, 1000)
    b = jax.random.normal(key, (1, base, OUT_DIM, R), jnp.bfloat16)
    return jnp.tile(b, (1, -(-n // base), 1, 1))[:, :n]

  @functools.partial(jax.jit, static_argnames=("sharding",))
  def step(router_index, x, lib, mask, fixed, sharding):
    lib = LayerLibrary(*lib)
    if sharding is None:
      return routers.route_batch(spec, router_index, x, lib, mask, fixed)
    return route_batch_sharded(spec, router_index, x, lib, mask, fixed, sharding)

  rows = []
  for n in [int(s) for s in args.ns.split(",")]:
    t0 = time.perf_counter()
    ka, kb = jax.random.split(jax.random.key(n))
    a, arrows = make_a(ka, n)
    b = make_b(kb, n)
    valid = jnp.ones((1, n), bool)
    if sharding is None:
      lib = (a[0], b[0], arrows[0], valid[0])
      del a, b, arrows, valid
      per_device = sum(x.nbytes for x in lib)
      n_pad = n
    else:
      host = LibraryWeights(
        a={"gate_proj": np.asarray(a)},
        b={"gate_proj": np.asarray(b)},
        arrows={"gate_proj": np.asarray(arrows)},
        valid={"gate_proj": np.asarray(valid)},
      )
      del a, b, arrows, valid
      library = AdapterLibrary(tuple(f"ad{i}" for i in range(n)), ("gate_proj",), R, (R,) * n, host)
      sharded = shard_library(library, mesh)
      del library, host
      w = sharded.weights
      lib = tuple(getattr(w, f)["gate_proj"][0] for f in ("a", "b", "arrows", "valid"))
      per_device = max(sharded.nbytes_per_device().values())
      n_pad = sharded.padded_size
    jax.block_until_ready(lib)
    build_s = time.perf_counter() - t0
    log(f"D={D} N={n:,}: library built in {build_s:.1f} s, {per_device / 1e6:,.1f} MB / device")
    for batch in [int(s) for s in args.batches.split(",")]:
      rng = np.random.default_rng(batch)
      xs = [rng.standard_normal((batch, 1, IN_DIM), np.float32) for _ in range(4)]
      mask = np.ones((batch, n_pad), bool)
      index, fixed = np.zeros(batch, np.int32), np.arange(batch, dtype=np.int32)
      if mesh is not None:
        rep = NamedSharding(mesh, PartitionSpec())
        xs, mask, index, fixed = jax.device_put((xs, mask, index, fixed), rep)
      else:
        xs, mask, index, fixed = jax.device_put((xs, mask, index, fixed))
      t0 = time.perf_counter()
      compiled = step.lower(index, xs[0], lib, mask, fixed, sharding).compile()
      compile_s = time.perf_counter() - t0
      found = hlo_collectives(compiled.as_text())
      for i in range(2):  # warm-up
        jax.block_until_ready(compiled(index, xs[i % 4], lib, mask, fixed))
      times, spent, i = [], 0.0, 0
      while i < args.reps and (i < 3 or spent < args.budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(index, xs[i % 4], lib, mask, fixed))
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        i += 1
      ms = 1e3 * statistics.median(times)
      rows.append(
        dict(
          n=n,
          devices=D,
          batch=batch,
          step_ms=round(ms, 3),
          step_ms_min=round(1e3 * min(times), 3),
          reps=len(times),
          compile_s=round(compile_s, 2),
          library_bytes_per_device=int(per_device),
          collectives=len(found),
          collective_result_bytes=sum(c["result_bytes"] for c in found),
          build_s=round(build_s, 1),
        )
      )
      log(
        f"D={D} N={n:,} B={batch}: {ms:.2f} ms / step (median of {len(times)}), "
        f"{len(found)} collectives, {rows[-1]['collective_result_bytes']:,} B received"
      )
    del lib
  pathlib.Path(args.out).write_text(json.dumps(rows))


# --- Driver ---------------------------------------------------------------------------


def run_all(args, argv) -> dict:
  rows = []
  tmp = RESULTS / ".sharding_scaling_worker.json"
  for d in [int(s) for s in args.devices.split(",")]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={d}"])
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "benchmarks.sharding_scaling", *argv]
    cmd += ["--worker", str(d), "--out", str(tmp)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    rows += json.loads(tmp.read_text())
    tmp.unlink()
    log(f"D={d} done in {time.perf_counter() - t0:.0f} s")
  import jax

  return dict(
    config={k: v for k, v in vars(args).items() if k not in ("worker", "out", "render")},
    command="python -m benchmarks.sharding_scaling " + shlex.join(argv),
    jax=jax.__version__,
    cpus=os.cpu_count(),
    platform=platform.platform(),
    rows=rows,
  )


def add_model(results) -> None:
  cfg, rows = results["config"], results["rows"]
  R, k = cfg["rank"], cfg["k"]
  n_max = max(r["n"] for r in rows)
  bw = {}
  for r in rows:
    if r["devices"] == 1 and r["n"] == n_max:
      bw[r["batch"]] = model_step_bytes(r["n"], 1, r["batch"], R, k) / (r["step_ms"] / 1e3)
  results["calibrated_bandwidth_bytes_per_s"] = {str(b): v for b, v in bw.items()}
  for r in rows:
    r["model_library_bytes"] = model_library_bytes(r["n"], r["devices"], R)
    r["model_step_bytes"] = model_step_bytes(r["n"], r["devices"], r["batch"], R, k)
    r["model_step_ms"] = 1e3 * r["model_step_bytes"] / bw[r["batch"]]


def _mb(b: float) -> str:
  return f"{b / 1e9:,.2f} GB" if b >= 1e9 else f"{b / 1e6:,.1f} MB"


def render(results) -> str:
  cfg, rows = results["config"], results["rows"]
  by = {(r["n"], r["devices"], r["batch"]): r for r in rows}
  ns = sorted({r["n"] for r in rows})
  ds = sorted({r["devices"] for r in rows})
  bs = sorted({r["batch"] for r in rows})
  bw = results["calibrated_bandwidth_bytes_per_s"]
  out = [
    BEGIN,
    "## Sharded library: scaling with N and the device count (`benchmarks/sharding_scaling.py`)",
    "",
    f"One layer slice of SmolLM2-135M's gate_proj (I = {IN_DIM}, O = {OUT_DIM}), N synthetic "
    f"rank-{cfg['rank']} adapters (A* / B* bfloat16, arrows float32), LAG k = {cfg['k']}, "
    "one jitted [B, 1] decode step of the routed module; D = 1 is the single-device "
    "`route_batch`, D > 1 `route_batch_sharded` over D simulated CPU devices "
    "(`--xla_force_host_platform_device_count=D`, one subprocess per D). Median step time "
    f"after warm-up; {results['cpus']} CPU cores, jax {results['jax']}. **The D simulated "
    "devices share the same CPU cores, so time against D shows sharding overhead, not "
    "speed-up; per-device bytes are exact** (the largest device's shards). At N = "
    f"{ns[-1]:,} the full depth (30 layers, gate/up/down) would be "
    f"{_mb(full_depth_bytes(ns[-1], cfg['rank']))}; this slice is "
    f"{_mb(model_library_bytes(ns[-1], 1, cfg['rank']))}.",
    "",
    "Cost model (per device and step): bytes = N/D I 4 (arrow scores) + B (k R I + O R) 2 "
    "(the k candidates' A* rows and one B* per token); model ms = bytes / BW with BW "
    "calibrated from D = 1 at N = "
    f"{ns[-1]:,} ("
    + ", ".join(f"B = {b}: {float(v) / 1e9:.1f} GB/s" for b, v in bw.items())
    + "), i.e. the ideal for D real devices of that bandwidth. Library bytes per device "
    "= N/D (R I 2 + O R 2 + I 4 + 1).",
    "",
    "| N | D | library / device (model) | "
    + " | ".join(f"B = {b}: ms measured (model)" for b in bs)
    + " | collectives received / step (B = "
    + str(bs[-1])
    + ") |",
    "|---:|---:|---:|" + "---:|" * len(bs) + "---:|",
  ]
  for n in ns:
    for d in ds:
      r0 = by.get((n, d, bs[0]))
      if r0 is None:
        continue
      cells = []
      for b in bs:
        r = by.get((n, d, b))
        cells.append("-" if r is None else f"{r['step_ms']:.2f} ({r['model_step_ms']:.2f})")
      rl = by.get((n, d, bs[-1]), r0)
      out.append(
        f"| {n:,} | {d} | {_mb(r0['library_bytes_per_device'])} "
        f"({_mb(r0['model_library_bytes'])}) | " + " | ".join(cells) + " | "
        f"{rl['collectives']}, {rl['collective_result_bytes']:,} B |"
      )
  out += ["", "Findings (computed from the table):", ""]
  out += analysis(results, ns, ds, bs, by)
  out += [
    "",
    "![sharding scaling](sharding_scaling.png)",
    "",
    "```",
    results["command"],
    "```",
    END,
    "",
  ]
  return "\n".join(out)


def analysis(results, ns, ds, bs, by) -> list[str]:
  n_hi, n_lo, d_hi = ns[-1], ns[0], ds[-1]
  lines = []
  r1, rd = by[(n_hi, 1, bs[0])], by[(n_hi, d_hi, bs[0])]
  mem_ratio = r1["library_bytes_per_device"] / rd["library_bytes_per_device"]
  err = max(
    abs(r["library_bytes_per_device"] / r["model_library_bytes"] - 1) for r in results["rows"]
  )
  lines.append(
    f"- Memory: at N = {n_hi:,} one device holds {_mb(r1['library_bytes_per_device'])} of the "
    f"slice, each of {d_hi} devices {_mb(rd['library_bytes_per_device'])} ({mem_ratio:.2f}x "
    f"less); every measured per-device size is within {100 * err:.2f}% of N/D times the "
    "per-adapter bytes, so the full depth's "
    f"{_mb(full_depth_bytes(n_hi, results['config']['rank']))} would need "
    f"{_mb(full_depth_bytes(n_hi, results['config']['rank']) / d_hi)} per device at D = {d_hi}."
  )
  for b in bs:
    t1_hi, t1_lo = by[(n_hi, 1, b)]["step_ms"], by[(n_lo, 1, b)]["step_ms"]
    m_hi, m_lo = by[(n_hi, 1, b)]["model_step_ms"], by[(n_lo, 1, b)]["model_step_ms"]
    td = {d: by[(n_hi, d, b)]["step_ms"] for d in ds if (n_hi, d, b) in by}
    tdl = {d: by[(n_lo, d, b)]["step_ms"] for d in ds if (n_lo, d, b) in by}
    md = by[(n_hi, d_hi, b)]["model_step_ms"] if (n_hi, d_hi, b) in by else float("nan")
    fixed = (
      "so at small N a fixed per-step cost dominates"
      if t1_hi / t1_lo < 0.8 * m_hi / m_lo
      else "the step follows the bytes"
    )
    lines.append(
      f"- B = {b}: on one device the step grows {t1_hi / t1_lo:.1f}x from N = {n_lo:,} to "
      f"{n_hi:,} ({t1_lo:.2f} -> {t1_hi:.2f} ms; the bytes model says {m_hi / m_lo:.1f}x, "
      f"{fixed}). At N = {n_hi:,} the simulated "
      f"D = {', '.join(str(d) for d in td)} take "
      f"{' / '.join(f'{t:.2f}' for t in td.values())} ms on the shared cores "
      f"({td[d_hi] / td[1]:.2f}x of D = 1) where {d_hi} real devices would take about "
      f"{md:.2f} ms by the model; at N = {n_lo:,} sharding costs "
      f"{tdl[d_hi] - tdl[1]:+.2f} ms per step at D = {d_hi} (collectives and per-shard "
      "dispatch on the same cores)."
    )
  coll = {b: by[(n_hi, d_hi, b)]["collective_result_bytes"] for b in bs if (n_hi, d_hi, b) in by}
  coll_lo = {b: by[(n_lo, d_hi, b)]["collective_result_bytes"] for b in bs if (n_lo, d_hi, b) in by}
  bw = {int(b): float(v) for b, v in results["calibrated_bandwidth_bytes_per_s"].items()}
  same = "the same" if coll == coll_lo else "different"
  lines.append(
    f"- Communication does not grow with N: at D = {d_hi} each device receives "
    + ", ".join(f"{v:,} B (B = {b})" for b, v in coll.items())
    + f" per step at N = {n_hi:,} ({same} at N = {n_lo:,}: the all-gather of k (score, id) "
    "pairs, the pmax of k norms and the psum of [B, 1, O]), against "
    f"{_mb(-(-n_hi // d_hi) * IN_DIM * ARROW_BYTES)} of arrows each device reads locally. "
    "The calibrated rate is "
    + ", ".join(f"{v / 1e9:.1f} GB/s at B = {b}" for b, v in bw.items())
    + ": with more tokens the arrow scoring (2 B N I FLOPs) turns compute-bound on these "
    "cores, so the bytes-only model fits B = 1 best."
  )
  return lines


def plot(results, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results["rows"]
  ns = sorted({r["n"] for r in rows})
  ds = sorted({r["devices"] for r in rows})
  bs = sorted({r["batch"] for r in rows})
  by = {(r["n"], r["devices"], r["batch"]): r for r in rows}
  fig, axes = plt.subplots(1, len(bs) + 1, figsize=(5 * (len(bs) + 1), 4.2))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, b in zip(axes, bs):
    for j, d in enumerate(ds):
      pts = [(n, by[(n, d, b)]) for n in ns if (n, d, b) in by]
      xs = [n for n, _ in pts]
      ax.plot(xs, [r["step_ms"] for _, r in pts], "o-", color=colors[j], label=f"D = {d}")
      ax.plot(xs, [r["model_step_ms"] for _, r in pts], "--", color=colors[j], alpha=0.7)
    ax.set(
      xscale="log",
      yscale="log",
      xlabel="N (adapters)",
      ylabel="ms / decode step",
      title=f"LAG k=20 step, B = {b} (simulated D share CPUs)",
    )
    ax.legend(title="solid: measured, dashed: model", fontsize=8)
  ax = axes[-1]
  for j, d in enumerate(ds):
    pts = [by[(n, d, bs[0])] for n in ns if (n, d, bs[0]) in by]
    xs = [r["n"] for r in pts]
    ax.plot(xs, [r["library_bytes_per_device"] / 1e6 for r in pts], "o-", color=colors[j])
    ax.plot(xs, [r["model_library_bytes"] / 1e6 for r in pts], "--", color=colors[j], alpha=0.7)
    ax.plot([], [], "o-", color=colors[j], label=f"D = {d}")
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="N (adapters)",
    ylabel="library MB / device",
    title="per-device library (one layer, gate_proj)",
  )
  ax.legend(title="solid: measured, dashed: model", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(results) -> None:
  add_model(results)
  (RESULTS / "sharding_scaling.json").write_text(json.dumps(results, indent=1))
  (RESULTS / "sharding_scaling.md").write_text(render(results))
  plot(results, RESULTS / "sharding_scaling.png")


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return
  RESULTS.mkdir(parents=True, exist_ok=True)
  if args.render:
    results = json.loads((RESULTS / "sharding_scaling.json").read_text())
  else:
    t0 = time.perf_counter()
    results = run_all(args, argv)
    results["total_s"] = round(time.perf_counter() - t0, 1)
  write(results)
  print(render(results))


if __name__ == "__main__":
  main()
