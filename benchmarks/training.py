"""How fast a library builds: knowledge-adapter training tokens/s on SmolLM2-135M.

  python -m benchmarks.training --runs=5

Times the slot trainer's compiled step (lag_jax/training/lora_trainer.py: n adapters
per step, one 128-token packed row each, rank 6 on gate/up/down, the knowledge
recipe's settings) on SmolLM2-135M's real weights, one variant per child process:

- ``f32:sN``: float32 weights and activations, N slots (adapters per step);
- ``bf16:sN``: bfloat16 base weights and activations, float32 LoRA factors and
  optimizer state (what a TPU would run);
- ``...:onehot``: the one-hot delta form instead of the gather.

Also measured, on this machine: a 1024x2048x2048 matmul in float32 and bfloat16 with
XLA:CPU and with torch (the units each can reach). Results go to
benchmarks/results/training.json and a BENCHMARKS.md section, with the 1-minute load
before and after. Every row trains on every token of its row (packed text), so
tokens/s counts trained tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchmarks.common import command_line, log, run_child
from benchmarks.sections import publish

BEGIN, END = "<!-- training:begin -->", "<!-- training:end -->"
T = 128
DEFAULT_VARIANTS = "f32:s8,f32:s4,f32:s16,f32:s8:onehot,bf16:s8"


def _parse(variant: str) -> dict:
  parts = variant.split(":")
  if parts[0] not in ("f32", "bf16") or len(parts) < 2 or not parts[1].startswith("s"):
    raise ValueError(f"variant {variant!r}: use f32|bf16:s<N>[:onehot]")
  return {
    "dtype": parts[0],
    "n_slots": int(parts[1][1:]),
    "delta_mode": "onehot" if "onehot" in parts[2:] else "gather",
  }


def _step_child(out_path: str, variant: str, steps: int, checkpoint: str) -> None:
  import json

  import jax
  import jax.numpy as jnp

  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.jobs.common import resolve_checkpoint
  from lag_jax.training.lora_trainer import SlotTrainer, TrainConfig

  v = _parse(variant)
  dtype = jnp.bfloat16 if v["dtype"] == "bf16" else jnp.float32
  model = load_model(resolve_checkpoint(checkpoint), param_dtype=dtype, dtype=dtype)
  config = TrainConfig(
    rank=6,
    alpha=12.0,
    learning_rate=3e-3,
    warmup_steps=5,
    dropout=0.05,
    max_seq_len=T,
    n_slots=v["n_slots"],
    delta_mode=v["delta_mode"],
  )
  trainer = SlotTrainer(model, config)
  n = config.n_slots
  rng = np.random.default_rng(0)
  keys = rng.integers(0, 2**31, size=(n, 2)).astype(np.uint32)
  trainer.load(np.ones(n, bool), keys, np.full(n, 10_000, np.int32))
  batch = {
    "tokens": rng.integers(0, model.config.vocab_size, size=(n, T)).astype(np.int32),
    "loss_mask": np.ones((n, T), bool),
    "ids": np.arange(n, dtype=np.int32),
  }
  drop = rng.integers(0, 2**31, size=(n, 2)).astype(np.uint32)
  t = time.perf_counter()
  m = trainer.step(batch, drop)
  first = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    m = trainer.step(batch, drop)
    times.append(time.perf_counter() - t)
  loss = float(np.mean(m["loss"]))
  with open(out_path, "w") as f:
    json.dump(
      {
        "step_s": statistics.median(times),
        "first_s": first,
        "tokens_per_step": n * T,
        "loss": loss,
        "finite": bool(np.isfinite(loss)),
        "backend": jax.default_backend(),
      },
      f,
    )


def _matmul_child(out_path: str) -> None:
  """1024x2048 @ 2048x2048 GFLOP/s: XLA:CPU and torch, float32 and bfloat16."""
  import json

  import jax
  import jax.numpy as jnp
  import torch

  flops = 2 * 1024 * 2048 * 2048
  out = {}
  for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jax.random.normal(jax.random.key(0), (1024, 2048), dt)
    b = jax.random.normal(jax.random.key(1), (2048, 2048), dt)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(7):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      ts.append(time.perf_counter() - t)
    out[f"jax_{name}_gflops"] = flops / statistics.median(ts) / 1e9
  for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
    a, b = torch.randn(1024, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    a @ b
    ts = []
    for _ in range(3 if dt == torch.bfloat16 else 7):
      t = time.perf_counter()
      a @ b
      ts.append(time.perf_counter() - t)
      if ts[-1] > 5:  # no fast bfloat16 path: one sample says enough
        break
    out[f"torch_{name}_gflops"] = flops / statistics.median(ts) / 1e9
  out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
  out["torch_threads"] = torch.get_num_threads()
  with open(out_path, "w") as f:
    json.dump(out, f)


def _cpu_flags() -> list[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return sorted(
            w for w in line.split() if w.startswith(("avx512", "amx", "avx_vnni", "avx2"))
          )
  except OSError:
    pass
  return []


def _model_flops_per_token(checkpoint: str) -> float:
  """Matmul FLOPs per trained token of a LoRA step on a frozen base: forward (2 per
  weight) and the activation gradient (2 per weight); the weights' own gradient is
  never formed. LoRA factors and attention scores are left out (small at T = 128)."""
  import json

  from lag_jax.jobs.common import resolve_checkpoint

  with open(os.path.join(resolve_checkpoint(checkpoint), "config.json")) as f:
    c = json.load(f)
  E, F, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
  kv = c.get("num_key_value_heads", c["num_attention_heads"])
  head = E // c["num_attention_heads"]
  per_layer = E * E * 2 + 2 * E * kv * head + 3 * E * F
  return 4.0 * (L * per_layer + E * V)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default=DEFAULT_VARIANTS)
  p.add_argument("--runs", type=int, default=3, help="child processes per variant")
  p.add_argument("--steps", type=int, default=5, help="timed steps per child")
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--no-write", action="store_true", help="print only")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    _parse(v)
  load_before = os.getloadavg()[0]
  log(f"load {load_before:.2f}; matmul rates")
  matmul, err = run_child(_matmul_child, 600)
  per_token = _model_flops_per_token(args.checkpoint)
  samples: dict[str, list[dict]] = {v: [] for v in variants}
  for r in range(args.runs):  # interleaved: every variant once per round
    for v in variants:
      res, why = run_child(
        _step_child, 1800, variant=v, steps=args.steps, checkpoint=args.checkpoint
      )
      if res is None:
        log(f"{v}: {why}")
        continue
      samples[v].append(res)
      rate = res["tokens_per_step"] / res["step_s"]
      log(f"round {r + 1} {v}: {res['step_s']:.2f} s/step, {rate:.0f} tok/s")
  rows = {}
  for v, runs in samples.items():
    if not runs:
      rows[v] = {"failed": True}
      continue
    step = statistics.median(r["step_s"] for r in runs)
    tok = runs[0]["tokens_per_step"]
    rows[v] = {
      **_parse(v),
      "step_s": step,
      "tokens_per_s": tok / step,
      "gflops": per_token * tok / step / 1e9,
      "first_s": statistics.median(r["first_s"] for r in runs),
      "finite": all(r["finite"] for r in runs),
      "runs": len(runs),
    }
  result = {
    "command": command_line("benchmarks.training"),
    "variants": rows,
    "matmul": matmul or {"failed": err},
    "flops_per_token": per_token,
    "cpu_flags": _cpu_flags(),
    "cpus": os.cpu_count(),
    "load_avg_1min": [load_before, os.getloadavg()[0]],
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }
  print(_markdown(result))
  if not args.no_write:
    publish("training", result, _markdown(result), BEGIN, END)
  return result


def _markdown(r: dict) -> str:
  base = r["variants"].get("f32:s8", {})
  mm = r["matmul"]
  runs = max((v.get("runs", 0) for v in r["variants"].values()), default=0)
  flags = ", ".join(r["cpu_flags"]) or "none of avx2 / avx512 / amx"
  lines = [
    BEGIN,
    "## Library build speed: knowledge-adapter training",
    "",
    f"`{r['command']}` ({r['date']}; {r['cpus']} cores, CPU flags {flags}; 1-min load "
    f"{r['load_avg_1min'][0]:.1f} before, {r['load_avg_1min'][1]:.1f} after). One compiled "
    f"step trains n adapters on one 128-token row each; medians of {runs} "
    "child processes, interleaved. GFLOP/s counts the matmuls of the forward pass and of "
    f"the activation gradient ({r['flops_per_token'] / 1e9:.2f} GFLOP per trained token).",
    "",
    "| variant | adapters per step | s / step | trained tokens / s | vs f32, 8 slots | GFLOP/s "
    "| loss finite |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, v in r["variants"].items():
    if v.get("failed"):
      lines.append(f"| `{name}` | - | failed | - | - | - | - |")
      continue
    ratio = v["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else float("nan")
    lines.append(
      f"| `{name}` | {v['n_slots']} | {v['step_s']:.2f} | {v['tokens_per_s']:.0f} | "
      f"{ratio:.2f}x | {v['gflops']:.0f} | {'yes' if v['finite'] else 'NO'} |"
    )
  if "jax_float32_gflops" in mm:
    lines += [
      "",
      "Matmul 1024x2048 @ 2048x2048 on this machine (GFLOP/s): "
      f"XLA:CPU float32 {mm['jax_float32_gflops']:.0f}, bfloat16 {mm['jax_bfloat16_gflops']:.0f}; "
      f"torch ({mm['torch_cpu_capability']}, {mm['torch_threads']} threads) float32 "
      f"{mm['torch_float32_gflops']:.0f}, bfloat16 {mm['torch_bfloat16_gflops']:.1f}.",
    ]
  lines.append(END)
  return "\n".join(lines)


if __name__ == "__main__":
  main()
