"""Part: our arrow_softmax against PEFT's create_arrow_model on the packaged model."""

from __future__ import annotations

import gc
import os
import resource
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import log, write_json
from benchmarks.routing.setup import KNOW_ALPHA, KNOW_MODULES, KNOW_RANK, random_adapters
from lag_jax.model.config import ModelConfig
from lag_jax.routing.hook import RoutedAdapters, routed
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.routers import RouterSpec
from lag_jax.testing.libraries import random_lora

# --- part 2: PEFT -----------------------------------------------------------------------


def peft_part(args, results: dict) -> None:
  import peft
  import torch
  import transformers
  from peft.tuners.lora.config import ArrowConfig

  from lag_jax.adapters.peft_io import save_peft_adapter
  from lag_jax.assets import smollm2_checkpoint
  from lag_jax.checkpoints.safetensors_loader import load_model

  torch.set_num_threads(args.threads)
  folder = str(smollm2_checkpoint())
  model = load_model(folder)
  config = model.config
  prompt = np.random.default_rng(0).integers(100, config.vocab_size, args.peft_prompt_len).tolist()
  new = args.peft_new_tokens
  gen_cfg = transformers.GenerationConfig(
    do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0
  )
  ns = [int(n) for n in args.peft_ns.split(",")]
  rows = results.setdefault("peft", [])
  tmp = tempfile.mkdtemp(prefix="routing-peft-", dir="/tmp")
  try:
    for n in ns:
      row: dict = {"n": n, "top_k": args.peft_top_k, "prompt_len": len(prompt), "new_tokens": new}
      t = time.perf_counter()
      adapters = random_adapters(config, n, KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, 0, "k")
      paths = []
      for a in adapters:
        paths.append(os.path.join(tmp, f"{n}-{a.name}"))
        save_peft_adapter(a, paths[-1])
      row["write_adapters_s"] = time.perf_counter() - t
      ours = _our_side(args, model, config, prompt, adapters, row)
      del adapters
      t0 = time.perf_counter()
      base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
      try:
        peft_model = peft.create_arrow_model(
          base, paths, ArrowConfig(top_k=args.peft_top_k, router_temperature=1.0)
        ).eval()
      except (MemoryError, RuntimeError) as e:
        row["peft_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(f"peft N={n}: create_arrow_model failed: {row['peft_error']}")
        continue
      row["peft_create_s"] = time.perf_counter() - t0
      ids = torch.tensor([prompt])

      @torch.inference_mode()
      def theirs(tokens=new, peft_model=peft_model, ids=ids):
        cfg = (
          gen_cfg
          if tokens == new
          else transformers.GenerationConfig(
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            eos_token_id=None,
            pad_token_id=0,
          )
        )
        t = time.perf_counter()
        out = peft_model.generate(input_ids=ids, generation_config=cfg)
        assert out.shape[1] == len(prompt) + tokens
        return time.perf_counter() - t

      # PEFT builds its prototypes (power iteration) on the first forward pass.
      row["peft_first_call_s"] = theirs(1)
      log(
        f"peft N={n}: wrote {n} adapters in {row['write_adapters_s']:.1f} s, "
        f"create_arrow_model {row['peft_create_s']:.1f} s "
        f"({row['peft_create_s'] / n:.2f} s/adapter), first call "
        f"{row['peft_first_call_s']:.1f} s; ours library {row['ours_library_s']:.1f} s, "
        f"first call {row['ours_first_call_s']:.1f} s"
      )
      ours_t, theirs_t = [], []
      for r in range(args.peft_runs):
        ours_t.append(ours())
        t = theirs()
        theirs_t.append(t)
        log(f"  run {r}: ours {new / ours_t[-1][0]:.1f} tok/s, PEFT {new / t:.2f} tok/s")
      row.update(_our_stats(ours_t, new))
      o, p = statistics.median(x[0] for x in ours_t), statistics.median(theirs_t)
      row.update(peft_tok_s=new / p, speedup=p / o, peft_runs_s=theirs_t)
      rows.append(row)
      log(
        f"peft N={n}: ours {row['ours_tok_s']:.1f} tok/s vs PEFT {row['peft_tok_s']:.2f} "
        f"tok/s -> {row['speedup']:.1f}x"
      )
      del peft_model, base, ours
      gc.collect()
      write_json(args, results)
    for n in [int(n) for n in args.peft_ours_ns.split(",") if n]:
      rows.append(_ours_only_row(args, model, config, prompt, n))
      write_json(args, results)
    if args.peft_try_n:
      results["peft_load_probe"] = peft_load_probe(args, folder, config, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  # Extrapolate PEFT's per-run time linearly in N from the two smallest sizes.
  ok = [r for r in rows if "peft_tok_s" in r]
  if len(ok) >= 2:
    # Per-run time: linear in N. Loading: c(N) = a N + b N^2 (each load_adapter call
    # walks every module, whose adapter dicts grow), fitted through the two points.
    (n0, t0_), (n1, t1_) = [(r["n"], new / r["peft_tok_s"]) for r in ok[:2]]
    slope = (t1_ - t0_) / (n1 - n0)
    (c0, c1) = ok[0]["peft_create_s"], ok[1]["peft_create_s"]
    b2 = max(0.0, (c1 / n1 - c0 / n0) / (n1 - n0))
    a1 = c0 / n0 - b2 * n0
    results["peft_extrapolation"] = {
      "per_run_s_at": {str(n): t0_ + slope * (n - n0) for n in (1000, 10000)},
      "per_adapter_s": slope,
      "create_fit": {"a": a1, "b": b2},
      "create_s_at": {str(n): a1 * n + b2 * n * n for n in (1000, 10000)},
    }


def _our_side(args, model, config, prompt, adapters, row: dict):
  """Our side of one row: builds the library of ``adapters`` (``row['ours_library_s']``),
  makes the first call (``row['ours_first_call_s']``, compilation included) and returns
  the timed call: () -> (prefill + decode s, decode s, decode steps)."""
  from lag_jax.generation.generate import generate
  from lag_jax.generation.sampling import Greedy

  new = args.peft_new_tokens
  t = time.perf_counter()
  lib = AdapterLibrary.from_adapters(adapters, config, KNOW_MODULES, chunk=args.sig_chunk)
  jax.block_until_ready(lib.weights)
  row["ours_library_s"] = time.perf_counter() - t
  hook = RoutedAdapters((routed(lib, 1, RouterSpec("arrow_softmax", k=args.peft_top_k)),))

  def ours():
    out = generate(model, [prompt], max_new_tokens=new, sampler=Greedy(), lora=hook)
    assert len(out.tokens[0]) == new
    return out.prefill_s + out.decode_s, out.decode_s, out.num_decode_steps

  t = time.perf_counter()
  ours()
  row["ours_first_call_s"] = time.perf_counter() - t
  return ours


def _our_stats(runs: list[tuple[float, float, int]], new: int) -> dict:
  """Medians of our timed calls."""
  return dict(
    ours_tok_s=new / statistics.median(x[0] for x in runs),
    ours_decode_step_ms=1e3 * statistics.median(x[1] / x[2] for x in runs),
    ours_runs_s=[x[0] for x in runs],
  )


def _ours_only_row(args, model, config, prompt, n: int) -> dict:
  """Our side alone at an N where PEFT's loading alone takes hours (the extrapolation
  and load probe say how long)."""
  new = args.peft_new_tokens
  row: dict = {"n": n, "top_k": args.peft_top_k, "prompt_len": len(prompt), "new_tokens": new}
  t = time.perf_counter()
  adapters = random_adapters(config, n, KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, 0, "k")
  adapters_s = time.perf_counter() - t
  ours = _our_side(args, model, config, prompt, adapters, row)
  row["ours_library_s"] += adapters_s  # as before: making the adapters counted too
  del adapters
  row.update(_our_stats([ours() for _ in range(args.peft_runs)], new))
  row["peft_skipped"] = "PEFT not run: its adapter loading alone takes hours at this N"
  log(f"ours only N={n}: {row['ours_tok_s']:.1f} tok/s, library {row['ours_library_s']:.0f} s")
  del ours
  gc.collect()
  return row


def peft_load_probe(args, folder: str, config: ModelConfig, tmp: str) -> dict:
  """Loads up to --peft_try_n adapters the way create_arrow_model does, under a time cap.

  create_arrow_model is ``PeftModel.from_pretrained`` for the first adapter and one
  ``load_adapter`` call per further adapter (then a compatibility scan); this times each
  call, stops at --peft_cap_s, and extrapolates the per-adapter time (which grows with
  the number already loaded) to N adapters.
  """
  import peft
  import torch
  import transformers

  from lag_jax.adapters.peft_io import save_peft_adapter

  def write(i):
    path = os.path.join(tmp, f"probe-{i}")
    save_peft_adapter(
      random_lora(config, f"p{i}", KNOW_RANK, KNOW_ALPHA, KNOW_MODULES, seed=50000 + i), path
    )
    return path

  n = args.peft_try_n
  base = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  path = write(0)
  t0 = time.perf_counter()
  model = peft.PeftModel.from_pretrained(base, path, adapter_name="task_0")
  times = [time.perf_counter() - t0]
  spent = times[0]
  for i in range(1, n):
    path = write(i)
    t = time.perf_counter()
    model.load_adapter(path, adapter_name=f"task_{i}")
    times.append(time.perf_counter() - t)
    spent += times[-1]
    shutil.rmtree(path, ignore_errors=True)
    if i % 50 == 0:
      log(
        f"  PEFT load probe: {i + 1} adapters loaded in {spent:.0f} s "
        f"(last 50: {statistics.mean(times[-50:]):.2f} s/adapter)"
      )
    if spent > args.peft_cap_s:
      break
  loaded = len(times)
  slope, intercept = np.polyfit(np.arange(loaded), np.asarray(times), 1)

  def total(m):  # sum over i < m of (intercept + slope i)
    return intercept * m + slope * m * (m - 1) / 2

  res = {
    "target_n": n,
    "cap_s": args.peft_cap_s,
    "loaded": loaded,
    "load_s": spent,
    "per_adapter_first_s": statistics.mean(times[1:11]) if loaded > 11 else times[-1],
    "per_adapter_last_s": statistics.mean(times[-10:]),
    "fit": {"intercept_s": float(intercept), "slope_s": float(slope)},
    "extrapolated_load_s": {str(m): float(total(m)) for m in (100, 1000, 10000)},
    "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
  }
  log(
    f"PEFT load probe: {loaded} of {n} adapters in {spent:.0f} s (cap {args.peft_cap_s:.0f} s); "
    f"per adapter {res['per_adapter_first_s']:.2f} s at first, "
    f"{res['per_adapter_last_s']:.2f} s at the end; extrapolated load time for 1000: "
    f"{total(1000) / 3600:.1f} h, 10,000: {total(10000) / 3600:.0f} h"
  )
  del model, base
  gc.collect()
  return res
