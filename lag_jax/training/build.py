"""Builds an adapter library: trains every job, n at a time, resumably.

Output folder::

  build.json         the training settings; a rerun with other settings is refused
  adapters/<folder>/ one PEFT adapter per finished job (written atomically), with
                     lag_build.json: the fingerprint of what it was trained on
  library/           the packed AdapterLibrary (orbax + library.json, atomic)
  train_log.jsonl    per adapter: steps, targets and its loss curve (informative)

Slots are refilled as soon as their adapter finishes, so n adapters train in every
step until the queue runs dry. Resuming: a job whose PEFT folder holds the job's
fingerprint is finished and never retrained; adapters join the library in job order
(the longest finished prefix of the job list that the library lacks), so that the
library's order, and its arrays, do not depend on when a build was interrupted.
Because every adapter's training depends only on (seed, name, its data, the
settings) and slots are independent (lora_trainer), a killed and resumed build
writes the same bits as an uninterrupted one.

A job's fingerprint covers its tokenised data (texts, pairs: so the tokenizer
too), the training settings, the row length and the base model's weights. A rerun
whose job has another fingerprint than the adapter on disk (another world, edited
documents, another base model) retrains that adapter; a library that holds an
adapter of another fingerprint, or one that is not among the jobs, is rebuilt from
the adapters of this build, so a library never mixes adapters of different builds.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from lag_jax.adapters.apply import stack_lora
from lag_jax.adapters.peft_io import AdapterFile, LoraAdapter, save_peft_adapter
from lag_jax.errors import some_names
from lag_jax.files import write_json_atomic
from lag_jax.integrity import array_digests, fingerprint
from lag_jax.model.transformer import CausalLM
from lag_jax.routing.library import AdapterLibrary
from lag_jax.text.tokenizer import right_pad
from lag_jax.training.data import (
  AdapterJob,
  AdapterRows,
  Examples,
  adapter_seeds,
  build_seq_len,
  folder_name,
  make_rows,
  tokenize_job,
)
from lag_jax.training.lora_trainer import (
  SlotTrainer,
  TrainConfig,
  check_finite,
  example_keys,
  module_shapes,
  peft_modules,
  token_losses,
)

_BUILD_FILE = "build.json"
_FORMAT_VERSION = 1
# In every finished adapter's PEFT folder: {"fingerprint": ..., "name": ...}.
RECORD_FILE = "lag_build.json"


def model_fingerprint(model: CausalLM) -> str:
  """The base model's config and a sha256 of every parameter (hashed on a thread pool:
  a fraction of a second for SmolLM2-135M, once per build)."""
  params = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  digests = array_digests({jax.tree_util.keystr(p): np.asarray(x) for p, x in params})
  return fingerprint({"config": dataclasses.asdict(model.config), "params": digests})


def job_fingerprint(examples: Examples, recipe: str) -> str:
  """What an adapter is trained on: its tokenised texts and pairs, under ``recipe``
  (a fingerprint of the settings, row length and base model)."""
  h = hashlib.sha256(recipe.encode())
  arrays = [*examples.texts, *(x for pair in examples.pairs for x in pair)]
  h.update(f"{len(examples.texts)}/{len(examples.pairs)}".encode())
  for x in arrays:
    x = np.ascontiguousarray(x)
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
  return "sha256:" + h.hexdigest()


def _recorded_fingerprint(folder: str) -> str | None:
  """The fingerprint a finished adapter's folder records, or None (none / unreadable)."""
  try:
    with open(os.path.join(folder, RECORD_FILE)) as f:
      return json.load(f).get("fingerprint")
  except (OSError, ValueError, AttributeError):
    return None


def _check_build_file(out_dir: str, config: TrainConfig, T: int) -> int:
  """Writes build.json, or checks that an earlier run used the same settings.

  Returns the build's row length: the one on record when resuming (so that jobs
  added to a build are cut into rows of the same T and nothing recompiles).
  """
  path = os.path.join(out_dir, _BUILD_FILE)
  want = {"format_version": _FORMAT_VERSION, "train": config.result_fields(), "seq_len": T}
  want = json.loads(json.dumps(want))  # tuples -> lists, as they come back from disk
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    if {k: v for k, v in have.items() if k != "seq_len"} != {
      k: v for k, v in want.items() if k != "seq_len"
    }:
      diff = sorted(
        k
        for k in set(have.get("train", {})) | set(want["train"])
        if have.get("train", {}).get(k) != want["train"].get(k)
      )
      raise ValueError(
        f"{out_dir} holds a build made with other settings ({diff}); "
        "use another folder, or the same settings to resume it"
      )
    return int(have["seq_len"])
  write_json_atomic(path, want)
  return T


@dataclasses.dataclass
class _Slot:
  job: int
  rows: AdapterRows
  key: np.ndarray
  total: int
  step: int = 0
  losses: list[float] = dataclasses.field(default_factory=list)
  started: float = 0.0


def build_library(
  jobs: Sequence[AdapterJob],
  model: CausalLM,
  tokenizer,
  out_dir: str | os.PathLike,
  config: TrainConfig | None = None,
  *,
  eos_token: str | None = None,
  on_adapter_saved: Callable[[str], None] | None = None,
  progress: bool = True,
) -> AdapterLibrary:
  """Trains one LoRA adapter per job and packs them into a library; resumable.

  Args:
    jobs: the adapters to train (unique names). Rerun with the same list to resume.
    model: the base model (its weights are never changed).
    tokenizer: a ``lag_jax.text.Tokenizer`` (anything with ``encode``,
      ``eos_token_ids``, ``pad_token_id`` and ``token_to_id``).
    out_dir: the build folder (layout in the module docstring).
    config: training settings (default TrainConfig()).
    eos_token: the token that ends each text and answer (with ``config.add_eos``);
      default the tokenizer's EOS.
    on_adapter_saved: called with an adapter's name once its PEFT folder is written.
    progress: show a tqdm bar (adapters/s and ETA).
  Returns:
    The library of all jobs, in job order (after any adapters an older library in
    ``out_dir`` already held).
  Raises:
    ValueError: duplicate names, a job without data, or ``out_dir`` built with
      other settings.
    FloatingPointError: an adapter's loss became NaN / Inf.
  """
  config = config or TrainConfig()
  if not jobs:
    raise ValueError("build_library needs at least one job")
  names = [j.name for j in jobs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"duplicate adapter names: {dupes}")
  folders = [folder_name(n) for n in names]
  clash = sorted({f for f in folders if folders.count(f) > 1})
  if clash:
    raise ValueError(f"adapter names map to the same folder name: {clash}")
  out_dir = os.path.abspath(os.fspath(out_dir))
  adapters_dir = os.path.join(out_dir, "adapters")
  library_dir = os.path.join(out_dir, "library")
  os.makedirs(adapters_dir, exist_ok=True)
  model_config = model.config
  # The library's modules, in the model's order.
  trainer_modules = tuple(m for m, _, _ in module_shapes(model_config, config.target_modules))

  eos_id = None
  if config.add_eos:
    eos_id = (
      tokenizer.token_to_id(eos_token)
      if eos_token is not None
      else (tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None)
    )
    if eos_id is None:
      raise ValueError(f"add_eos: the tokenizer has no token {eos_token or 'EOS'!r}")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  examples = [tokenize_job(j, tokenizer, eos_id) for j in jobs]
  T = _check_build_file(
    out_dir, config, build_seq_len(examples, config.epochs, config.max_seq_len, config.pack)
  )
  recipe_fields = {
    "train": config.result_fields(),
    "seq_len": T,
    "base_model": model_fingerprint(model),
  }
  if config.pack and any(ex.texts and ex.pairs for ex in examples):
    # Rows laid out otherwise than before pairs were packed: never mistaken for those.
    recipe_fields["rows"] = "texts and pairs packed together"
  recipe = fingerprint(recipe_fields)
  prints = [job_fingerprint(ex, recipe) for ex in examples]

  def rows_of(i: int) -> AdapterRows:
    _, np_seed = adapter_seeds(config.seed, names[i])
    return make_rows(
      examples[i],
      epochs=config.epochs,
      T=T,
      pack=config.pack,
      pad_id=pad_id,
      np_seed=np_seed,
      max_targets=config.token_budget,
    )

  def folder(i: int) -> str:
    return os.path.join(adapters_dir, folders[i])

  def metadata(i: int, rows: AdapterRows) -> dict:
    return {
      **dict(jobs[i].metadata),
      "train_targets": rows.targets,
      "train_steps": rows.steps(config.batch_size),
      "fingerprint": prints[i],
    }

  # Adapters in the library or on disk with this job's fingerprint are finished; other
  # adapters on disk are of another build, and are retrained.
  library = _current_library(library_dir, dict(zip(names, prints, strict=True)))
  in_library = set(library.names) if library is not None else set()
  stale, finished = [], []
  for i in range(len(jobs)):
    on_disk = os.path.exists(os.path.join(folder(i), "adapter_config.json"))
    current = on_disk and _recorded_fingerprint(folder(i)) == prints[i]
    if names[i] in in_library and not on_disk:
      logging.warning(
        "Adapter %r is in the library but its PEFT folder %s is missing; not retraining it",
        names[i],
        folder(i),
      )
    elif on_disk and not current and names[i] not in in_library:
      stale.append(names[i])
    finished.append(current or names[i] in in_library)
  if stale:
    logging.warning(
      "%d adapter(s) in %s were trained on other data, settings or base model (or before "
      "builds recorded fingerprints); retraining them: %s",
      len(stale),
      adapters_dir,
      some_names(stale),
    )

  def flush(force: bool) -> None:
    """Appends the finished prefix of the job list that the library lacks."""
    nonlocal library
    addable = []
    for i in range(len(jobs)):
      if names[i] in in_library:
        continue
      if not finished[i]:
        break
      addable.append(i)
    size = 0 if library is None else len(library)
    if not addable or (
      not force and len(addable) < max(1, math.ceil(config.library_flush_fraction * size))
    ):
      return
    t0 = time.perf_counter()
    adapters = [AdapterFile(folder(i), name=names[i]) for i in addable]  # read in chunks
    meta = {names[i]: metadata(i, rows_of(i)) for i in addable}
    if library is None:
      library = AdapterLibrary.from_adapters(
        adapters,
        model_config,
        trainer_modules,
        dtype=jnp.dtype(config.library_dtype),
        metadata=meta,
      )
    else:
      library = library.add(adapters, model_config, metadata=meta)
    library.save(library_dir)
    in_library.update(names[i] for i in addable)
    logging.info(
      "Library %s: +%d adapters -> %d (%.1f s)",
      library_dir,
      len(addable),
      len(library),
      time.perf_counter() - t0,
    )

  queue = collections.deque(i for i in range(len(jobs)) if not finished[i])
  if 0 < len(queue) < config.n_slots:
    # Every step computes all slots' rows: no more slots than adapters left to train
    # (what an adapter learns does not depend on n_slots).
    config = dataclasses.replace(config, n_slots=len(queue))
  logging.info(
    "Building %d adapters in %s: %d finished, %d to train; %d slots x %d rows x %d tokens",
    len(jobs),
    out_dir,
    sum(finished),
    len(queue),
    config.n_slots,
    config.batch_size,
    T,
  )
  flush(force=not queue)
  if not queue:
    print(f"{out_dir}: all {len(jobs)} adapters are built and current; nothing to train")
    return library

  trainer = SlotTrainer(model, config)
  n, bs = config.n_slots, config.batch_size
  slots: list[_Slot | None] = [None] * n
  bar = tqdm.tqdm(
    total=len(jobs),
    initial=sum(finished),
    unit="adapter",
    disable=not progress,
    dynamic_ncols=True,
    desc="adapters",
  )
  log_path = os.path.join(out_dir, "train_log.jsonl")
  steps_done, t_start = 0, time.perf_counter()
  try:
    while True:
      reset = np.zeros(n, bool)
      keys = np.zeros((n, 2), np.uint32)
      totals = np.ones(n, np.int32)
      for j in range(n):
        if slots[j] is None and queue:
          i = queue.popleft()
          rows = rows_of(i)
          key, _ = adapter_seeds(config.seed, names[i])
          slots[j] = _Slot(i, rows, key, rows.steps(bs), started=time.perf_counter())
          reset[j], keys[j], totals[j] = True, key, slots[j].total
      if reset.any():
        trainer.load(reset, keys, totals)
      if all(s is None for s in slots):
        break

      tokens = np.full((n * bs, T), pad_id, np.int32)
      loss_mask = np.zeros((n * bs, T), bool)
      ex_keys = np.zeros((n * bs, 2), np.uint32)
      ex_steps = np.zeros(n * bs, np.int32)
      ex_rows = np.tile(np.arange(bs, dtype=np.int32), n)
      for j, s in enumerate(slots):
        if s is None:
          continue
        part = slice(s.step * bs, (s.step + 1) * bs)
        k = s.rows.tokens[part].shape[0]
        tokens[j * bs : j * bs + k] = s.rows.tokens[part]
        loss_mask[j * bs : j * bs + k] = s.rows.loss_mask[part]
        ex_keys[j * bs : (j + 1) * bs] = s.key
        ex_steps[j * bs : (j + 1) * bs] = s.step
      batch = {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "ids": np.repeat(np.arange(n, dtype=np.int32), bs),
      }
      rng = np.asarray(example_keys(ex_keys, ex_steps, ex_rows)) if config.dropout > 0 else None
      metrics = trainer.step(batch, rng)
      steps_done += 1
      check_finite(metrics, [None if s is None else names[s.job] for s in slots])

      for j, s in enumerate(slots):
        if s is None:
          continue
        s.losses.append(float(metrics["loss"][j]))
        s.step += 1
        if s.step < s.total:
          continue
        i = s.job
        adapter = LoraAdapter.from_arrays(
          names[i],
          peft_modules(trainer.factors(j)),
          config.rank,
          config.alpha,
          use_rslora=config.use_rslora,
          target_modules=list(trainer_modules),
        )
        save_peft_adapter(
          adapter, folder(i), {RECORD_FILE: {"name": names[i], "fingerprint": prints[i]}}
        )
        finished[i] = True
        slots[j] = None
        seconds = time.perf_counter() - s.started
        # Means over the first and last quarter of steps: a single step's loss is noisy
        # (a packed stream's last row can be a few tokens with little context).
        q = max(1, len(s.losses) // 4)
        logging.info(
          "Adapter %r: %d steps, %d target tokens, mean loss %.3f (first %d steps) -> "
          "%.3f (last %d) (%.1f s)",
          names[i],
          s.total,
          s.rows.targets,
          sum(s.losses[:q]) / q,
          q,
          sum(s.losses[-q:]) / q,
          q,
          seconds,
        )
        with open(log_path, "a") as f:
          f.write(
            json.dumps(
              {
                "name": names[i],
                "steps": s.total,
                "targets": s.rows.targets,
                "losses": [round(x, 5) for x in s.losses],
              }
            )
            + "\n"
          )
        bar.update(1)
        bar.set_postfix(
          loss=f"{sum(s.losses[-q:]) / q:.3f}",
          steps_per_s=f"{steps_done / (time.perf_counter() - t_start):.2f}",
        )
        if on_adapter_saved is not None:
          on_adapter_saved(names[i])
        flush(force=False)
  finally:
    bar.close()
  flush(force=True)
  return library


def _current_library(library_dir: str, prints: dict[str, str]) -> AdapterLibrary | None:
  """The saved library of this build, or None when there is none or it must be
  rebuilt: it holds an adapter that is not among the jobs, or one whose fingerprint
  is not the job's (an adapter of another build)."""
  if not os.path.exists(os.path.join(library_dir, "library.json")):
    return None
  library = AdapterLibrary.load(library_dir)
  foreign = [n for n in library.names if n not in prints]
  changed = [
    n
    for n in library.names
    if n in prints and library.metadata.get(n, {}).get("fingerprint") != prints[n]
  ]
  if not foreign and not changed:
    return library
  logging.warning(
    "Library %s is rebuilt from this build's adapters: %s",
    library_dir,
    "; ".join(
      part
      for part in (
        foreign and f"{len(foreign)} adapter(s) not in this build ({some_names(foreign)})",
        changed and f"{len(changed)} trained on other data or settings ({some_names(changed)})",
      )
      if part
    ),
  )
  return None


def text_losses(
  model: CausalLM,
  tokenizer,
  texts: Sequence[str],
  adapter: LoraAdapter | None = None,
  *,
  max_seq_len: int = 512,
) -> np.ndarray:
  """Mean next-token loss of each text [len(texts)] (its first max_seq_len tokens),
  on the base model or with ``adapter`` applied."""
  ids = [tokenizer.encode(t)[:max_seq_len] for t in texts]
  tokens, mask = right_pad(ids)
  lora = None if adapter is None else stack_lora(adapter, model.config)
  return token_losses(model, tokens, mask, lora)
