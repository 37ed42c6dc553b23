"""Random adapters and libraries, and a jitted forward pass, for tests and benchmarks
(one maker of each).

Shape letters as in docs/method.md: L layers, N adapters, R rank, I / O a module's input
and output width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lag_jax.adapters.peft_io import AdapterError, LoraAdapter
from lag_jax.model.config import ModelConfig
from lag_jax.model.transformer import ATTENTION_MODULES
from lag_jax.routing.library import AdapterLibrary, LibraryWeights


def module_path(layer: int, module: str) -> str:
  """The HF parameter path of a short module name at ``layer``."""
  parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
  return f"model.layers.{layer}.{parent}.{module}"


def random_lora(
  config: ModelConfig,
  name: str,
  r: int,
  alpha: float,
  target_modules: Sequence[str],
  seed: int,
  layers: Sequence[int] | None = None,
  use_rslora: bool = False,
  dtype: Any = np.float32,
) -> LoraAdapter:
  """A random adapter for tests and benchmarks.

  A is drawn like PEFT's init (uniform in +-1/sqrt(I)); B, which PEFT starts at
  zero, is N(0, 0.02^2) so the delta is not trivial.

  Args:
    config: the base model's architecture.
    target_modules: short module names, e.g. ('q_proj', 'v_proj').
    layers: layer indices to adapt; default all L.
  """
  shapes = config.module_shapes()
  unknown = sorted(set(target_modules) - set(shapes))
  if unknown:
    raise AdapterError(
      f"adapter {name!r}: unknown target modules {unknown}; choose from {sorted(shapes)}"
    )
  layer_ids = range(config.num_hidden_layers) if layers is None else layers
  rng = np.random.default_rng(seed)
  modules = {}
  for i in layer_ids:
    for short in target_modules:
      out_dim, in_dim = shapes[short]
      a = rng.uniform(-1.0, 1.0, (r, in_dim)) / math.sqrt(in_dim)
      b = rng.normal(0.0, 0.02, (out_dim, r))
      modules[module_path(i, short)] = (a.astype(dtype), b.astype(dtype))
  return LoraAdapter.from_arrays(
    name,
    modules,
    r,
    alpha,
    use_rslora=use_rslora,
    target_modules=list(target_modules),
    layers_to_transform=None if layers is None else list(layers),
  )


def random_adapter(
  config: ModelConfig,
  name: str,
  r: int,
  modules: Sequence[str],
  seed: int,
  *,
  alpha: float | None = None,
  layers: Sequence[int] | None = None,
  use_rslora: bool = False,
  b_std: float = 0.3,
  zero_b: bool = False,
  shared_dirs: Mapping[str, np.ndarray] | None = None,
) -> LoraAdapter:
  """A random adapter whose routing is not vacuous: A ~ N(0, 1/I) (PEFT's init scale),
  B ~ N(0, b_std^2) (PEFT starts B at zero, which would make every comparison
  vacuous), or B = 0 (a fresh LoRA). With ``shared_dirs`` ({module: [I]} unit vectors)
  the first row of A is mostly that direction, as a common training recipe leaves it.
  alpha defaults to 2 r."""
  rng = np.random.default_rng(seed)
  shapes = config.module_shapes()
  arrays = {}
  for layer in range(config.num_hidden_layers) if layers is None else layers:
    for m in modules:
      O, I = shapes[m]
      a = rng.normal(0.0, 1.0 / math.sqrt(I), (r, I))
      b = np.zeros((O, r)) if zero_b else rng.normal(0.0, b_std, (O, r))
      if shared_dirs is not None:
        a[0] = 0.3 * a[0] + (6.0 + rng.random()) * shared_dirs[m]
      arrays[module_path(layer, m)] = (a.astype(np.float32), b.astype(np.float32))
  return LoraAdapter.from_arrays(
    name, arrays, r=r, alpha=2.0 * r if alpha is None else alpha, use_rslora=use_rslora
  )


def random_library(
  n: int,
  shapes: Mapping[str, tuple[int, int]],
  layers: int,
  *,
  rank: int = 4,
  seed: int = 0,
  invalid: Sequence[int] = (),
  dtype: Any = jnp.float32,
  orthonormal: bool = True,
  prefix: str = "ad",
) -> AdapterLibrary:
  """A library in the stored layout without building it from adapters: per module
  (shapes: module -> (O, I)), A* with orthonormal rows and B* with decreasing column
  scales (like U S); or (``orthonormal=False``, for benchmark libraries where a QR per
  adapter would dominate) random unit rows, nearly orthogonal in these widths, and a
  small random B*. Arrows are A*'s first rows; ``invalid`` ids are all-zero adapters."""
  rng = np.random.default_rng(seed)
  fields = {f: {} for f in ("a", "b", "arrows", "valid")}
  for m, (O, I) in shapes.items():
    valid = np.ones((layers, n), bool)
    valid[:, list(invalid)] = False
    if orthonormal:
      a = np.linalg.qr(rng.normal(size=(layers, n, I, rank)))[0].swapaxes(-1, -2)
      b = rng.normal(size=(layers, n, O, rank)) * np.linspace(1.0, 0.3, rank)
    else:  # in place, float32: N = 10^4 SmolLM2-shaped libraries are gigabytes
      a = np.empty((layers, n, rank, I), np.float32)
      rng.random(out=a, dtype=np.float32)
      a -= 0.5
      a /= np.sqrt(np.einsum("lnri,lnri->lnr", a, a))[..., None]
      b = np.empty((layers, n, O, rank), np.float32)
      rng.random(out=b, dtype=np.float32)
      b -= 0.5
      b *= 0.05
    a[:, list(invalid)], b[:, list(invalid)] = 0, 0
    fields["arrows"][m] = jnp.asarray(np.ascontiguousarray(a[:, :, 0, :].swapaxes(1, 2)), dtype)
    fields["a"][m], fields["b"][m] = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    fields["valid"][m] = jnp.asarray(valid)
    del a, b
  names = tuple(f"{prefix}{i:03d}" for i in range(n))
  return AdapterLibrary(names, tuple(shapes), rank, (rank,) * n, LibraryWeights(**fields))


def module_shapes(config: ModelConfig, modules: Sequence[str]) -> dict[str, tuple[int, int]]:
  """module -> (O, I) of ``config`` for ``modules`` (random_library's ``shapes``)."""
  return {m: config.module_shapes()[m] for m in modules}


@functools.partial(jax.jit, static_argnums=0)
def jitted_forward(graphdef, state, tokens, positions, cache, hook):
  """The model's forward pass with everything as arguments: (logits [B, T, V], cache,
  aux). ``.lower(...)`` gives its HLO (tests read the collectives)."""
  return nnx.merge(graphdef, state)(tokens, positions, cache, lora=hook, return_aux=True)


def forward(model, tokens, hook=None, positions=None, cache=None):
  """(logits, cache, aux) of ``model`` on tokens [B, T] with an AdapterHook pytree (or
  None); positions default to 0..T-1. Logits and aux come back as numpy arrays."""
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(tokens, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  positions = jnp.asarray(positions, jnp.int32)
  logits, cache, aux = jitted_forward(graphdef, state, tokens, positions, cache, hook)
  return np.asarray(logits), cache, jax.tree.map(np.asarray, aux)
