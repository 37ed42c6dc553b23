"""Shapes, constants, the routers as the benchmark times them, the cost model and
the random libraries (shared by every part)."""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp

from lag_jax.model.config import ModelConfig
from lag_jax.model.transformer import ATTENTION_MODULES, MLP_MODULES
from lag_jax.routing import core
from lag_jax.routing.library import AdapterLibrary
from lag_jax.testing.libraries import module_shapes, random_library, random_lora


def route_lag(x, ll, allowed, k, projection="auto"):
  """The paper's LAG at one module (the routing core's decision and apply)."""
  return core.apply_hard(ll, core.lag_decision(ll, x, None, allowed, k, projection))


def route_arrow(x, ll, allowed):
  return core.route_arrow(ll, x, allowed)


def route_spectr(x, ll, allowed):
  return core.route_spectr(ll, x, None, allowed)


def _project_candidates(x, a, cand, projection):
  del projection  # the gather path
  return core.contract(x, core.gather_adapters(a, cand))


def _apply_selected(z, b, sel):
  return jnp.einsum("btr,btor->bto", z, b[sel].astype(z.dtype))


ROOT = pathlib.Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- routing:begin -->", "<!-- routing:end -->"
KNOW_MODULES, TASK_MODULES = MLP_MODULES, ATTENTION_MODULES
KNOW_RANK, KNOW_ALPHA, TASK_RANK, TASK_ALPHA, TASK_N = 6, 12.0, 8, 16.0, 5
ROUTERS = ("arrow", "lag", "spectr")
LABELS = {
  "base": "base",
  "single": "single LoRA",
  "arrow": "Arrow (hard)",
  "lag": "LAG",
  "spectr": "SpectR",
}

SHAPES = {
  # SmolLM2-135M: the real architecture; random weights (values do not change timing).
  "smollm2": ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    tie_word_embeddings=True,
  ),
  # Llama-3.2-3B widths; a slice of a few layers; vocabulary reduced (no LM head timed).
  "llama3b": ModelConfig(
    model_type="llama",
    vocab_size=4096,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    tie_word_embeddings=True,
  ),
}


# --- cost model (LAG.md) ------------------------------------------------------------


def base_cost(config: ModelConfig, batch: int, slots: int) -> tuple[float, float]:
  """(FLOPs, bytes moved) of one decode step of one layer without adapters.

  Every weight is read once per step (shared by the batch); each token does 2 O I
  FLOPs per module, and attention over ``slots`` cache slots (2 H E S for scores, the
  same for the weighted sum) reading its own K and V (2 S K E floats).
  """
  shapes = config.module_shapes()
  weights = sum(o * i for o, i in shapes.values())
  H, K, E = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  flops = batch * (2 * weights + 4 * H * E * slots)
  moved = 4 * weights + batch * 4 * 2 * slots * K * E
  return float(flops), float(moved)


def module_cost(
  router: str, n: int, r: int, k: int, O: int, I: int, batch: int
) -> tuple[float, float]:
  """Extra (FLOPs, bytes) per decode step at one module, from LAG.md's table.

  FLOPs per token: Arrow 2 n h (+ one adapter, 2 r (h + O)); SpectR 2 n h r (+ 2 r O);
  LAG 2 h (n + r k) (+ 2 r O). Bytes: arrows / the whole A* are shared by the batch
  (n h, resp. n r h floats); gathered candidates are per token, at most the library.
  """
  k = min(k, n)
  if router == "single":
    return float(batch * 2 * r * (I + O)), float(4 * r * (I + O))
  if router == "arrow":
    return (
      float(batch * (2 * n * I + 2 * r * (I + O))),
      float(4 * n * I + min(n, batch) * 4 * r * (I + O)),
    )
  if router == "lag":
    return (
      float(batch * (2 * I * (n + r * k) + 2 * r * O)),
      float(4 * n * I + min(n, batch * k) * 4 * r * I + min(n, batch) * 4 * r * O),
    )
  if router == "spectr":
    return (
      float(batch * (2 * n * r * I + 2 * r * O)),
      float(4 * n * r * I + min(n, batch) * 4 * r * O),
    )
  raise ValueError(router)


def model_ratio(config: ModelConfig, variant: str, n: int, k: int, batch: int, slots: int) -> dict:
  """Cost-model step-time ratio to base (FLOPs and bytes versions), per layer."""
  f0, b0 = base_cost(config, batch, slots)
  shapes = config.module_shapes()
  if variant == "base":
    return {"flops": 1.0, "bytes": 1.0}
  f, b = f0, b0
  for m in KNOW_MODULES:
    O, I = shapes[m]
    df, db = module_cost("single" if variant == "single" else variant, n, KNOW_RANK, k, O, I, batch)
    f, b = f + df, b + db
  for m in TASK_MODULES:
    O, I = shapes[m]
    df, db = module_cost(
      "single" if variant == "single" else variant, TASK_N, TASK_RANK, k, O, I, batch
    )
    f, b = f + df, b + db
  return {"flops": f / f0, "bytes": b / b0}


def library_bytes_per_layer(config: ModelConfig, n: int, rank: int, modules) -> int:
  """Resident float32 bytes of one layer of a library: A*, B*, arrows, valid."""
  shapes = config.module_shapes()
  return sum(n * (4 * ((shapes[m][0] + shapes[m][1]) * rank + shapes[m][1]) + 1) for m in modules)


# --- libraries ----------------------------------------------------------------------


def depth_config(config: ModelConfig, depth: int) -> ModelConfig:
  return dataclasses.replace(config, num_hidden_layers=depth)


def synthetic_library(config, n, rank, modules, seed, prefix) -> AdapterLibrary:
  """A library of ``n`` random adapters built directly as LibraryWeights (random unit
  rows of A*, small random B*; only the shapes matter for timing)."""
  shapes = module_shapes(config, modules)
  return random_library(
    n, shapes, config.num_hidden_layers, rank=rank, seed=seed, orthonormal=False, prefix=prefix
  )


def random_adapters(
  config: ModelConfig, n: int, rank: int, alpha: float, modules, seed: int, prefix: str, ranks=None
):
  return [
    random_lora(
      config, f"{prefix}{i}", rank if ranks is None else ranks[i], alpha, modules, seed=seed + i
    )
    for i in range(n)
  ]


def real_library(
  config: ModelConfig, n: int, rank: int, alpha: float, modules, seed: int, prefix: str, chunk: int
) -> tuple[AdapterLibrary, float]:
  """PEFT-style random adapters through AdapterLibrary.from_adapters; (library, build s)."""
  adapters = random_adapters(config, n, rank, alpha, modules, seed, prefix)
  t = time.perf_counter()
  lib = AdapterLibrary.from_adapters(adapters, config, modules, chunk=chunk)
  jax.block_until_ready(lib.weights)
  return lib, time.perf_counter() - t
