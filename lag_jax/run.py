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

import difflib
import importlib.util
import logging as py_logging
import os
import sys
import tempfile
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lag_jax import distributed, jobs
from lag_jax.assets import cache_dir
from lag_jax.errors import ConfigError, UserError

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
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Show the full traceback of an error in the input (default: one line)."
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


def _fail(error: BaseException, verbose: bool) -> None:
  """Reports an error in the user's input as one line on stderr and exits 1; the
  traceback only with --verbose. Errors that are not a UserError name their type (a
  ValueError or OSError may still be a bug; --verbose tells)."""
  if verbose:
    traceback.print_exception(error)
  kind = "" if isinstance(error, UserError) else f"{type(error).__name__}: "
  hint = "" if verbose else " (--verbose shows the traceback)"
  print(f"error: {kind}{error}{hint if kind else ''}", file=sys.stderr)
  sys.exit(1)


def _config_fields(config, prefix: str = "") -> list[str]:
  """Every field path of a ConfigDict, nested ones dotted ('generation.top_p')."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items"):
      out += _config_fields(value, prefix + key + ".")
  return out


def _config_problem(argv: list[str], error: BaseException) -> str:
  """What is wrong with --config / --config.FIELD in ``argv``, in words, after
  config_flags failed with ``error`` (its own messages are tracebacks of KeyError)."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None or isinstance(error, flags.UnrecognizedFlagError):
    return str(error)
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    near = difflib.get_close_matches(
      os.path.basename(path), os.listdir(folder) if os.path.isdir(folder) else [], n=1
    )
    hint = f"; did you mean {os.path.join(folder, near[0])!r}?" if near else ""
    return f"--config={spec}: no such config file {path!r}{hint}"
  try:
    module_spec = importlib.util.spec_from_file_location("_lag_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # the config file itself fails: say which and how
    return f"--config={spec}: loading the config failed: {type(e).__name__}: {e}"
  fields = _config_fields(config)
  for a in argv:
    if not a.startswith("--config."):
      continue
    name = a[len("--config.") :].split("=", 1)[0]
    if name not in fields:
      near = difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
      hint = f"; did you mean --config.{near[0]}?" if near else ""
      return f"--config.{name}: {path} has no config field {name!r}{hint}"
  if isinstance(error, flags.Error):  # e.g. a value of the wrong type: absl says which
    return str(error)
  return f"--config={spec}: {type(error).__name__}: {error}"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config_flags' failures (an unknown field, a missing
  config file: tracebacks of KeyError / OSError) turned into one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - every failure to parse is reported
    error = ConfigError(_config_problem(argv, e))
    error.__cause__ = e  # --verbose shows config_flags' own traceback
    _fail(error, "--verbose" in argv)


def _check_workdir(workdir: str) -> None:
  """The workdir exists (created here) and takes files: checked before any work, so
  that a bad one never loses the outputs of a long run."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: exists and is not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror})") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
    job = config.job  # a config that failed to load raises only when used
  except Exception as e:  # noqa: BLE001 - a config that failed to load
    error = ConfigError(_config_problem(sys.argv, e))
    error.__cause__ = e
    _fail(error, _VERBOSE.value)
  workdir = _WORKDIR.value or os.path.join("workdir", job)
  try:
    _check_workdir(workdir)
    _run(config, workdir)
  except (UserError, ValueError, OSError) as e:
    _fail(e, _VERBOSE.value)


def _run(config, workdir: str) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before anything touches a device: it fixes the global device set.
  distributed.initialize(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  if not jax.config.jax_compilation_cache_dir:
    # Compiled programs persist between runs (a cached demo run mostly compiled).
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if distributed.is_primary():
    logging.info("Job %s, workdir %s, config:\n%s", config.job, workdir, config)
  jobs.run(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
