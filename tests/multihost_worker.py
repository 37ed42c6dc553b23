"""One process of the 2-process test (tests/test_multihost.py), and the decode it runs.

  python tests/multihost_worker.py PORT PROCESS_ID LIBRARY_DIR OUT.npz

Joins a 2-process run on CPU (4 devices each, from XLA_FLAGS), loads the tiny
checkpoint and the saved library onto global meshes over all 8 devices, runs a
routed decode per mesh and writes what this process got. The test runs ``decode``
on one device in its own process for the reference.
"""

from __future__ import annotations

import sys

import numpy as np

NUM_PROCESSES = 2
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43], [7], [99, 98, 97]]
MAX_NEW_TOKENS = 4
# The library's adapter axis over all 8 devices (routing collectives cross the two
# processes), and data x adapter = 2 x 4 (each process feeds its own rows).
MESHES = {
  "adapter8": {"data": 1, "fsdp": 1, "model": 1, "adapter": -1},
  "data2_adapter4": {"data": 2, "fsdp": 1, "model": 1, "adapter": -1},
}


def decode(model, library, batch_sharding=None) -> dict[str, np.ndarray]:
  """A LAG decode (k = 3) with tokens, logits and the chosen adapter per token, layer
  and module, as flat arrays. (tests/test_sharding.py covers every router.)"""
  from lag_jax.generation import generate
  from lag_jax.routing import RoutedAdapters, RouterSpec, routed

  hook = RoutedAdapters((routed(library, len(PROMPTS), RouterSpec("lag", k=3)),))
  out = generate(
    model,
    PROMPTS,
    max_new_tokens=MAX_NEW_TOKENS,
    lora=hook,
    return_logits=True,
    return_routing=True,
    batch_sharding=batch_sharding,
  )
  arrays = {"tokens": np.array([t + [-1] * (MAX_NEW_TOKENS - len(t)) for t in out.tokens])}
  for i, logits in enumerate(out.logits):
    arrays[f"logits{i}"] = logits
  for module, (chosen,) in out.routing.items():
    arrays[f"routing_{module}"] = chosen
  return arrays


def main(port: str, process_id: str, library_dir: str, out_path: str) -> None:
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from lag_jax import distributed

  distributed.initialize("auto", f"localhost:{port}", NUM_PROCESSES, int(process_id))
  assert jax.process_count() == NUM_PROCESSES, jax.process_count()
  assert (jax.device_count(), jax.local_device_count()) == (8, 4), jax.devices()
  # What carries the cross-process collectives on CPU (the default in jax 0.10).
  assert jax.config.jax_cpu_collectives_implementation == "gloo"

  from jax.sharding import NamedSharding, PartitionSpec

  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.model.sharding import mesh_from_sizes
  from lag_jax.routing import AdapterLibrary, shard_library
  from lag_jax.testing import tiny_checkpoint

  # Every process reads the same saved library into host memory.
  library = AdapterLibrary.load(library_dir, host=True)
  arrays = {}
  for name, sizes in MESHES.items():
    mesh = mesh_from_sizes(sizes)
    model = load_model(tiny_checkpoint(), mesh=mesh)
    sharded = shard_library(library, mesh)
    # Global arrays; this process placed a slice on each of its own devices.
    assert not any(leaf.is_fully_addressable for leaf in jax.tree.leaves(sharded.weights))
    assert sorted(sharded.nbytes_per_device()) == sorted(d.id for d in jax.local_devices())
    batch = NamedSharding(mesh, PartitionSpec("data")) if sizes["data"] > 1 else None
    for key, value in decode(model, sharded, batch).items():
      arrays[f"{name}/{key}"] = value
  np.savez(out_path, **arrays)
  print(f"process {process_id}: done", file=sys.stderr)


if __name__ == "__main__":
  main(*sys.argv[1:])
