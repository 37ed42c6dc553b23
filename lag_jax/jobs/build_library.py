"""The ``build_library`` job: stack a folder of PEFT adapters into a routed library.

Signatures are computed once; rerunning on a grown adapter folder computes them for
the new adapters only and rewrites the library atomically.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from absl import logging

from lag_jax.adapters import load_peft_adapter
from lag_jax.jobs import common
from lag_jax.model.config import ModelConfig
from lag_jax.routing.library import AdapterLibrary, peft_adapter_dirs


def run(config: ml_collections.ConfigDict, workdir: str) -> AdapterLibrary:
  if jax.process_count() > 1:
    # One library folder, written once; orbax would also expect every process to
    # save its own shards of device arrays, which a host-built library is not.
    raise ValueError(
      "build_library runs as one process (it writes one library folder); "
      "multi-process jobs then load the saved library on every process"
    )
  model_config = ModelConfig.from_file(common.resolve_checkpoint(config.checkpoint))
  library_dir = config.library_dir or os.path.join(workdir, "library")
  dirs = peft_adapter_dirs(common.resolve_adapters_dir(config.adapters_dir))
  if not dirs:
    raise ValueError(
      f"config field 'adapters_dir'={config.adapters_dir!r}: no PEFT adapter "
      "sub-folders (with adapter_config.json) found"
    )
  modules = common.split_list(config.modules) or None
  existing = None
  if os.path.exists(os.path.join(library_dir, "library.json")):
    existing = AdapterLibrary.load(library_dir)
    dirs = [d for d in dirs if os.path.basename(d) not in set(existing.names)]
    logging.info("Library %s has %d adapters; %d new", library_dir, len(existing), len(dirs))
  if not dirs:
    return existing
  t0 = time.perf_counter()
  adapters = [load_peft_adapter(d, allow_pickle=config.allow_pickle) for d in dirs]
  t1 = time.perf_counter()
  dtype = common.dtype("dtype", config.dtype)
  if existing is None:
    library = AdapterLibrary.from_adapters(adapters, model_config, modules, dtype=dtype)
  else:
    library = existing.add(adapters, model_config)
  t2 = time.perf_counter()
  library.save(library_dir)
  logging.info(
    "Read %d adapters in %.1fs; signatures in %.1fs (%.1f adapters/s); library of "
    "%d adapters, %.1f MB, saved to %s",
    len(adapters),
    t1 - t0,
    t2 - t1,
    len(adapters) / max(t2 - t1, 1e-9),
    len(library),
    library.nbytes() / 1e6,
    library_dir,
  )
  print(
    f"library: {len(library)} adapters on {list(library.modules)}, rank {library.rank}, "
    f"{library.nbytes() / 1e6:.1f} MB -> {library_dir}"
  )
  return library
