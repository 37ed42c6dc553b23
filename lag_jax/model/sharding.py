"""Logical axis names for every parameter, and one table mapping them to mesh axes.

Parameters are annotated here, by name, rather than inside the modules, so that the
checkpoint loader can compute each tensor's target sharding from the abstract model
alone and place it there directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Parameter name suffix -> logical axes (leading "layers" for stacked layer params).
_LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
  "embed_tokens.weight": ("vocab", "embed"),
  "lm_head.weight": ("vocab", "embed"),
  "q_proj.weight": ("heads", "embed"),
  "k_proj.weight": ("kv_heads", "embed"),
  "v_proj.weight": ("kv_heads", "embed"),
  "o_proj.weight": ("embed", "heads"),
  "q_proj.bias": ("heads",),
  "k_proj.bias": ("kv_heads",),
  "v_proj.bias": ("kv_heads",),
  "o_proj.bias": ("embed",),
  "gate_proj.weight": ("mlp", "embed"),
  "up_proj.weight": ("mlp", "embed"),
  "down_proj.weight": ("embed", "mlp"),
  "gate_proj.bias": ("mlp",),
  "up_proj.bias": ("mlp",),
  "down_proj.bias": ("embed",),
}

# Logical axis -> mesh axis. Tensor parallel over "model", FSDP over "fsdp", the
# adapters of a routed library over "adapter" (lag_jax.routing.sharded), the rows of
# a generation batch over "data" (each process feeds its own rows).
DEFAULT_RULES: dict[str, str | None] = {
  "batch": "data",
  "vocab": "model",
  "heads": "model",
  "kv_heads": "model",
  "mlp": "model",
  "embed": "fsdp",
  "layers": None,
  "adapter": "adapter",
}


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axes of the parameter at dotted ``path`` with ``ndim`` dimensions."""
  suffix = next((s for s in _LOGICAL_AXES if path.endswith(s)), None)
  axes = _LOGICAL_AXES[suffix] if suffix else (None,)  # norms: tiny, replicated
  axes = axes[-ndim:]
  return ("layers",) * (ndim - len(axes)) + tuple(axes)


def partition_spec(
  path: str, shape: tuple[int, ...], mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> PartitionSpec:
  """The PartitionSpec of a parameter; a dim stays unsharded when the mesh axis is
  absent or does not divide it (e.g. 3 KV heads over 2 devices)."""
  spec = []
  for axis, dim in zip(logical_axes(path, len(shape)), shape, strict=True):
    mesh_axis = rules.get(axis) if axis else None
    if mesh_axis in mesh.shape and mesh_axis not in spec and dim % mesh.shape[mesh_axis] == 0:
      spec.append(mesh_axis)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def param_sharding(
  path: str,
  shape: tuple[int, ...],
  mesh: Mesh | None,
  rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> jax.sharding.Sharding:
  """Target sharding of one parameter; the first local device when there is no mesh."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return NamedSharding(mesh, partition_spec(path, shape, mesh, rules))


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh from per-axis sizes; one size may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(axis_sizes)
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh axes {unknown}: at most one axis size may be -1")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if unknown:
    if len(devices) % known:
      raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}")
    sizes[unknown[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(
      f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, have {len(devices)}"
    )
  return Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))


def mesh_from_sizes(axis_sizes: Mapping[str, int], devices=None) -> Mesh | None:
  """The mesh a config asks for, or None when every axis has size 1 (one device).

  Without a -1 the mesh may use fewer devices than there are (the first ones), so
  that e.g. ``adapter=4`` runs on a host with 8; not with several processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {k: int(v) for k, v in axis_sizes.items()}
  if all(v == 1 for v in sizes.values()):
    return None
  if -1 not in sizes.values():
    needed = int(np.prod(list(sizes.values())))
    if needed > len(devices):
      raise ValueError(f"mesh {sizes} needs {needed} devices, have {len(devices)}")
    if needed < len(devices) and jax.process_count() > 1:
      # A subset would leave some processes without devices in every computation.
      raise ValueError(
        f"mesh {sizes} uses {needed} of {len(devices)} devices; with "
        f"{jax.process_count()} processes it must use all (give one axis -1)"
      )
    devices = devices[:needed]
  return make_mesh(sizes, devices)
