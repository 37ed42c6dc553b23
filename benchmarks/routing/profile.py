"""Part: per-op micro-benchmarks of one layer's routed modules at decode shapes."""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import log, time_fn, write_json
from benchmarks.routing.decode import row_plan
from benchmarks.routing.setup import (
  KNOW_MODULES,
  KNOW_RANK,
  SHAPES,
  _apply_selected,
  _project_candidates,
  depth_config,
  route_arrow,
  route_lag,
  route_spectr,
  synthetic_library,
)
from lag_jax.routing import core
from lag_jax.routing.core import arrow_scores, project_all
from lag_jax.routing.routers import LayerLibrary

# --- per-op profile -------------------------------------------------------------------


def _scan_layers(fn, stacked, *shared):
  """Runs fn(layer_slice, *shared) for every layer of ``stacked`` (leading L) in a scan,
  as the decoder does, so every op streams its data from memory as in a decode step."""

  def body(carry, layer):
    return carry, fn(layer, *shared)

  return jax.lax.scan(body, 0, stacked)[1]


def _lib_list(a, b, arrows, valid):
  return [LayerLibrary(*t) for t in zip(a, b, arrows, valid, strict=True)]


@jax.jit
def _op_base(ws, xin):
  return _scan_layers(
    lambda w, xin: [jnp.einsum("bti,oi->bto", x, wi) for x, wi in zip(xin, w)], ws, xin
  )


@jax.jit
def _op_scores(arrows, xin, allowed):
  return _scan_layers(
    lambda ar, xin, allowed: [
      arrow_scores(x, LayerLibrary(None, None, ai, None), allowed) for x, ai in zip(xin, ar)
    ],
    arrows,
    xin,
    allowed,
  )


@functools.partial(jax.jit, static_argnames="k")
def _op_topk(scores, k):
  return _scan_layers(lambda s: [jax.lax.top_k(si, k)[1] for si in s], scores)


@jax.jit
def _op_gather(layer_xs, xin):
  """route_lag's candidate projection with projection='gather' (the library's code path:
  ``gather_adapters``, rows of A* viewed as [N R, I], then A*_c x)."""
  return _scan_layers(
    lambda t, xin: [_project_candidates(x, a, c, "gather") for x, a, c in zip(xin, *t)],
    layer_xs,
    xin,
  )


@jax.jit
def _op_project_all(a, xin):
  """The library's projection onto all N adapters (``project_all``: one 2-D matmul)."""
  return _scan_layers(lambda al, xin: [project_all(x, ai) for x, ai in zip(xin, al)], a, xin)


@jax.jit
def _op_prev_gather_block(layer_xs, xin):
  """Previous implementation, for comparison: the [N, R, I] blocks indexed directly."""
  return _scan_layers(
    lambda t, xin: [jnp.einsum("bti,btcri->btcr", x, a[c]) for x, a, c in zip(xin, *t)],
    layer_xs,
    xin,
  )


@jax.jit
def _op_prev_project_4d(a, xin):
  """Previous implementation, for comparison: the 4-D einsum 'bti,nri->btnr'."""
  return _scan_layers(
    lambda al, xin: [jnp.einsum("bti,nri->btnr", x, ai) for x, ai in zip(xin, al)], a, xin
  )


@jax.jit
def _op_apply(layer_xs):
  return _scan_layers(lambda t: [_apply_selected(z, b, s) for z, b, s in zip(*t)], layer_xs)


@functools.partial(jax.jit, static_argnames=("name", "k", "projection"))
def _op_router(lib_xs, xin, allowed, name, k, projection="auto"):
  def fn(t, xin, allowed):
    libs = _lib_list(*t)
    if name == "lag":
      return [route_lag(x, ll, allowed, k, projection)[0] for x, ll in zip(xin, libs)]
    if name == "arrow":
      return [route_arrow(x, ll, allowed)[0] for x, ll in zip(xin, libs)]
    return [route_spectr(x, ll, allowed)[0] for x, ll in zip(xin, libs)]

  return _scan_layers(fn, lib_xs, xin, allowed)


def auto_projection(n: int, tokens: int, k: int) -> str:
  """What route_lag's projection='auto' picks here: the library's own rule
  (``core.auto_projection``) for tokens * min(k, N) (token, candidate) pairs."""
  return core.auto_projection(tokens * min(k, n), n)


# Per-op profile columns: (key, label). Keys of the previous version of this benchmark
# (hand-written copies of the router pieces) are kept so an old routing.json renders.
PROFILE_OPS = (
  ("base_matvec", "base matvecs"),
  ("arrow_scores", "arrow scores"),
  ("top_k", "top-k"),
  ("gather_adapters_project", "`gather_adapters` + project (k cand.)"),
  ("prev_gather_block_project", "previous: A*[cand] block gather + project"),
  ("gather_project", "A*[cand] block gather + project (old run)"),
  ("gather_rows_project", "rows of [N R, I] gather + project (old run, benchmark's copy)"),
  ("apply_B", "apply B*"),
  ("project_all", "`project_all` (all N)"),
  ("prev_project_4d", "previous: 4-D einsum 'bti,nri->btnr'"),
  ("spectr_proj_2d", "projection on [N R, I] (old run, benchmark's copy)"),
  ("route_lag", "route_lag"),
  ("route_lag_gather", "route_lag gather"),
  ("route_lag_dense", "route_lag dense"),
  ("route_arrow", "route_arrow"),
  ("route_spectr", "route_spectr"),
)


def profile_part(args, results: dict) -> None:
  """The three knowledge modules, op by op, scanned over layers like the decoder.

  Every op gets its arrays as arguments and runs inside a lax.scan over the layers
  (like the decoder), so data streams from memory instead of sitting in the 32 MB L3
  between calls. Times are per layer. The candidate projections and routers are the
  library's own functions; the two ``prev_*`` ops are the implementations they replaced.
  """
  out = results.setdefault("profile", [])
  ns = [int(n) for n in args.ns.split(",")]
  for shape in args.shapes.split(","):
    full = SHAPES[shape]
    shapes = full.module_shapes()
    for n in ns:
      depth = min(row_plan(args, shape, n), args.profile_layers)
      if depth < 1:
        continue
      config = depth_config(full, depth)
      rng = np.random.default_rng(0)
      ws = [
        jnp.asarray(rng.standard_normal((depth, *shapes[m]), np.float32) * 0.02)
        for m in KNOW_MODULES
      ]
      lib = synthetic_library(config, n, KNOW_RANK, KNOW_MODULES, n, "k")
      w = lib.weights
      a = [w.a[m] for m in KNOW_MODULES]
      b = [w.b[m] for m in KNOW_MODULES]
      arrows = [w.arrows[m] for m in KNOW_MODULES]
      valid = [w.valid[m] for m in KNOW_MODULES]
      for batch in [int(bb) for bb in args.batches.split(",")]:
        xin = [
          jnp.asarray(rng.standard_normal((batch, 1, shapes[m][1]), np.float32))
          for m in KNOW_MODULES
        ]
        allowed = jnp.ones((batch, n), bool)
        k = min(args.k, n)
        scores = _op_scores(arrows, xin, allowed)
        cand = _op_topk(scores, k)
        z = _op_gather((a, cand), xin)
        z_sel = [zi[:, :, :, 0] for zi in z]
        sel = [c[..., 0] for c in cand]
        lib_xs = (a, b, arrows, valid)
        router = functools.partial(_op_router, k=args.k)
        ops = {
          "base_matvec": (_op_base, (ws, xin)),
          "arrow_scores": (_op_scores, (arrows, xin, allowed)),
          "top_k": (functools.partial(_op_topk, k=k), (scores,)),
          "gather_adapters_project": (_op_gather, ((a, cand), xin)),
          "prev_gather_block_project": (_op_prev_gather_block, ((a, cand), xin)),
          "apply_B": (_op_apply, ((z_sel, b, sel),)),
          "project_all": (_op_project_all, (a, xin)),
          "prev_project_4d": (_op_prev_project_4d, (a, xin)),
          "route_lag": (functools.partial(router, name="lag"), (lib_xs, xin, allowed)),
          "route_lag_gather": (
            functools.partial(router, name="lag", projection="gather"),
            (lib_xs, xin, allowed),
          ),
          "route_lag_dense": (
            functools.partial(router, name="lag", projection="dense"),
            (lib_xs, xin, allowed),
          ),
          "route_arrow": (functools.partial(router, name="arrow"), (lib_xs, xin, allowed)),
          "route_spectr": (functools.partial(router, name="spectr"), (lib_xs, xin, allowed)),
        }
        row = {
          "shape": shape,
          "n": n,
          "batch": batch,
          "k": k,
          "layers": depth,
          "auto_projection": auto_projection(n, batch, args.k),
          "ops_ms": {},
        }
        for name, (fn, fargs) in ops.items():
          res = time_fn(
            lambda fn=fn, fargs=fargs: jax.block_until_ready(fn(*fargs)),
            args.min_sample_s,
            args.profile_reps,
          )
          row["ops_ms"][name] = 1e3 * res["median_s"] / depth
        o = row["ops_ms"]
        log(
          f"profile {shape} N={n} B={batch} ({depth} layers; ms per layer, 3 MLP modules): "
          + ", ".join(f"{k_}={v:.3f}" for k_, v in o.items())
          + f"; route_lag ({row['auto_projection']}) / base "
          f"{o['route_lag'] / o['base_matvec']:.2f}"
        )
        out.append(row)
        del scores, cand, z, z_sel, sel
      del lib, w, a, b, arrows, valid, ws
      gc.collect()
      write_json(args, results)
