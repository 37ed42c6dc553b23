"""The ``build_library`` job: stack a folder of PEFT adapters into a routed library.

Signatures are computed once. The library records a digest of every source adapter
folder, so a rerun on the same folder brings the library up to date: new adapters
are added, changed ones recomputed and deleted ones removed (the log and stdout say
which), and the library is rewritten atomically.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from absl import logging

from lag_jax.adapters import AdapterFile
from lag_jax.errors import ConfigError, some_names
from lag_jax.integrity import folder_digest
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
  if not config.adapters_dir:
    raise ConfigError(
      "config field 'adapters_dir' is empty: give a folder whose sub-folders are PEFT "
      "adapters (--config.adapters_dir=/path/to/adapters)"
    )
  source = common.resolve_adapters_dir(config.adapters_dir)
  if not os.path.isdir(source):
    raise ConfigError(f"config field 'adapters_dir'={config.adapters_dir!r}: no such folder")
  dirs = peft_adapter_dirs(source)
  if not dirs:
    raise ConfigError(
      f"config field 'adapters_dir'={config.adapters_dir!r}: no PEFT adapter "
      "sub-folders (with adapter_config.json) found"
    )
  model_config = ModelConfig.from_file(common.resolve_checkpoint(config.checkpoint))
  library_dir = config.library_dir or os.path.join(workdir, "library")
  modules = common.split_list(config.modules) or None
  digests = {os.path.basename(d): folder_digest(d) for d in dirs}
  by_name = {os.path.basename(d): d for d in dirs}

  existing = None
  if os.path.exists(os.path.join(library_dir, "library.json")):
    existing = AdapterLibrary.load(library_dir, config=model_config)
    recorded = {n: existing.metadata.get(n, {}).get("source_digest") for n in existing.names}
    deleted = [n for n in existing.names if n not in digests]
    changed = [n for n in existing.names if n in digests and recorded[n] != digests[n]]
    new = [n for n in digests if n not in recorded]
    summary = (
      f"library {library_dir}: {len(existing)} adapters; {len(new)} new, "
      f"{len(changed)} changed, {len(deleted)} deleted from {source}"
    )
    logging.info("%s", summary)
    for label, names in (("New", new), ("Changed", changed), ("Deleted", deleted)):
      if names:
        logging.info("%s: %s", label, some_names(names))
    if not (new or changed or deleted):
      print(f"{summary}: up to date, nothing to do")
      return existing
    print(
      summary
      + "".join(
        f"; {k}: {some_names(v)}"
        for k, v in (("changed (recomputed)", changed), ("deleted (removed)", deleted))
        if v
      )
    )
    keep = [n for n in existing.names if n not in deleted and n not in changed]
    existing = existing.subset(keep) if keep else None
    todo = [n for n in digests if existing is None or n not in existing.names]
  else:
    todo = list(digests)

  t0 = time.perf_counter()
  # Read chunk by chunk while the signatures are computed (AdapterFile): peak memory is
  # the library plus one chunk, not every adapter as well.
  adapters = [AdapterFile(by_name[n], allow_pickle=config.allow_pickle) for n in todo]
  metadata = {
    a.adapter_name: {"source_digest": digests[n]} for a, n in zip(adapters, todo, strict=True)
  }
  t1 = time.perf_counter()
  dtype = common.dtype("dtype", config.dtype)
  if existing is None:
    library = AdapterLibrary.from_adapters(
      adapters, model_config, modules, dtype=dtype, metadata=metadata
    )
  else:
    library = existing.add(adapters, model_config, metadata=metadata)
  t2 = time.perf_counter()
  library.save(library_dir)
  logging.info(
    "Listed %d adapters in %.1fs; read them and computed signatures in %.1fs "
    "(%.1f adapters/s); library of "
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
