"""The units of work, each run in its own spawned process (``_child_part``)."""

from __future__ import annotations

import argparse
import importlib
import json
import resource

_PARTS = {  # part -> (module of this package, function)
  "signatures": ("signatures", "signatures_part"),
  "memory": ("signatures", "memory_part"),
  "decode": ("decode", "decode_part"),
  "profile": ("profile", "profile_part"),
  "scan_slice": ("prefill", "scan_slice_part"),
  "prefill": ("prefill", "prefill_part"),
  "peft": ("peft", "peft_part"),
}
# Parts in the order they run (scan_slice runs with profile).
RUN_ORDER = ("signatures", "memory", "decode", "profile", "prefill", "peft")


def _child_part(out_path: str, part: str, args_dict: dict) -> None:
  """Child process: one unit of work; its memory goes back to the OS when it exits."""
  args = argparse.Namespace(**args_dict)
  args.json = ""
  results: dict = {}
  module, fn = _PARTS[part]
  getattr(importlib.import_module(f"benchmarks.routing.{module}"), fn)(args, results)
  results["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  with open(out_path, "w") as f:
    json.dump(results, f)
