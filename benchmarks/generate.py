"""Decode and prefill throughput: lag_jax ``generate`` against HF transformers (torch CPU).

Run from the repository root (the malloc settings keep glibc from returning and
re-faulting large buffers between steps, which makes CPU timings erratic here):

  MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
  MALLOC_TOP_PAD_=1073741824 python -m benchmarks.generate --runs=3

Both sides run greedy decoding of the same prompts (``--prompt_len`` pseudo-random
ids each, so HF needs no padding) to exactly ``--max_new_tokens`` new tokens, with
EOS disabled, in float32, on the same cores; the runs are interleaved (ours, HF,
ours, HF, ...) and the median is reported. Our compilation happens in a warm-up
call per batch size and is reported separately; HF gets a warm-up call too.

Definitions, the same for both sides:
  prefill tok/s = B * prompt_len / prefill time. Ours: the prefill call of
    ``generate`` (forward over the padded batch + first token). HF: one forward
    over the prompt batch with ``use_cache=True``.
  decode tok/s = B * (max_new_tokens - 1) / decode time. The first new token comes
    out of the prefill pass, so decoding runs max_new_tokens - 1 forward steps.
    Ours: the decode loop of ``generate``. HF: generate time - prefill time.

Writes the table between ``<!-- generate:begin -->`` and ``<!-- generate:end -->``
in BENCHMARKS.md (other sections are left alone) and all numbers to
benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks.common import LoadMonitor, command_line, load_sentence, refuse_if_loaded
from benchmarks.sections import write_section
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.generation.generate import generate
from lag_jax.generation.sampling import Greedy

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- generate:begin -->", "<!-- generate:end -->"


def markers(dtype: str = "float32") -> tuple[str, str]:
  """The BENCHMARKS.md section of a dtype's table (float32 keeps the old name)."""
  if dtype == "float32":
    return BEGIN, END
  return f"<!-- generate-{dtype}:begin -->", f"<!-- generate-{dtype}:end -->"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--checkpoint",
    default=None,
    help="HF checkpoint folder; default the packaged SmolLM2-135M-Instruct",
  )
  p.add_argument("--batch_sizes", default="1,16", help="comma-separated batch sizes")
  p.add_argument("--prompt_len", type=int, default=128, help="tokens per prompt")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="weights and activations on both sides (bfloat16: what a TPU runs)",
  )
  p.add_argument(
    "--no_scan",
    action="store_true",
    help="skip our scanned-layer decode (layer_loop='scan'), timed as a third side",
  )
  p.add_argument(
    "--require_quiet",
    action="store_true",
    help="write nothing when other processes loaded the machine (benchmarks/common.py)",
  )
  p.add_argument(
    "--markdown",
    default=str(ROOT / "BENCHMARKS.md"),
    help="file whose generate section is rewritten; '' to skip",
  )
  p.add_argument(
    "--json",
    default=None,
    help="results file (default benchmarks/results/generate.json, generate_<dtype>.json "
    "for another dtype); '' to skip",
  )
  args = p.parse_args(argv)
  if args.json is None:
    name = "generate.json" if args.dtype == "float32" else f"generate_{args.dtype}.json"
    args.json = str(ROOT / "benchmarks" / "results" / name)
  return args


def make_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
  """Pseudo-random ids away from the special tokens at the start of the vocabulary."""
  rng = np.random.default_rng(seed)
  return rng.integers(100, vocab, (batch, length)).tolist()


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
  """Memory read bandwidth (GB/s): the best of 5 jitted max-reductions over 1 GiB,
  far larger than the caches, so every byte comes from DRAM."""
  x = jnp.ones((64, nbytes // 256), jnp.float32)
  f = jax.jit(lambda a: jnp.max(a, axis=1))
  f(x).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return nbytes / min(times) / 1e9


class HFRunner:
  """HF transformers on torch CPU, greedy, EOS disabled."""

  def __init__(self, folder: str, max_new_tokens: int, dtype: str = "float32"):
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=getattr(torch, dtype)
    ).eval()
    self.config = transformers.GenerationConfig(
      do_sample=False,
      max_new_tokens=max_new_tokens,
      min_new_tokens=max_new_tokens,
      eos_token_id=None,
      pad_token_id=0,
    )
    self.max_new_tokens = max_new_tokens

  @torch.inference_mode()
  def run(self, prompts: list[list[int]]) -> tuple[float, float]:
    """(prefill seconds, generate seconds) for one batch."""
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    self.model(ids, use_cache=True)
    t1 = time.perf_counter()
    out = self.model.generate(ids, generation_config=self.config)
    t2 = time.perf_counter()
    assert out.shape == (len(prompts), ids.shape[1] + self.max_new_tokens), out.shape
    return t1 - t0, t2 - t1


class CompileTimer:
  """Sums JAX's own trace / lowering / XLA compile durations, from its monitoring
  events: compile time measured directly, not as first call minus a later one."""

  EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  )

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, duration, **kwargs):
    del kwargs
    if name in self.EVENTS:
      self.seconds += duration


def run_ours(model, prompts, max_new_tokens, layer_loop="unrolled"):
  out = generate(
    model, prompts, max_new_tokens=max_new_tokens, sampler=Greedy(), layer_loop=layer_loop
  )
  assert all(len(t) == max_new_tokens for t in out.tokens)
  assert out.num_decode_steps == max_new_tokens - 1
  return out.prefill_s, out.decode_s


def benchmark(args) -> dict:
  folder = args.checkpoint
  if folder is None:
    from lag_jax.assets import smollm2_checkpoint

    folder = str(smollm2_checkpoint())
  torch.set_num_threads(args.threads)
  dtype = jnp.dtype(args.dtype)
  model = load_model(folder, param_dtype=dtype, dtype=dtype)
  hf = HFRunner(folder, args.max_new_tokens, args.dtype)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
  monitor = LoadMonitor().__enter__()
  compile_timer = CompileTimer()
  P, N = args.prompt_len, args.max_new_tokens
  decode_steps = N - 1
  rows = []
  for B in [int(b) for b in args.batch_sizes.split(",")]:
    prompts = make_prompts(B, P, model.config.vocab_size)
    compiled_before = compile_timer.seconds
    run_ours(model, prompts, N)  # compiles prefill and decode for this shape
    compile_s = compile_timer.seconds - compiled_before
    if not args.no_scan:
      compiled_before = compile_timer.seconds
      run_ours(model, prompts, N, "scan")
      scan_compile_s = compile_timer.seconds - compiled_before
    hf.run(prompts)  # warm-up: torch allocations, kernel selection
    ours, theirs, scan = [], [], []
    for _ in range(args.runs):
      ours.append(run_ours(model, prompts, N))
      theirs.append(hf.run(prompts))
      if not args.no_scan:
        scan.append(run_ours(model, prompts, N, "scan"))
    ours_prefill = statistics.median(o[0] for o in ours)
    ours_decode = statistics.median(o[1] for o in ours)
    hf_prefill = statistics.median(h[0] for h in theirs)
    hf_decode = statistics.median(h[1] - h[0] for h in theirs)
    row = dict(
      batch=B,
      ours_decode_tok_s=B * decode_steps / ours_decode,
      hf_decode_tok_s=B * decode_steps / hf_decode,
      ours_prefill_tok_s=B * P / ours_prefill,
      hf_prefill_tok_s=B * P / hf_prefill,
      ours_step_ms=1e3 * ours_decode / decode_steps,
      hf_step_ms=1e3 * hf_decode / decode_steps,
      ours_compile_s=compile_s,
      ours_runs_s=[list(o) for o in ours],
      hf_runs_s=[[h[0], h[1] - h[0]] for h in theirs],
    )
    if scan:
      row["scan_step_ms"] = 1e3 * statistics.median(o[1] for o in scan) / decode_steps
      row["scan_compile_s"] = scan_compile_s
      row["scan_runs_s"] = [list(o) for o in scan]
    row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
    row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"]
    print(
      json.dumps(
        {
          k: round(v, 3) if isinstance(v, float) else v
          for k, v in row.items()
          if not k.endswith("runs_s")
        }
      ),
      flush=True,
    )
    rows.append(row)
  monitor.__exit__(None, None, None)
  bandwidth = read_bandwidth_gbs()
  return dict(
    command=command_line("benchmarks.generate"),
    checkpoint=folder,
    model_type=model.config.model_type,
    param_bytes=param_bytes,
    prompt_len=P,
    max_new_tokens=N,
    dtype=args.dtype,
    bf16_units=_bf16_units(),
    layer_loop="unrolled",
    runs=args.runs,
    cpu_count=os.cpu_count(),
    # Other processes on the same cores distort both sides (torch's spinning
    # threads most): the load around the runs, and whether the machine was quiet.
    load_average=monitor.summary()["load_avg_1min"],
    load=monitor.summary(),
    torch_threads=args.threads,
    machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    read_bandwidth_gbs=bandwidth,
    # A decode step reads every parameter at least once: its floor on time.
    bandwidth_bound_step_ms=1e3 * param_bytes / (bandwidth * 1e9),
    versions=dict(
      jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__
    ),
    rows=rows,
  )


def _bf16_units() -> list[str]:
  """The CPU's bfloat16 matmul extensions (amx_bf16, avx512_bf16), from /proc/cpuinfo."""
  try:
    flags = pathlib.Path("/proc/cpuinfo").read_text().split()
  except OSError:
    return []
  return sorted({f for f in flags if f in ("amx_bf16", "avx512_bf16", "avx_ne_convert")})


def markdown(res: dict) -> str:
  begin, end = markers(res.get("dtype", "float32"))
  title = "" if res.get("dtype", "float32") == "float32" else f", {res['dtype']}"
  lines = [
    begin,
    f"## Generation throughput{title} (`benchmarks/generate.py`)",
    "",
    f"`{res['model_type']}` checkpoint `{pathlib.Path(res['checkpoint']).name}` "
    f"({res['param_bytes'] / 1e6:.0f} MB {res.get('dtype', 'float32')}, weights and "
    f"activations on both sides), prompts of {res['prompt_len']} tokens, "
    f"{res['max_new_tokens']} new tokens, greedy, EOS disabled; median of {res['runs']} "
    f"interleaved runs. Machine: {res['cpu_count']} CPUs ({res['machine']}), "
    + (
      load_sentence(res["load"])[:-1]
      if "load" in res
      else f"1-min load average {res['load_average'][0]:.1f} -> {res['load_average'][1]:.1f}"
    )
    + f", torch threads {res['torch_threads']}; jax {res['versions']['jax']}, torch "
    f"{res['versions']['torch']}, transformers {res['versions']['transformers']}.",
    "",
    "| batch | ours decode tok/s | HF decode tok/s | ratio | ours prefill tok/s "
    "| HF prefill tok/s | ratio | ours compile s |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in res["rows"]:
    lines.append(
      f"| {r['batch']} | {r['ours_decode_tok_s']:.1f} | {r['hf_decode_tok_s']:.1f} "
      f"| {r['decode_ratio']:.2f}x | {r['ours_prefill_tok_s']:.0f} "
      f"| {r['hf_prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f}x "
      f"| {r['ours_compile_s']:.1f} |"
    )
  steps = ", ".join(
    f"batch {r['batch']}: ours {r['ours_step_ms']:.1f} ms"
    + (f" (scanned layers {r['scan_step_ms']:.1f} ms)" if "scan_step_ms" in r else "")
    + f", HF {r['hf_step_ms']:.1f} ms"
    for r in res["rows"]
  )
  if res.get("dtype") == "bfloat16":
    units = res.get("bf16_units") or []
    if units:
      note = (
        f"This CPU has bfloat16 matmul units ({', '.join(units)}). torch's oneDNN "
        "matmuls use them; jaxlib 0.10's XLA:CPU runs bfloat16 matmuls no faster than "
        "float32 ones (the training section gives each host's matmul rates), so where large "
        "bfloat16 matmuls dominate (prefill, larger batches) torch leads: the comparison "
        "measures XLA:CPU's code generation for these units, not the model code. Neither "
        "says much about a TPU, where bfloat16 is native."
      )
    else:
      note = (
        "This CPU's bfloat16 matmul units: none (AVX2 only: no AMX, no AVX512-BF16). "
        "Without them both sides compute bfloat16 in software: large bfloat16 matmuls "
        "favour XLA:CPU (the training section's matmul rates), which is where a prefill "
        "lead comes from, while XLA:CPU's bfloat16 matrix-vector dot (decode at batch 1) "
        "is slower than its float32 one. On a host with AMX, torch's bfloat16 matmuls run "
        "several times faster than XLA:CPU's. Neither says much about a TPU, where "
        "bfloat16 is native."
      )
    lines += ["", note]
  lines += [
    "",
    "Our decode runs the layers "
    + (
      "unrolled over per-layer copies of the weights"
      if res.get("layer_loop") == "unrolled"
      else "in a scan over the stacked weights"
    )
    + " (`generate(layer_loop='unrolled')`); the scanned-layer decode (`generate`'s "
    "default, and the form on accelerators) is timed in the same interleaved runs where "
    "shown.",
    "",
    f"Decode step time: {steps}. Reading the parameters once at the measured "
    f"{res['read_bandwidth_gbs']:.1f} GB/s read bandwidth takes "
    f"{res['bandwidth_bound_step_ms']:.1f} ms, the floor for a step.",
    "",
    "Decode tok/s = batch x (new tokens - 1) / decode time (the first new token comes "
    "from the prefill pass); prefill tok/s = batch x prompt tokens / prefill time. HF "
    "prefill is one forward over the prompt batch; HF decode is generate time minus that.",
    "",
    "```",
    res["command"],
    "```",
    end,
  ]
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  res = benchmark(args)
  refuse_if_loaded(res["load"], args.require_quiet, "benchmarks.generate")
  if args.json:
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
      f.write("\n")
  if args.markdown:
    write_section(args.markdown, markdown(res), *markers(args.dtype), header="# Benchmarks\n")
  print(markdown(res))


if __name__ == "__main__":
  main()
