"""How the arrow sketch's pool must grow with N on a real library (recall, not time).

  python -m benchmarks.sketch_recall --library_root=$HOME/lag_n1000

On the N = 1,000 knowledge library of configs/n1000.py, with the module inputs of the
tuning half's requests (the base model's, over their prompts), for nested libraries of
the first N adapters: the recall of the exact top-k (k = 20) by the arrow sketch
(routing/arrow_sketch.py) at each pool P, plain and calibrated on generic prompts
(routing/calibration.py), with the sketch built from the N adapters themselves ("own",
as a library of N would build it) and from all 1,000 ("full": the same directions at
every N, so that a small N does not look easy only because Z dimensions hold most of N
arrows). From it: the smallest pool with >= 99% recall at each N (P99) and its growth
exponent over the sizes, which says what the sketch would read at N = 10^5 (issue 15:
N = 10^5 decode <= 2x N = 10^3 at >= 99% recall).

Dense numpy over a sample of tokens and layers (the recall of the exact top-k is the
same computed densely as through ``arrow_sketch.search``: the pool's P best sketch
scores rescored exactly). Writes benchmarks/results/sketch_recall.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import log
from lag_jax.routing.arrow_sketch import RIDGE, whitening

ROOT = os.path.dirname(os.path.abspath(__file__))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  return np.argpartition(-scores, k, axis=1)[:, :k]


def sketch_scores(
  arrows: np.ndarray, x: np.ndarray, dims: int, moment=None, fit=None, ridge: float | None = None
):
  """|approximate scores| [M, N] of tokens x [M, I] against arrows [I, N] through a
  ``dims``-dimensional sketch whose directions are fitted on ``fit`` [I, N'] (default:
  the arrows), plain or calibrated by the input ``moment`` [I, I] ridged by ``ridge``
  (None: ``RIDGE``), whitened as build_sketch whitens."""
  fit = arrows if fit is None else fit
  if moment is None:
    half = inv_half = np.eye(arrows.shape[0])
  else:
    half, inv_half = whitening(moment, "sketch_recall", RIDGE if ridge is None else ridge)
  b = half @ fit
  w, v = np.linalg.eigh(b @ b.T)
  u = v[:, np.argsort(w)[::-1][:dims]]
  return np.abs((x @ (inv_half @ u)) @ (u.T @ (half @ arrows)))


def quantized(arrows: np.ndarray, dtype: str) -> np.ndarray:
  """The arrows [I, N] as a scan over reduced-precision copies reads them: bfloat16, or
  int8 with one scale per adapter (its largest |entry| / 127), back in float64."""
  if dtype == "bfloat16":
    import ml_dtypes

    return arrows.astype(ml_dtypes.bfloat16).astype(np.float64)
  if dtype == "int8":
    scale = np.abs(arrows).max(axis=0, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(arrows / scale), -127, 127) * scale
  raise ValueError(f"quantized: dtype {dtype!r} is not bfloat16 or int8")


def recall_at_pools(exact: np.ndarray, approx: np.ndarray, k: int, pools) -> dict[int, float]:
  """Mean share of each token's exact top-k found by rescoring its P best approximate
  scores exactly, per pool P < N."""
  want = _top(exact, k)
  out = {}
  for p in pools:
    if p >= exact.shape[1]:
      continue
    pool = _top(approx, p)
    got = np.take_along_axis(pool, _top(np.take_along_axis(exact, pool, 1), k), 1)
    out[p] = float((want[:, :, None] == got[:, None, :]).any(-1).mean())
  return out


def p99(recalls: dict[int, float], goal: float = 0.99) -> float | None:
  """The pool where the recall crosses ``goal`` (log-linear between measured pools);
  None if no measured pool reaches it."""
  pools = sorted(recalls)
  for lo, hi in zip(pools, pools[1:]):
    if recalls[hi] >= goal > recalls[lo]:
      f = (goal - recalls[lo]) / (recalls[hi] - recalls[lo])
      return float(np.exp(np.log(lo) + f * (np.log(hi) - np.log(lo))))
  if pools and recalls[pools[0]] >= goal:
    return float(pools[0])
  return None


def record_inputs(root: str, requests: int, layers: list[int]):
  """The library, the modules' inputs over the tuning half's prompts at ``layers``
  (module -> [len(layers), M, I]), which of the M tokens are entity tokens, and the
  generic calibration moments."""
  import jax.numpy as jnp
  from flax import nnx

  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.data.synthetic import make_world
  from lag_jax.eval.prompts import render_prompt
  from lag_jax.jobs import common
  from lag_jax.jobs.routing_scale import pick_requests
  from lag_jax.routing import calibration
  from lag_jax.routing.library import AdapterLibrary
  from lag_jax.routing.spans import token_mask
  from lag_jax.text.tokenizer import Tokenizer, right_pad

  folder = common.resolve_checkpoint("smollm2")
  model, tokenizer = load_model(folder), Tokenizer.from_dir(folder)
  lib = AdapterLibrary.load(os.path.join(root, "knowledge", "library"))
  world = make_world(1000, seed=0)
  if list(lib.names) != list(world.documents)[: len(lib)]:
    raise ValueError(f"{root}/knowledge/library is not configs/n1000.py's library")
  examples = [ex for t in ("qa", "slot", "fact") for ex in world.tasks[t]]
  reqs = pick_requests(examples, list(lib.names), requests, 0, (200, "tune"))
  hook = calibration.recorder(model, lib.modules)
  graphdef, state = nnx.split(model)
  xs = {m: [] for m in lib.modules}
  entity = []  # per token: inside the question's entity (the person's name)
  for start in range(0, len(reqs), 16):
    ids = []
    for ex in reqs[start : start + 16]:
      text, _, span = render_prompt(tokenizer, ex)
      enc = tokenizer.backend.encode(text, add_special_tokens=False)
      ids.append(enc.ids)
      entity.append(token_mask(enc.offsets, [span]))
    batch, real = right_pad(ids, 32)
    aux = calibration.module_inputs(graphdef, state, jnp.asarray(batch), hook)
    for m in lib.modules:
      xs[m].append(np.asarray(aux[m][0])[layers][:, real])
  moments = calibration.generic_moments(model, tokenizer, lib.modules)
  xs = {m: np.concatenate(v, 1) for m, v in xs.items()}
  return lib, xs, np.concatenate(entity), moments, len(reqs)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--library_root", default=os.path.expanduser("~/lag_n1000"))
  p.add_argument("--sizes", default="125,250,500,1000")
  p.add_argument("--dims", type=int, default=64)
  p.add_argument("--pools", default="40,80,160,320,640")
  p.add_argument("--layers", default="2,8,14,20,26")
  p.add_argument("--tokens", type=int, default=1000, help="sampled prompt tokens")
  p.add_argument("--requests", type=int, default=150)
  p.add_argument("--k", type=int, default=20)
  p.add_argument("--ridges", default="0.001,10", help="calibrated sketches' ridges")
  p.add_argument("--out", default=os.path.join(ROOT, "results", "sketch_recall"))
  args = p.parse_args(argv)
  sizes = [int(v) for v in args.sizes.split(",")]
  pools = [int(v) for v in args.pools.split(",")]
  layers = [int(v) for v in args.layers.split(",")]
  t0 = time.perf_counter()
  lib, xs, entity, moments, n_req = record_inputs(args.library_root, args.requests, layers)
  log(f"inputs recorded in {time.perf_counter() - t0:.0f} s")
  rng = np.random.default_rng(0)
  ridges = [float(v) for v in args.ridges.split(",")]
  cals = ["plain", *(f"calibrated (ridge {r:g})" for r in ridges)]
  variants = [(c, b) for c in cals for b in ("own", "full")]
  acc = {f"{c} {b}": {n: [] for n in sizes} for c, b in variants}
  # At the largest N, own directions: recall on the entity tokens and on the rest apart
  # (the tokens that decide a request's routing are a few percent of its prompt).
  split = {f"{c} {w}": [] for c in cals for w in ("entity", "other")}
  ridge_of = {"plain": None, **{f"calibrated (ridge {r:g})": r for r in ridges}}
  # The exact scan over reduced-precision arrows, at every N: its top-k against float32's.
  quant = {d: {n: [] for n in sizes} for d in ("bfloat16", "int8")}
  for j, layer in enumerate(layers):
    for m in lib.modules:
      arrows = np.asarray(lib.weights.arrows[m][layer], np.float64)  # [I, N]
      pick = np.sort(rng.choice(len(entity), min(args.tokens, len(entity)), replace=False))
      x = xs[m][j][pick].astype(np.float64)
      for n in sizes:
        a = arrows[:, :n]
        exact = np.abs(x @ a)
        for c, b in variants:
          r = ridge_of[c]
          approx = sketch_scores(
            a,
            x,
            args.dims,
            None if r is None else moments[m][layer].astype(np.float64),
            a if b == "own" else arrows,
            r,
          )
          acc[f"{c} {b}"][n].append(recall_at_pools(exact, approx, args.k, pools))
        for d in quant:
          q = np.abs(x @ quantized(a, d))
          want, got = _top(exact, args.k), _top(q, args.k)
          quant[d][n].append(float((want[:, :, None] == got[:, None, :]).any(-1).mean()))
      # Every entity token of the layer against as many of the others.
      ent = np.where(entity)[0]
      other = np.sort(rng.choice(np.where(~entity)[0], len(ent), replace=False))
      for w, idx in (("entity", ent), ("other", other)):
        xw = xs[m][j][idx].astype(np.float64)
        top_a = arrows[:, : sizes[-1]]
        exact = np.abs(xw @ top_a)
        for c in cals:
          r = ridge_of[c]
          approx = sketch_scores(
            top_a,
            xw,
            args.dims,
            None if r is None else moments[m][layer].astype(np.float64),
            ridge=r,
          )
          split[f"{c} {w}"].append(recall_at_pools(exact, approx, args.k, pools))
    log(f"layer {layer} done ({time.perf_counter() - t0:.0f} s)")
  table = {
    v: {
      n: {q: float(np.mean([r[q] for r in rows])) for q in pools if q < n} for n, rows in d.items()
    }
    for v, d in acc.items()
  }
  p99s = {v: {n: p99(r) for n, r in d.items()} for v, d in table.items()}
  # Growth exponent of P99 between the two largest sizes where both are measured.
  slopes = {}
  for v, d in p99s.items():
    pts = [(n, q) for n, q in d.items() if q is not None]
    if len(pts) >= 2:
      (n1, q1), (n2, q2) = pts[-2], pts[-1]
      slopes[v] = float(np.log(q2 / q1) / np.log(n2 / n1))
  result = {
    "command": "python -m benchmarks.sketch_recall "
    + " ".join(f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
    "requests": n_req,
    "dims": args.dims,
    "k": args.k,
    "recall": {
      v: {str(n): {str(q): r for q, r in d.items()} for n, d in t.items()} for v, t in table.items()
    },
    "p99": {v: {str(n): q for n, q in d.items()} for v, d in p99s.items()},
    "exponent": slopes,
    "entity_split": {
      v: {str(q): float(np.mean([r[q] for r in rows])) for q in rows[0]}
      for v, rows in split.items()
    },
    "entity_tokens": int(entity.sum()),
    "quantized_scan_recall": {
      d: {str(n): float(np.mean(v)) for n, v in t.items()} for d, t in quant.items()
    },
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  lines = [
    f"`{result['command']}` ({result['date']}; {n_req} tuning-half requests, "
    f"{args.tokens} prompt tokens per layer, layers {args.layers}, gate / up / down; "
    f"k = {args.k}, Z = {args.dims})",
    "",
    "| sketch (directions from) | "
    + " | ".join(
      f"N = {n}: recall at P = {', '.join(str(q) for q in pools if q < n)}" for n in sizes
    )
    + " |",
    "|---" * (1 + len(sizes)) + "|",
  ]
  for v, t in table.items():
    cells = [" / ".join(f"{100 * r:.1f}" for r in t[n].values()) for n in sizes]
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "| sketch | " + " | ".join(f"P99 at N = {n}" for n in sizes) + " | growth exponent | "
    "P99 at N = 10^5 (extrapolated) |",
    "|---" * (3 + len(sizes)) + "|",
  ]
  for v, d in p99s.items():
    cells = ["-" if q is None else f"{q:.0f}" for q in d.values()]
    e = slopes.get(v)
    last = [q for q in d.values() if q is not None]
    extra = "-" if e is None else f"{last[-1] * (1e5 / sizes[-1]) ** e:,.0f}"
    lines.append(
      f"| {v} | " + " | ".join(cells) + f" | {'-' if e is None else f'{e:.2f}'} | {extra} |"
    )
  top = sizes[-1]
  split_pools = [q for q in pools if q < top]
  lines += [
    "",
    f"At N = {top}, the {int(entity.sum())} entity tokens (the person's name in the "
    "question) against as many other prompt tokens: recall at P = "
    + ", ".join(map(str, split_pools)),
    "",
    "| sketch | entity tokens | other tokens |",
    "|---|---|---|",
  ]
  for c in cals:
    cells = [
      " / ".join(f"{100 * np.mean([r[q] for r in split[f'{c} {w}']]):.1f}" for q in split_pools)
      for w in ("entity", "other")
    ]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  lines += [
    "",
    f"The exact scan over reduced-precision arrows: the share of float32's top {args.k} "
    "in its own top k",
    "",
    "| arrows | " + " | ".join(f"N = {n}" for n in sizes) + " |",
    "|---" * (1 + len(sizes)) + "|",
  ]
  for d, t in quant.items():
    lines.append(f"| {d} | " + " | ".join(f"{100 * np.mean(t[n]):.2f}%" for n in sizes) + " |")
  md = "\n".join(lines)
  print(md)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  for ext, text in (("json", json.dumps(result, indent=1)), ("md", md + "\n")):
    with open(f"{args.out}.{ext}.tmp", "w") as f:
      f.write(text)
    os.replace(f"{args.out}.{ext}.tmp", f"{args.out}.{ext}")
  _plot(p99s, sizes, args, f"{args.out}.png")
  return result


def _plot(p99s, sizes, args, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for v, d in p99s.items():
    pts = [(n, q) for n, q in d.items() if q is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=v)
  ax.plot(sizes, sizes, color="grey", linestyle=":", label="P = N (the exact scan)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("N (first N adapters of the N = 1,000 library)")
  ax.set_ylabel(f"pool P for 99% recall of the exact top {args.k}")
  ax.set_title(f"Arrow sketch, Z = {args.dims}: the pool it needs grows with N")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  plt.close(fig)


if __name__ == "__main__":
  main()
