"""Finished method runs kept in the workdir, so that an interrupted evaluation resumes.

An evaluation at N = 1,000 runs some twenty methods for an hour or more; each method's
result is written to ``<workdir>/method_runs/<key>.json`` as soon as it finishes, and
a rerun of the same evaluation reads it back instead of generating again. The key is a
hash of everything the run's outputs depend on besides the code: the method, the
examples (ids, inputs, answers), the libraries' adapter names, the model checkpoint,
and the decoding and routing settings the caller passes in. A change to any of them
makes a new key (the old file stays, unused). Code changes are not in the key: after
changing a router, rerun with ``--config.reuse_method_runs=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess

import numpy as np
from absl import logging

from lag_jax.eval.runner import MethodResult
from lag_jax.files import write_json_atomic

FOLDER = "method_runs"
FORMAT = 1


def _plain(x):
  """JSON-able: numpy scalars and arrays to Python values."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def run_key(method, examples, context: dict) -> str:
  """A hex digest naming one method's run on ``examples`` under ``context`` (a dict of
  JSON-able settings: library names, checkpoint, decoding and routing settings)."""
  payload = {
    "format": FORMAT,
    "method": repr(method),
    "examples": [(ex.id, ex.task, ex.input, list(ex.answers)) for ex in examples],
    "context": context,
  }
  blob = json.dumps(payload, sort_keys=True, default=_plain).encode()
  return hashlib.sha256(blob).hexdigest()[:24]


def _code_version() -> str:
  """The git commit of the code that ran (for the record; not part of the key)."""
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      cwd=os.path.dirname(__file__),
      capture_output=True,
      text=True,
      timeout=10,
    )
    return out.stdout.strip() if out.returncode == 0 else ""
  except (OSError, subprocess.SubprocessError):
    return ""


def save(workdir: str, key: str, result: MethodResult) -> str:
  """Writes ``result`` under ``workdir`` (atomically); returns the file's path."""
  path = os.path.join(workdir, FOLDER, f"{key}.json")
  record = {
    "format": FORMAT,
    "key": key,
    "code": _code_version(),
    "result": json.loads(json.dumps(dataclasses.asdict(result), default=_plain)),
  }
  write_json_atomic(path, record)
  return path


def load(workdir: str, key: str, method_name: str) -> MethodResult | None:
  """The run saved under ``key``, or None if there is none. A file that cannot be read
  back (truncated by hand, another format) is reported and ignored: the method reruns
  and overwrites it."""
  path = os.path.join(workdir, FOLDER, f"{key}.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("format") != FORMAT or record.get("key") != key:
      raise ValueError(f"format {record.get('format')}, key {record.get('key')}")
    result = MethodResult(**record["result"])
    if result.method != method_name:
      raise ValueError(f"holds method {result.method!r}")
  except (OSError, ValueError, TypeError, KeyError) as e:
    logging.warning("%s: not a finished run of %s (%s); running it again", path, method_name, e)
    return None
  logging.info(
    "%s: reusing the finished run in %s (code %s; %.0f s when it ran)",
    method_name,
    path,
    record.get("code") or "unknown",
    result.seconds,
  )
  return result
