"""Runs over several JAX processes (one per host): start-up, placement, who writes.

Multi-controller JAX: every process runs the same program over the global mesh (the
devices of all processes) and holds only the shards on its own (addressable)
devices. The rules this project follows:

- ``initialize`` once, first thing (``lag_jax.run`` does it): flags or the
  environment name the coordinator, the process count and this process's id; on
  TPU pods, SLURM or Open MPI ``mode='on'`` lets JAX detect them. One process and
  nothing given: a no-op.
- Every process reads the same inputs (checkpoint, library, prompts) and places
  only its own devices' slices of them (``put``): nothing is compared or sent
  between processes at load time.
- Results are gathered to every process (``to_host``) and only process 0
  (``is_primary``) writes files; caches that a first use fills are filled by
  process 0 before the others look (``primary_first``).

CPU: cross-process collectives use gloo, which is already the default of
``jax_cpu_collectives_implementation`` in jax 0.10 (so nothing is set here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from absl import logging

MODES = ("auto", "on", "off")
ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}
T = TypeVar("T")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout_s: int = 300,
) -> bool:
  """Starts ``jax.distributed`` when this run has (or may have) several processes.

  Each argument left None is read from the environment (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Must run before anything touches a
  device (it fixes the set of global devices).

  Args:
    mode: 'auto': initialize when any of the three is given (flags or environment),
      else run as one process; 'on': always initialize, values not given are
      detected by JAX (TPU pod slices, SLURM, Open MPI, Kubernetes); 'off': never.
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: how many processes take part.
    process_id: this process's index in [0, num_processes).
    timeout_s: how long to wait for every process to connect.
  Returns:
    True when jax.distributed is running (several processes may take part).
  Raises:
    ValueError: an unknown mode or a malformed environment value.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} is unknown; choose from {MODES}")
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
  if num_processes is None:
    num_processes = _env_int(ENV["num_processes"])
  if process_id is None:
    process_id = _env_int(ENV["process_id"])
  given = (coordinator_address, num_processes, process_id)
  if mode == "off" or (mode == "auto" and all(v is None for v in given)):
    return False
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=timeout_s,
  )
  logging.info(
    "Process %d of %d (coordinator %s): %d local of %d global devices",
    jax.process_index(),
    jax.process_count(),
    coordinator_address or "detected",
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def is_primary() -> bool:
  """True on process 0, the one that writes merged outputs."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], T], name: str) -> T:
  """``fn()`` on process 0, then on the others: process 0 fills a cache (a converted
  checkpoint, random test adapters) that the others then find, rather than all
  writing it at once. On hosts with their own disks each fills its own."""
  if jax.process_count() == 1:
    return fn()
  if is_primary():
    out = fn()
    barrier(name)
    return out
  barrier(name)
  return fn()


def put(host, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array (the same on every process) placed with ``sharding``.

  With a sharding over several processes each process transfers only the slices of
  its own devices. (``jax.device_put`` would first check that all processes hold
  equal values: an all-gather of the whole array, e.g. a whole adapter library.)
  """
  host = np.asarray(host)
  if sharding.is_fully_addressable:
    return jax.device_put(host, sharding)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
  """Numpy copies of a pytree of arrays, the same on every process.

  A leaf split over devices of several processes is all-gathered (a collective:
  every process must call this with the same tree, as SPMD code does anyway).
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)
