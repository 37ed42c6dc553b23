"""Test set-up: 8 simulated CPU devices, forced before JAX is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see lag_jax/__init__.py

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test module. Each compilation maps
  code pages (~300 for a SmolLM2 decode loop, ~1,400 unrolled), and the whole
  suite in one process otherwise approaches the kernel's vm.max_map_count (65,530)
  and crashes inside XLA."""
  yield
  jax.clear_caches()
  gc.collect()
