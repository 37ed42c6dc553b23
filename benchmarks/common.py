"""Helpers every benchmark shares: logging with the time, load, machine info, timing,
child processes (memory back to the OS between units), the command line, JSON output."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> float:
  return os.getloadavg()[0]


# --- child processes ----------------------------------------------------------------


def run_child(target, timeout_s: float, **kwargs) -> tuple[dict | None, str | None]:
  """Runs ``target(out_path, **kwargs)`` in a spawned process.

  Returns (result, None), or (None, reason) if it timed out or failed.
  """
  ctx = multiprocessing.get_context("spawn")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    proc = ctx.Process(target=target, args=(out,), kwargs=kwargs)
    t = time.perf_counter()
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
      proc.kill()
      proc.join()
      log(f"child {target.__name__} did not finish in {timeout_s:.0f} s: killed")
      return None, f"timeout ({timeout_s:.0f} s)"
    if proc.exitcode != 0 or not os.path.exists(out):
      log(f"child {target.__name__} failed (exit code {proc.exitcode})")
      return None, f"exit code {proc.exitcode}"
    with open(out) as f:
      res = json.load(f)
    res["wall_s"] = time.perf_counter() - t
    return res, None


def time_fn(fn, min_s: float, reps: int, limit_s: float | None = None) -> dict:
  """Median seconds per call of ``fn()`` (which must block), over ``reps`` samples.

  With ``limit_s``, a first (compiling) or second call slower than that ends it early:
  the result then has ``skipped`` (why) instead of ``median_s``.
  """
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  if limit_s is not None and first > limit_s:
    return {
      "skipped": f"first call (with compile) took {first:.1f} s > {limit_s:g} s",
      "first_s": first,
    }
  t = time.perf_counter()
  fn()
  warm = time.perf_counter() - t
  if limit_s is not None and warm > limit_s:
    return {"skipped": f"a call took {warm:.1f} s > {limit_s:g} s", "first_s": first}
  calls = max(1, min(200, math.ceil(min_s / max(warm, 1e-6))))
  samples = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(calls):
      fn()
    samples.append((time.perf_counter() - t) / calls)
  return {
    "median_s": statistics.median(samples),
    "samples_s": samples,
    "first_s": first,
    "calls": calls,
  }


def machine_info() -> dict:
  import torch
  import transformers

  src = np.ones(1 << 27, np.float32)
  dst = np.empty_like(src)
  best = min(timed(lambda: np.copyto(dst, src)) for _ in range(5))
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))
  flops = 2 * 2048**3 / min(timed(lambda: jax.block_until_ready(mm(a))) for _ in range(5))
  try:
    import peft

    peft_version = peft.__version__
  except ImportError:
    peft_version = None
  return {
    "nproc": os.cpu_count(),
    "machine": platform.machine(),
    "processor": platform.processor(),
    "copy_bandwidth_gbs": 2 * src.nbytes / best / 1e9,
    "matmul_gflops": flops / 1e9,
    "versions": {
      "jax": jax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "peft": peft_version,
      "python": platform.python_version(),
    },
    "malloc_env": {
      k: os.environ.get(k)
      for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
    },
  }


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def command_line(module: str) -> str:
  """The command that ran this benchmark (``python -m <module> ...``), malloc settings
  included."""
  env = " ".join(
    f"{k}={os.environ[k]}"
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
    if k in os.environ
  )
  cmd = f"python -m {module} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  return f"{env} {cmd}".strip()


def write_json(args, results: dict) -> None:
  """results to ``args.json`` (nothing when it is empty), through a temp file: an
  interrupted write never leaves half a file where the last results were."""
  if not args.json:
    return
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with open(args.json + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
    f.write("\n")
  os.replace(args.json + ".tmp", args.json)


# --- a quiet machine ------------------------------------------------------------------

# A comparison against a peer (transformers, PEFT) counts as taken on a quiet machine
# when other processes used at most this share of the machine's CPU time while it ran
# (and the 1-minute load average before it started was at most QUIET_LOAD_PER_CORE per
# core). Under load torch's threads slow far more than XLA's, and loaded runs have
# overstated our lead several-fold (BENCHMARKS.md).
QUIET_FOREIGN_SHARE = 0.10
QUIET_LOAD_PER_CORE = 0.5


def _busy_and_total_jiffies() -> tuple[int, int]:
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields) - idle, sum(fields)


class LoadMonitor:
  """The machine's load around a measurement: the 1-minute load average before and
  after, and the share of CPU time that processes other than this one (and its
  waited-for children) used meanwhile, from /proc/stat.

  Use as a context manager; ``summary()`` is JSON-ready, ``sentence()`` goes into the
  markdown next to the table.
  """

  def __enter__(self):
    self.load_before = os.getloadavg()[0]
    self._t = time.perf_counter()
    self._own = sum(os.times()[:4])
    try:
      self._busy, self._total = _busy_and_total_jiffies()
    except OSError:  # not Linux: the load average alone
      self._busy = None
    return self

  def __exit__(self, *exc):
    self.load_after = os.getloadavg()[0]
    self.seconds = time.perf_counter() - self._t
    own = sum(os.times()[:4]) - self._own
    self.foreign_share = None
    if self._busy is not None:
      busy, total = _busy_and_total_jiffies()
      hz = os.sysconf("SC_CLK_TCK")
      machine_s = max((total - self._total) / hz, 1e-9)
      foreign = max(0.0, (busy - self._busy) / hz - own)
      # /proc/stat's total counts every CPU: this is a share of the whole machine.
      self.foreign_share = min(1.0, foreign / machine_s)
    return False

  @property
  def quiet(self) -> bool:
    cpus = os.cpu_count() or 1
    share_ok = self.foreign_share is None or self.foreign_share <= QUIET_FOREIGN_SHARE
    return share_ok and self.load_before <= QUIET_LOAD_PER_CORE * cpus

  def summary(self) -> dict:
    return {
      "load_avg_1min": [self.load_before, self.load_after],
      "foreign_cpu_share": self.foreign_share,
      "seconds": self.seconds,
      "quiet": self.quiet,
      "thresholds": {
        "foreign_cpu_share": QUIET_FOREIGN_SHARE,
        "load_before_per_core": QUIET_LOAD_PER_CORE,
      },
    }


def load_sentence(s: dict, peer: bool = True) -> str:
  """Markdown: the load around a comparison, and a warning when it was not quiet."""
  share = s.get("foreign_cpu_share")
  text = f"1-min load {s['load_avg_1min'][0]:.1f} before, {s['load_avg_1min'][1]:.1f} after; " + (
    f"other processes used {100 * share:.0f}% of the CPU meanwhile" if share is not None else ""
  )
  if s.get("quiet"):
    return text + " (quiet)."
  t = s["thresholds"]
  return (
    text + f". **Not a quiet machine** (thresholds: other processes <= "
    f"{100 * t['foreign_cpu_share']:.0f}% of the CPU, load before <= "
    f"{t['load_before_per_core']} per core): "
    + (
      "the ratios against the peer are not comparable; rerun on a quiet machine."
      if peer
      else "timings are noisy; rerun on a quiet machine."
    )
  )


def refuse_if_loaded(summary: dict, require_quiet: bool, what: str) -> None:
  """With ``require_quiet``, a comparison taken on a loaded machine is not written."""
  if require_quiet and not summary["quiet"]:
    raise SystemExit(
      f"{what}: not a quiet machine ({load_sentence(summary)}); nothing written. "
      "Stop other work (or drop --require_quiet to keep the table, marked)."
    )
