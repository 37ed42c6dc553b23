"""Running ``python -m lag_jax.run`` from tests, as a user would (a subprocess)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  """``python -m lag_jax.run ARGS`` from the repository root on the CPU; output captured."""
  return subprocess.run(
    [sys.executable, "-m", "lag_jax.run", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
  )
