"""The prepared accelerator check: one command, under 8 minutes on a GPU or TPU.

  PYTHONPATH=. python -m benchmarks.accelerator          # on the accelerator
  python -m benchmarks.accelerator --smoke               # tiny sizes on CPU (the tests)

Needs only JAX, flax, optax and orbax (no model files, no network: random weights of
real shapes). Measures, on whatever backend JAX finds:

1. ``base``: decode and prefill tokens/s of the base model at SmolLM2-135M and
   Llama-3.2-3B shapes in bfloat16 (weights and activations), B = 1, 16, 64; the 3B's
   vocabulary is kept (the LM head is timed).
2. ``cost``: one decode step with LAG / Arrow / SpectR routing against the base, and
   each ratio against the bytes cost model (LAG.md), at N = 100, 1,000, 10,000
   (benchmarks/routing/decode.py, float32 as on CPU).
3. ``projection``: one layer's LAG routing of a [1, T] prefill by projection (gather,
   dense, auto, grouped ragged_dot), so that ``auto``'s choice is checked on this
   backend (benchmarks/routing/prefill.py).
4. ``index``: the arrow index's search at N = 10^4 and 10^5, B = 1 and 16, reading
   the probed blocks by gather or in a loop, so that ``auto``'s choice is checked.
5. ``tests``: ``pytest -m "not real_assets"`` on this backend, within what is left of
   the time budget; its summary line is recorded.

Writes benchmarks/results/accelerator.json and the ``accelerator`` section of
BENCHMARKS.md (``--smoke`` writes only to --json, default a temporary file).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import log, time_fn
from benchmarks.sections import write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- accelerator:begin -->", "<!-- accelerator:end -->"


def _shapes(smoke: bool) -> dict:
  from benchmarks.routing.setup import SHAPES
  from lag_jax.testing import tiny_config

  if smoke:
    tiny = tiny_config(vocab_size=512)
    return {"smollm2": tiny, "llama3b": tiny}
  import dataclasses

  # The 3B at full depth and vocabulary (the routing benchmark's slice cuts both).
  llama = dataclasses.replace(
    SHAPES["llama3b"], vocab_size=128256, num_hidden_layers=28, tie_word_embeddings=True
  )
  return {"smollm2": SHAPES["smollm2"], "llama3b": llama}


def base_part(smoke: bool, batches, prompt_len: int, reps: int) -> list[dict]:
  """Prefill [B, P] and one decode step [B, 1] with a KV cache, bfloat16."""
  from lag_jax.model.transformer import CausalLM

  @jax.jit
  def prefill(graphdef, state, tokens, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache=cache)
    return logits[:, -1], cache

  @jax.jit
  def decode(graphdef, state, tokens, positions, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, positions, cache=cache)
    return logits[:, -1], cache

  rows = []
  for shape, config in _shapes(smoke).items():
    t = time.perf_counter()
    model = CausalLM(config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    del model
    log(f"base {shape}: random bfloat16 model in {time.perf_counter() - t:.1f} s")
    for b in batches:
      rows.append(_base_row(shape, config, graphdef, state, prefill, decode, b, prompt_len, reps))
    del graphdef, state
  return rows


def _base_row(shape, config, graphdef, state, prefill, decode, b, prompt_len, reps) -> dict:
  from lag_jax.model.kv_cache import KVCache

  rng = np.random.default_rng(b)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, prompt_len)), jnp.int32)
  cache = KVCache.zeros(config, b, prompt_len + 8, jnp.bfloat16)
  pf = time_fn(lambda: jax.block_until_ready(prefill(graphdef, state, tokens, cache)), 0.2, reps)
  _, filled = prefill(graphdef, state, tokens, cache)
  one, pos = tokens[:, :1], jnp.full((b, 1), prompt_len, jnp.int32)
  dc = time_fn(lambda: jax.block_until_ready(decode(graphdef, state, one, pos, filled)), 0.2, reps)
  row = {
    "shape": shape,
    "batch": b,
    "prompt_len": prompt_len,
    "prefill_ms": 1e3 * pf["median_s"],
    "prefill_tokens_per_s": b * prompt_len / pf["median_s"],
    "decode_ms": 1e3 * dc["median_s"],
    "decode_tokens_per_s": b / dc["median_s"],
    "compile_s": pf["first_s"] + dc["first_s"],
  }
  log(
    f"  {shape} B={b}: prefill {row['prefill_tokens_per_s']:.0f} tok/s, "
    f"decode {row['decode_ms']:.2f} ms/step ({row['decode_tokens_per_s']:.0f} tok/s)"
  )
  return row


def _routing_args(smoke: bool):
  from benchmarks.routing.__main__ import parse_args

  argv = [
    "--json=",
    "--markdown=",
    "--shapes=smollm2",
    "--batches=1,16",
    "--rounds=3",
    "--real_max_n=0",
    "--max_library_gb=8",
    "--prefill_t=256",
    "--profile_reps=3",
  ]
  if smoke:
    argv += [
      "--ns=8",
      "--batches=2",
      "--prefill_ns=8",
      "--prefill_grouped_ns=8",
      "--prefill_t=8",
      "--k=2",
      "--rounds=1",
      "--min_sample_s=0.01",
      "--profile_reps=1",
    ]
  else:
    argv += ["--ns=100,1000,10000", "--prefill_ns=100,1000,10000", "--prefill_grouped_ns=100,1000"]
  return parse_args(argv)


@contextlib.contextmanager
def _shapes_for(smoke: bool):
  """With --smoke, the routing parts' 'smollm2' shape is the tiny one meanwhile (their
  modules share benchmarks.routing.setup.SHAPES)."""
  from benchmarks.routing import setup as routing_setup

  saved = dict(routing_setup.SHAPES)
  if smoke:
    routing_setup.SHAPES["smollm2"] = _shapes(True)["smollm2"]
  try:
    yield
  finally:
    routing_setup.SHAPES.clear()
    routing_setup.SHAPES.update(saved)


def cost_part(smoke: bool) -> list[dict]:
  from benchmarks.routing import decode as routing_decode

  results: dict = {}
  with _shapes_for(smoke):
    routing_decode.decode_part(_routing_args(smoke), results)
  rows = []
  for row in results.get("decode", []):
    if "variants" not in row:
      rows.append(row)
      continue
    base = row["variants"]["base"]
    rows.append(
      {
        "n": row["n"],
        "batch": row["batch"],
        "depth": row["depth"],
        "base_ms": base["step_ms"],
        **{
          name: {
            "ms": v["step_ms"],
            "ratio": v["ratio"],
            "model": v["model_bytes"],
            "vs_model": v["ratio"] / max(v["model_bytes"], 1e-9),
          }
          for name, v in row["variants"].items()
          if name != "base"
        },
      }
    )
  return rows


def projection_part(smoke: bool) -> list[dict]:
  from benchmarks.routing import prefill as routing_prefill

  results: dict = {}
  with _shapes_for(smoke):
    routing_prefill.prefill_part(_routing_args(smoke), results)
  out = []
  for row in results.get("prefill", []):
    ms = row["ms"]
    fastest = min((p for p in ("gather", "dense", "grouped") if p in ms), key=ms.get)
    out.append(
      {
        "n": row["n"],
        "t": row["t"],
        "ms": ms,
        "auto_projection": row["auto_projection"],
        "fastest": fastest,
        "auto_is_fastest": row["auto_projection"] == fastest,
        "skipped": row["skipped"],
      }
    )
  return out


def index_part(smoke: bool, reps: int) -> list[dict]:
  """The arrow index's search (routing/arrow_index.py) by how it reads the probed
  blocks, gather vs loop, so that ``auto``'s choice per backend is checked. Random
  blocks of the sizes ``with_index`` gives N adapters at probe 8 (the clustering does
  not change the time, and building a real one at N = 10^5 takes minutes of host CPU)."""
  from lag_jax.routing import arrow_index as ai

  I, k, probe = (16, 4, 2) if smoke else (1536, 20, 8)
  ns = (200,) if smoke else (10_000, 100_000)
  rows = []
  for n in ns:
    J = ai.default_clusters(n, probe)
    W = -(-3 * n // (2 * J))
    rng = np.random.default_rng(n)
    index = ai.ArrowIndex(
      centroids=jnp.asarray(rng.standard_normal((J, I)), jnp.float32),
      members=jnp.asarray(rng.integers(0, n, (J, W)), jnp.int32),
      member_arrows=jnp.asarray(rng.standard_normal((J, W, I)), jnp.float32),
    )
    for b in (1, 2) if smoke else (1, 16):
      x = jnp.asarray(rng.standard_normal((b, 1, I)), jnp.float32)
      allowed = jnp.ones((b, n), bool)
      ms = {}
      for method in ("gather", "loop"):
        f = jax.jit(functools.partial(ai.search, k=k, probe=probe, method=method))
        jax.block_until_ready(f(index, x, allowed))
        ms[method] = 1e3 * _median_s(lambda f=f, i=index, x=x, a=allowed: f(i, x, a), reps)
      auto = "loop" if jax.default_backend() == "cpu" else "gather"
      fastest = min(ms, key=ms.get)
      rows.append(
        {
          "n": n,
          "batch": b,
          "clusters": J,
          "width": W,
          "ms": ms,
          "auto": auto,
          "fastest": fastest,
          "auto_is_fastest": auto == fastest,
        }
      )
      log(f"index search N={n} B={b}: {ms} (auto: {auto})")
  return rows


def _median_s(fn, reps: int) -> float:
  times = []
  for _ in range(max(3, reps)):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def tests_part(budget_s: float) -> dict:
  """``pytest -m "not real_assets"`` on this backend, for at most ``budget_s``."""
  if budget_s < 30:
    return {"skipped": f"{budget_s:.0f} s left of the budget"}
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  t = time.perf_counter()
  try:
    proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-m", "not real_assets", "-p", "no:cacheprovider"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=budget_s,
    )
    out, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    rc, timed_out = None, True
  counts = {
    k: int(v)
    for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", out)
  }
  failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
  return {
    "returncode": rc,
    "timed_out": timed_out,
    "seconds": time.perf_counter() - t,
    "counts": counts,
    "failed": failed[:50],
    "tail": out[-3000:],
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, the test suite)")
  p.add_argument("--parts", default="base,cost,projection,index,tests")
  p.add_argument("--budget_s", type=float, default=450.0, help="the whole check's time budget")
  p.add_argument("--json", default=None, help="default: benchmarks/results/accelerator.json")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  parts = [s for s in args.parts.split(",") if s]
  if args.smoke:
    parts = [s for s in parts if s != "tests"]  # the suite runs the smoke, not vice versa
  devices = jax.devices()
  result = {
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in devices],
    "jax": jax.__version__,
    "smoke": args.smoke,
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  log(f"accelerator check on {result['backend']}: {result['devices']}")
  batches = (1, 2) if args.smoke else (1, 16, 64)
  prompt_len = 8 if args.smoke else 128
  reps = 1 if args.smoke else 5
  if "base" in parts:
    result["base"] = base_part(args.smoke, batches, prompt_len, reps)
  if "cost" in parts:
    result["cost"] = cost_part(args.smoke)
  if "projection" in parts:
    result["projection"] = projection_part(args.smoke)
  if "index" in parts:
    result["index"] = index_part(args.smoke, reps)
  if "tests" in parts:
    result["tests"] = tests_part(args.budget_s - (time.perf_counter() - t0))
  result["seconds"] = time.perf_counter() - t0
  path = args.json or (
    os.path.join(tempfile.gettempdir(), "accelerator_smoke.json")
    if args.smoke
    else os.path.join(ROOT, "benchmarks", "results", "accelerator.json")
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  md = markdown(result)
  print(md)
  if not args.smoke:
    write_section(os.path.join(ROOT, "BENCHMARKS.md"), md, BEGIN, END)
  log(f"accelerator check: {result['seconds']:.0f} s in all -> {path}")
  return result


def markdown(r: dict) -> str:
  devs = r["devices"]
  lines = [
    BEGIN,
    "## The accelerator check",
    "",
    f"`python -m benchmarks.accelerator` on {r['backend']} ({', '.join(sorted(set(devs)))}), "
    f"jax {r['jax']}, {r['date']}, {r.get('seconds', 0):.0f} s in all"
    + (" (smoke: tiny sizes)" if r["smoke"] else "")
    + ".",
  ]
  if r.get("base"):
    lines += [
      "",
      "Base model, bfloat16, random weights of the real shapes (prefill of "
      f"{r['base'][0]['prompt_len']} tokens; one decode step with the cache filled):",
      "",
      "| shape | B | prefill tokens/s | decode ms/step | decode tokens/s |",
      "|---|---|---|---|---|",
    ]
    lines += [
      f"| {x['shape']} | {x['batch']} | {x['prefill_tokens_per_s']:.0f} | "
      f"{x['decode_ms']:.2f} | {x['decode_tokens_per_s']:.0f} |"
      for x in r["base"]
    ]
  if r.get("cost"):
    lines += [
      "",
      "Decode step with routing against the base, and against the bytes cost model "
      "(SmolLM2 shapes, float32; `vs model` = measured ratio / model ratio):",
      "",
      "| N | B | depth | base ms | LAG ratio (model, vs model) | Arrow | SpectR |",
      "|---|---|---|---|---|---|---|",
    ]
    for x in r["cost"]:
      if "skipped" in x:
        lines.append(f"| {x['n']} | - | - | skipped: {x['skipped']} | | | |")
        continue

      def cell(name, x=x):
        v = x.get(name)
        return "-" if v is None else f"{v['ratio']:.2f}x ({v['model']:.2f}, {v['vs_model']:.2f})"

      lines.append(
        f"| {x['n']} | {x['batch']} | {x['depth']} | {x['base_ms']:.2f} | {cell('lag')} | "
        f"{cell('arrow')} | {cell('spectr')} |"
      )
  if r.get("projection"):
    lines += [
      "",
      "One layer's LAG routing of a [1, T] prefill by projection (ms); `auto` should "
      "pick the fastest:",
      "",
      "| N | T | gather | dense | grouped | auto picks | fastest | auto right |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["projection"]:
      ms = x["ms"]

      def f(k, ms=ms):
        return f"{ms[k]:.2f}" if k in ms else "-"

      lines.append(
        f"| {x['n']} | {x['t']} | {f('gather')} | {f('dense')} | {f('grouped')} | "
        f"{x['auto_projection']} | {x['fastest']} | {'yes' if x['auto_is_fastest'] else 'NO'} |"
      )
  if r.get("index"):
    lines += [
      "",
      "The arrow index's search, one decode step of one module (I = 1,536, probe 8, "
      "k = 20), by how it reads the probed blocks (ms); `auto` should pick the fastest:",
      "",
      "| N | B | clusters x width | gather | loop | auto picks | fastest | auto right |",
      "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
      f"| {x['n']} | {x['batch']} | {x['clusters']} x {x['width']} | {x['ms']['gather']:.2f} "
      f"| {x['ms']['loop']:.2f} | {x['auto']} | {x['fastest']} | "
      f"{'yes' if x['auto_is_fastest'] else 'NO'} |"
      for x in r["index"]
    ]
  if r.get("tests"):
    t = r["tests"]
    if "skipped" in t:
      lines += ["", f"Test suite: skipped ({t['skipped']})."]
    else:
      counts = ", ".join(f"{v} {k}" for k, v in t["counts"].items()) or "no summary"
      lines += [
        "",
        f'Test suite (`pytest -m "not real_assets"` on this backend): {counts} in '
        f"{t['seconds']:.0f} s"
        + (" (stopped at the time budget)" if t["timed_out"] else "")
        + (f"; failed: {', '.join(t['failed'][:10])}" if t["failed"] else "")
        + ".",
      ]
  lines.append(END)
  return "\n".join(lines)


if __name__ == "__main__":
  main()
