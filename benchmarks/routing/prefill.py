"""Part: one layer's LAG routing for a [1, T] prefill, each projection."""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import log, time_fn, write_json
from benchmarks.routing.profile import _lib_list, auto_projection
from benchmarks.routing.setup import (
  KNOW_MODULES,
  KNOW_RANK,
  SHAPES,
  depth_config,
  route_lag,
  synthetic_library,
)
from lag_jax.routing.core import arrow_scores

# --- prefill ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "projection"))
def _prefill_lag(lib_xs, xin, mask, k, projection):
  """One layer's route_lag on the three knowledge modules: (deltas, chosen ids)."""
  outs = [
    route_lag(x, ll, mask & ll.valid[None, :], k, projection)
    for x, ll in zip(xin, _lib_list(*lib_xs))
  ]
  return [o[0] for o in outs], [o[1] for o in outs]


@jax.jit
def _prefill_scores(lib_xs, xin, mask):
  """The floor: only the arrow scores of the three modules."""
  return [arrow_scores(x, ll, mask & ll.valid[None, :]) for x, ll in zip(xin, _lib_list(*lib_xs))]


@jax.jit
def _prefill_base(ws, xin):
  """The three modules' own (base) matmuls, for scale."""
  return [jnp.einsum("bti,oi->bto", x, w) for x, w in zip(xin, ws)]


def prefill_part(args, results: dict) -> None:
  """One layer's LAG routing for a [1, T] prefill, by projection, SmolLM2 shapes.

  route_lag on gate/up/down of one layer (jitted, arrays as arguments), with the
  candidates' A* x computed by gathering, by one dense matmul onto all N adapters, by
  'auto' (what the library picks), and by the grouped ragged_dot where asked for; next
  to the arrow scores alone (the floor any projection adds to) and the base matmuls.
  Medians over --profile_reps samples, ms per layer.
  """
  config = depth_config(SHAPES["smollm2"], 1)
  shapes = config.module_shapes()
  T, batch = args.prefill_t, 1
  grouped_ns = {int(n) for n in args.prefill_grouped_ns.split(",") if n}
  rng = np.random.default_rng(11)
  xin = [
    jnp.asarray(rng.standard_normal((batch, T, shapes[m][1]), np.float32)) for m in KNOW_MODULES
  ]
  ws = [jnp.asarray(rng.standard_normal(shapes[m], np.float32) * 0.02) for m in KNOW_MODULES]
  rows = results.setdefault("prefill", [])
  for n in [int(n) for n in args.prefill_ns.split(",")]:
    lib = synthetic_library(config, n, KNOW_RANK, KNOW_MODULES, n, "k")
    w = lib.weights
    lib_xs = tuple(
      [f[m][0] for m in KNOW_MODULES] for f in (w.a, w.b, w.arrows, w.valid)
    )  # one layer: a [N, R, I], b [N, O, R], arrows [I, N], valid [N] per module
    mask = jnp.ones((batch, n), bool)
    k = min(args.k, n)
    row = {
      "shape": "smollm2",
      "n": n,
      "t": T,
      "batch": batch,
      "k": k,
      "rank": KNOW_RANK,
      "auto_projection": auto_projection(n, batch * T, args.k),
      "reps": args.profile_reps,
      "ms": {},
      "first_call_s": {},
      "skipped": {},
      "same_choice_as_gather": {},
    }

    def timed(label, fn, limit_s=None, row=row):
      res = time_fn(
        lambda: jax.block_until_ready(fn()), args.min_sample_s, args.profile_reps, limit_s
      )
      row["first_call_s"][label] = res["first_s"]
      if "skipped" in res:
        row["skipped"][label] = res["skipped"]
        log(f"prefill N={row['n']} {label}: skipped, {res['skipped']}")
        return
      row["ms"][label] = 1e3 * res["median_s"]

    timed("base", functools.partial(_prefill_base, ws, xin))
    timed("arrow_scores", functools.partial(_prefill_scores, lib_xs, xin, mask))
    projections = ["gather", "dense", "auto"] + (["grouped"] if n in grouped_ns else [])
    chosen = {}
    for proj in projections:
      limit = args.prefill_grouped_max_s if proj == "grouped" else None
      fn = functools.partial(_prefill_lag, lib_xs, xin, mask, args.k, proj)
      timed(proj, fn, limit)
      if proj in row["ms"]:
        chosen[proj] = np.concatenate([np.asarray(c).ravel() for c in fn()[1]])
    for proj, ids in chosen.items():
      if proj != "gather" and "gather" in chosen:
        row["same_choice_as_gather"][proj] = float(np.mean(ids == chosen["gather"]))
    o = row["ms"]
    log(
      f"prefill smollm2 N={n} [1, {T}] k={k} (ms per layer, 3 MLP modules; auto -> "
      f"{row['auto_projection']}): "
      + ", ".join(f"{p}={v:.2f}" for p, v in o.items())
      + (f"; skipped {sorted(row['skipped'])}" if row["skipped"] else "")
    )
    rows.append(row)
    del lib, w, lib_xs, chosen
    gc.collect()
    write_json(args, results)


def scan_slice_part(args, results: dict) -> None:
  """Matvecs on layer slices of a stacked [L, O, I] array against separate arrays.

  The decoder keeps every parameter (and the library) stacked on a leading layer axis
  and scans over it. XLA:CPU materialises each layer's slice before the dot; this
  measures what that costs at three sizes: a SmolLM2 MLP weight, a Llama-3B MLP
  weight, and the arrows of a 10,000-adapter library at I = 1536 (an [I, N] slice).
  """
  rng = np.random.default_rng(1)
  rows = []
  for label, L, O, I in (
    ("smollm2 gate_proj [1536, 576]", 30, 1536, 576),
    ("llama3b gate_proj [8192, 3072]", 2, 8192, 3072),
    ("arrows N=10000, I=1536 [10000, 1536]", 3, 10000, 1536),
  ):
    stacked = jnp.asarray(rng.standard_normal((L, O, I), np.float32))
    separate = [jnp.asarray(np.asarray(stacked[i])) for i in range(L)]
    x = jnp.ones((1, I), jnp.float32)

    def body(c, wl):
      return c, jnp.einsum("bi,oi->bo", c, wl)

    fns = {
      "scan": (jax.jit(lambda x, w: jax.lax.scan(body, x, w)[1]), stacked),
      "static_slices": (
        jax.jit(lambda x, w, L=L: [jnp.einsum("bi,oi->bo", x, w[i]) for i in range(L)]),
        stacked,
      ),
      "separate_arrays": (
        jax.jit(lambda x, ws: [jnp.einsum("bi,oi->bo", x, w) for w in ws]),
        separate,
      ),
    }
    row = {"label": label, "layers": L, "shape": [O, I], "mb_per_layer": 4 * O * I / 1e6}
    for name, (fn, w) in fns.items():
      res = time_fn(lambda fn=fn, w=w, x=x: jax.block_until_ready(fn(x, w)), 0.3, args.profile_reps)
      row[name + "_ms_per_layer"] = 1e3 * res["median_s"] / L
      row[name + "_gbs"] = 4 * O * I * L / res["median_s"] / 1e9
    rows.append(row)
    log(
      f"layer slices, {label}, {L} layers: scan {row['scan_ms_per_layer']:.2f} ms/layer "
      f"({row['scan_gbs']:.1f} GB/s), static slices {row['static_slices_ms_per_layer']:.2f} "
      f"({row['static_slices_gbs']:.1f} GB/s), separate arrays "
      f"{row['separate_arrays_ms_per_layer']:.2f} ({row['separate_arrays_gbs']:.1f} GB/s)"
    )
    del stacked, separate
    gc.collect()
  results["scan_slice"] = rows
  write_json(args, results)
