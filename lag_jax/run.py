"""Entry point: ``python -m lag_jax.run --config=configs/<name>.py[:arg] --workdir=DIR``.

Flags -> config -> one job function. Override any config field with
``--config.a.b=value``; an unknown field is an error.

Several processes (one per host; see ``lag_jax.distributed`` and ``launch/``): give
each the same command plus ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); on a TPU pod slice ``--distributed=on`` alone
(JAX finds its peers). Process 0 writes the outputs.
"""

from __future__ import annotations

import logging as py_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lag_jax import distributed, jobs
from lag_jax.assets import cache_dir

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for outputs (created if missing).")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  distributed.MODES,
  "auto: several processes when a coordinator, process count or id is given (flags "
  "or JAX_* environment); on: always (TPU pods, SLURM, MPI: JAX detects the rest); "
  "off: one process.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes taking part (default $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index (default $JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config"])


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records that orbax and jax log from their own files: every library
  save wrote about 30 lines of checkpointing internals. Warnings pass; ``--v=1``
  keeps everything."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING or logging.get_verbosity() >= 1:
      return True
    return not any(part in record.pathname for part in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before anything touches a device: it fixes the global device set.
  distributed.initialize(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  if not jax.config.jax_compilation_cache_dir:
    # Compiled programs persist between runs (a cached demo run mostly compiled).
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdir", config.job)
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_primary():
    logging.info("Job %s, workdir %s, config:\n%s", config.job, workdir, config)
  jobs.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
