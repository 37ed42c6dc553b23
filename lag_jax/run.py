"""Entry point: ``python -m lag_jax.run --config=configs/<name>.py[:arg] --workdir=DIR``.

Flags -> config -> one job function. Override any config field with
``--config.a.b=value``; an unknown field is an error.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from lag_jax import jobs

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for outputs (created if missing).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdir", config.job)
  os.makedirs(workdir, exist_ok=True)
  logging.info("Job %s, workdir %s, config:\n%s", config.job, workdir, config)
  jobs.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
