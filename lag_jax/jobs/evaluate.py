"""The ``evaluate`` job: build knowledge and task libraries, run every method, report.

Benchmarks: ``synthetic`` (a seeded fictional world: gold adapters known exactly)
and ``fanoutqa`` (real Wikipedia summaries and FanOutQA questions, tuning / test
halves). Libraries are built resumably under the workdir (or ``library_root``), so
a second run reuses them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import jax
import ml_collections
from absl import logging

from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.errors import ConfigError
from lag_jax.eval import harness
from lag_jax.jobs import common
from lag_jax.routing.shared import parse_mode, remove_shared
from lag_jax.text.tokenizer import Tokenizer
from lag_jax.training import AdapterJob, TrainConfig, build_library


def _train_config(c: ml_collections.ConfigDict) -> TrainConfig:
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  kw = {k: v for k, v in c.items() if k in fields}
  unknown = sorted(set(c.keys()) - fields)
  if unknown:
    raise ConfigError(f"unknown training config fields: {unknown}; valid: {sorted(fields)}")
  if "target_modules" in kw:
    kw["target_modules"] = tuple(common.split_list(kw["target_modules"]))
  return TrainConfig(**kw)


def _knowledge_texts(document, restate_sentences: int) -> list[str]:
  """The page, plus title-anchored restatements of its first sentences (0: none)."""
  from lag_jax.data.restate import restatements

  return [document.text, *restatements(document.title, document.text, restate_sentences)]


def _synthetic(config):
  from lag_jax.data.synthetic import make_world

  c = config.synthetic
  world = make_world(c.num_entities, seed=c.seed, questions_per_entity=c.questions_per_entity)
  knowledge_jobs = [
    AdapterJob(t, texts=world.training_texts(t), metadata={"title": t}) for t in world.documents
  ]
  examples = [ex for task in c.tasks for ex in world.tasks[task]]
  # Task adapters learn each task's format on another world's people, so that they
  # cannot carry the evaluation facts.
  other = make_world(c.task_entities, seed=c.seed + 1000)
  task_data = {task: other.tasks[task] for task in c.tasks}
  documents = world.knowledge()
  return (
    knowledge_jobs,
    examples,
    task_data,
    documents,
    {t: harness.FAMILY_OF_TASK[t] for t in c.tasks},
  )


def _fanoutqa(config):
  from lag_jax.data.fanoutqa import build_fanoutqa

  c = config.fanoutqa
  bench = build_fanoutqa(
    c.library_size or None,
    num_evidence_pages=c.num_evidence_pages or None,
    answerable_only=c.answerable_only,
    seed=c.seed,
  )
  logging.info("FanOutQA: %s", bench.stats)
  knowledge_jobs = [
    AdapterJob(d.title, texts=_knowledge_texts(d, c.restate_sentences), metadata={"title": d.title})
    for d in bench.documents
  ]
  examples = bench.split(c.split) if c.split != "all" else list(bench.examples)
  if c.max_questions:
    examples = examples[: c.max_questions]
  other = build_fanoutqa(None, seed=c.seed + 1000)  # questions on pages NOT in the library
  library_titles = {d.title for d in bench.documents}
  task_examples = [ex for ex in other.examples if ex.provenance[0] not in library_titles]
  return (
    knowledge_jobs,
    examples,
    {"qa": task_examples[: c.task_examples]},
    list(bench.documents),
    {"qa": "QA"},
  )


def _kilt(config):
  """KILT files: the N pages most cited as provenance form the knowledge library."""
  import collections

  from lag_jax.data.kilt import KILT_DATASETS, dataset_from_filename, read_kilt, read_kilt_wikipedia

  c = config.kilt
  eval_files = common.split_list(c.eval_files)
  examples = []
  for path in eval_files:
    exs, report = read_kilt(path)
    logging.info("%s: %s", path, report.summary())
    examples += exs
  cited = collections.Counter(t for ex in examples for t in ex.provenance)
  pages = [t for t, _ in cited.most_common(c.num_pages)]
  documents = read_kilt_wikipedia(c.knowledge_source, titles=set(pages))
  have = {d.title for d in documents}
  examples = [ex for ex in examples if ex.provenance and ex.provenance[0] in have]
  if c.max_per_dataset:
    per = collections.defaultdict(list)
    for ex in examples:
      per[ex.dataset].append(ex)
    examples = [ex for exs in per.values() for ex in exs[: c.max_per_dataset]]
  knowledge_jobs = [
    AdapterJob(d.title, texts=_knowledge_texts(d, c.restate_sentences), metadata={"title": d.title})
    for d in documents
  ]
  task_data = collections.defaultdict(list)
  for path in common.split_list(c.task_train_files):
    exs, _ = read_kilt(path)
    # Task adapters must not learn the library's facts: their provenance lies outside.
    task_data[
      KILT_DATASETS.get(dataset_from_filename(path) or "", exs[0].task if exs else "qa")
    ] += [ex for ex in exs if not set(ex.provenance) & have][: c.task_examples]
  families = {ex.task: harness.FAMILY_OF_TASK[ex.task] for ex in examples}
  return knowledge_jobs, examples, dict(task_data), documents, families


def _check_config(config) -> None:
  """Everything that can be checked before any work: a bad field fails in a second,
  not after the libraries are trained."""
  parse_mode(config.shared_removal)
  builders = ("synthetic", "fanoutqa", "kilt")
  if config.benchmark not in builders:
    raise ConfigError(f"config field 'benchmark'={config.benchmark!r}: choose from {builders}")
  common.int_list("k_sweep", config.k_sweep)
  if config.methods:
    harness.select_methods(
      harness.standard_methods(config.k),
      common.split_list(config.methods),
      config.k,
      config.retrieval,
    )
  _train_config(config.knowledge_training)
  _train_config(config.task_training)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if jax.process_count() > 1:
    # Library builds write shared folders and results are written once: several
    # processes would race. Multi-host runs are for generation (jobs/generate.py).
    raise ValueError(
      f"the evaluate job runs in a single process; got {jax.process_count()} (drop --distributed)"
    )
  _check_config(config)
  t_start = time.perf_counter()
  builders = {"synthetic": _synthetic, "fanoutqa": _fanoutqa, "kilt": _kilt}
  knowledge_jobs, examples, task_data, documents, families = builders[config.benchmark](config)
  methods = harness.standard_methods(
    config.k, with_spectr=len(knowledge_jobs) <= config.spectr_max_n
  )
  methods = [m for m in methods if config.retrieval or not m.needs_retrieval]
  if config.methods:  # standard names, and request-level ones (harness.BEYOND)
    wanted = common.split_list(config.methods)
    methods = harness.select_methods(methods, wanted, config.k, config.retrieval)
  folder = common.resolve_checkpoint(config.checkpoint)
  model = load_model(folder)
  tokenizer = Tokenizer.from_dir(folder)
  root = config.library_root or workdir

  t0 = time.perf_counter()
  # Knowledge texts end with the document separator, not the chat turn's end.
  doc_eos = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None
  knowledge = build_library(
    knowledge_jobs,
    model,
    tokenizer,
    os.path.join(root, "knowledge"),
    _train_config(config.knowledge_training),
    eos_token=doc_eos,
  )
  knowledge, shared = remove_shared(knowledge, config.shared_removal)
  if shared.count:
    logging.info(
      "Knowledge routing with %d shared direction(s) removed (%s)", shared.count, shared.mode
    )
  task_jobs = []
  for task, exs in task_data.items():
    pairs = [(harness.render_prompt(tokenizer, ex)[0], ex.answers[0]) for ex in exs]
    task_jobs.append(AdapterJob(task, pairs=pairs, metadata={"task": task}))
  task_lib = (
    build_library(
      task_jobs, model, tokenizer, os.path.join(root, "task"), _train_config(config.task_training)
    )
    if config.use_task_library
    else None
  )
  t_build = time.perf_counter() - t0

  retrieved = None
  if config.retrieval:
    from lag_jax.retrieval import BM25Index

    index = BM25Index.build(documents)
    ids, _ = index.search([ex.input for ex in examples], 1)
    retrieved = [int(i) for i in ids[:, 0]]
  gold = [
    knowledge.names.index(ex.provenance[0]) if ex.provenance[0] in knowledge.names else -1
    for ex in examples
  ]
  task_ids = [task_lib.names.index(ex.task) for ex in examples] if task_lib else None
  setting = harness.Setting(
    model=model,
    tokenizer=tokenizer,
    knowledge=knowledge,
    task=task_lib,
    documents=documents,
    max_new_tokens=config.max_new_tokens,
    batch_size=config.batch_size,
    rag_max_chars=config.rag_max_chars,
  )
  results = [harness.run_method(setting, m, examples, gold, task_ids, retrieved) for m in methods]
  sweep = []
  for k in common.int_list("k_sweep", config.k_sweep):
    m = harness.Method(f"LAG(k={k})", "lag", "lag", k=k)
    # LAG with k = 1 is hard Arrow and with k >= N is SpectR, selection for selection
    # (tests/test_routing.py): reuse those runs instead of generating again.
    same = "Arrow" if k == 1 else "SpectR" if k >= len(knowledge) else m.name
    r = next((r for r in results if r.method in (m.name, same)), None)
    if r is None:
      r = harness.run_method(setting, m, examples, gold, task_ids, retrieved)
    elif r.method != m.name:
      r = dataclasses.replace(r, method=m.name)
    sweep.append((k, r))
  table = harness.summarize(results, {harness.dataset_of(ex): families[ex.task] for ex in examples})
  sweep_table = (
    harness.summarize(
      [r for _, r in sweep] + [r for r in results if r.method == "Oracle"],
      {harness.dataset_of(ex): families[ex.task] for ex in examples},
    )
    if sweep
    else {}
  )
  report = {
    "benchmark": config.benchmark,
    "num_examples": len(examples),
    "num_knowledge_adapters": len(knowledge),
    "shared_removal": config.shared_removal,
    "num_task_adapters": 0 if task_lib is None else len(task_lib),
    "build_seconds": t_build,
    "total_seconds": time.perf_counter() - t_start,
    "methods": table,
    "k_sweep": {str(k): sweep_table.get(r.method) for k, r in sweep},
    "predictions": {
      r.method: [
        {"id": ex.id, "input": ex.input, "answers": list(ex.answers), "prediction": p, **s}
        for ex, p, s in zip(examples, r.predictions, r.scores, strict=True)
      ]
      for r in results
    },
  }
  markdown = harness.markdown_table(report)
  _write_results(workdir, report, markdown)
  print(markdown)
  logging.info("evaluate: %.1fs in all (library builds %.1fs)", report["total_seconds"], t_build)
  return report


# Everything an evaluate run writes to its workdir, besides the libraries.
RESULT_FILES = (
  "results.json",
  "results.md",
  "score_vs_k.png",
  "routing_by_layer.png",
  "methods.png",
)


def _write_results(workdir: str, report: dict, markdown: str) -> None:
  """Writes every result file into a temporary folder first, then moves them into the
  workdir together (and removes an older run's files this run does not make), so a
  run that fails leaves the previous run's set whole, never a mix of the two."""
  stage = tempfile.mkdtemp(prefix=".tmp-results-", dir=workdir)
  try:
    common.write_json_atomic(os.path.join(stage, "results.json"), report)
    with common.atomic_write(os.path.join(stage, "results.md")) as f:
      f.write(markdown)
    harness.plot(report, stage)
    for name in RESULT_FILES:
      made, target = os.path.join(stage, name), os.path.join(workdir, name)
      if os.path.exists(made):
        common.publish(made, target)
      elif os.path.exists(target):
        os.remove(target)  # an older run's plot that this run does not have
  finally:
    shutil.rmtree(stage, ignore_errors=True)
