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
from lag_jax.eval import harness, injection, method_runs
from lag_jax.eval import report as report_lib
from lag_jax.files import write_json_atomic
from lag_jax.jobs import common
from lag_jax.routing import arrow_sketch
from lag_jax.routing.shared import parse_mode, remove_shared
from lag_jax.text.tokenizer import Tokenizer
from lag_jax.training import AdapterJob, TrainConfig, build_library
from lag_jax.training.knowledge_data import KnowledgeRecipe
from lag_jax.training.knowledge_data import knowledge_jobs as knowledge_jobs_of


def _train_config(c: ml_collections.ConfigDict) -> TrainConfig:
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  kw = {k: v for k, v in c.items() if k in fields}
  unknown = sorted(set(c.keys()) - fields)
  if unknown:
    raise ConfigError(f"unknown training config fields: {unknown}; valid: {sorted(fields)}")
  if "target_modules" in kw:
    kw["target_modules"] = tuple(common.split_list(kw["target_modules"]))
  return TrainConfig(**kw)


# A step of the synthetic world only: the generator's template paraphrases and Q/A
# restatements, made from its structured facts (an ablation: a user has no such data).
GENERATOR_STEP = "generator"


def knowledge_recipe(config, benchmark_has_generator: bool = False):
  """The knowledge-data recipe of the config, and whether the generator's texts join it."""
  c = config.knowledge_data
  steps = common.split_list(c.steps)
  generator = GENERATOR_STEP in steps
  if generator and not benchmark_has_generator:
    raise ConfigError(
      f"config field 'knowledge_data.steps': {GENERATOR_STEP!r} exists for the synthetic "
      "people world only (benchmark 'synthetic', domain 'people')"
    )
  steps = [s for s in steps if s != GENERATOR_STEP]
  fields = {k: v for k, v in c.items() if k != "steps"}
  return KnowledgeRecipe.from_config({**fields, "steps": steps or ("page",)}), generator


DOMAINS = ("people", "companies")


def _make_world(domain: str, n: int, seed: int, questions_per_entity: int = 1):
  if domain == "companies":
    from lag_jax.data.companies import make_company_world

    return make_company_world(n, seed=seed, questions_per_entity=questions_per_entity)
  from lag_jax.data.synthetic import make_world

  return make_world(n, seed=seed, questions_per_entity=questions_per_entity)


def sample_questions(examples, people, per_task: int, split: str, seed: int):
  """The questions of a synthetic run: those on ``people``, sampled and split.

  Args:
    examples: task -> the world's examples (provenance = (gold title,)).
    people: the titles whose adapters the library holds (first ones of the world).
    per_task: how many questions per task to draw, seeded, over ``people``; 0 = all.
    split: "all", or "tune" / "test": disjoint halves of each task's draw (the
      even / odd positions of the seeded order), so that settings are chosen on one
      half and reported on the other.
    seed: the draw's seed.
  Returns:
    The examples, task by task, each task's in world order.
  """
  import random

  if split not in ("all", "tune", "test"):
    raise ConfigError(f"config field 'synthetic.split'={split!r}: choose all, tune or test")
  people = set(people)
  out = []
  for task, exs in examples.items():
    idx = [i for i, ex in enumerate(exs) if ex.provenance[0] in people]
    random.Random(f"lag_jax.sample:{seed}:{task}").shuffle(idx)
    if per_task:
      idx = idx[:per_task]
    if split != "all":
      idx = idx[split == "test" :: 2]
    out += [exs[i] for i in sorted(idx)]
  return out


def _synthetic(config, root):
  c = config.synthetic
  domain = c.get("domain", "people")
  world = _make_world(domain, c.num_entities, c.seed, c.questions_per_entity)
  recipe, generator = knowledge_recipe(config, benchmark_has_generator=domain == "people")
  # The library: the world's first build_entities people (0 = all of them), e.g. a
  # 16-person sample of the 1,000-person world to choose a training recipe on.
  docs = world.knowledge()
  n_build = c.get("build_entities", 0) or len(docs)
  if not 1 <= n_build <= len(docs):
    raise ConfigError(
      f"config field 'synthetic.build_entities'={n_build}: must lie in [1, {len(docs)}]"
    )
  docs = docs[:n_build]
  extra = None
  if generator:
    extra = {d.title: world.rewrites(d.title) + world.qa_restatements(d.title) for d in docs}
  knowledge_jobs = (recipe, docs, extra)
  # Questions on the people of the evaluated library (its first library_size people).
  n_lib = c.get("library_size", 0) or n_build
  if not 1 <= n_lib <= n_build:
    raise ConfigError(
      f"config field 'synthetic.library_size'={n_lib}: must lie in [1, {n_build}] "
      "(the adapters built: synthetic.build_entities, or the world's num_entities)"
    )
  examples = sample_questions(
    {task: world.tasks[task] for task in c.tasks},
    [d.title for d in docs[:n_lib]],
    c.get("questions_per_task", 0),
    c.get("split", "all"),
    c.seed,
  )
  # Task adapters learn each task's format on another world's entities, so that they
  # cannot carry the evaluation facts.
  other = _make_world(domain, c.task_entities, c.seed + 1000)
  task_data = {task: other.tasks[task] for task in c.tasks}
  documents = docs[:n_lib]  # what retrieval searches: the evaluated library's pages
  return (
    knowledge_jobs,
    examples,
    task_data,
    documents,
    {t: harness.FAMILY_OF_TASK[t] for t in c.tasks},
  )


def _fanoutqa(config, root):
  from lag_jax.data.fanoutqa import build_fanoutqa

  c = config.fanoutqa
  bench = build_fanoutqa(
    c.library_size or None,
    num_evidence_pages=c.num_evidence_pages or None,
    answerable_only=c.answerable_only,
    seed=c.seed,
  )
  logging.info("FanOutQA: %s", bench.stats)
  examples = bench.split(c.split) if c.split != "all" else list(bench.examples)
  if c.max_questions:
    examples = examples[: c.max_questions]
  library = list(bench.documents)
  if c.get("split_pages_only", False):
    # Only the pages this split's questions cite: enough for the oracle, the floor and
    # the in-context ceiling (no routing among distractors), at a fraction of the cost.
    cited = {ex.provenance[0] for ex in examples}
    library = [d for d in library if d.title in cited]
  knowledge_jobs = (knowledge_recipe(config)[0], library, None)
  other = build_fanoutqa(None, seed=c.seed + 1000)  # questions on pages NOT in the library
  library_titles = {d.title for d in bench.documents}
  task_examples = [ex for ex in other.examples if ex.provenance[0] not in library_titles]
  return (
    knowledge_jobs,
    examples,
    {"qa": task_examples[: c.task_examples]},
    library,
    {"qa": "QA"},
  )


def _kilt(config, root):
  """KILT files: the N pages most cited as provenance form the knowledge library.

  With ``kilt.companies`` > 0 and no files given, the files are written first, into
  ``<root>/kilt_files``: a synthetic companies world of that many pages
  (``lag_jax.data.companies``) in KILT's formats, so the path runs end to end.
  """
  import collections

  from lag_jax.data.kilt import KILT_DATASETS, dataset_from_filename, read_kilt, read_kilt_wikipedia

  c = config.kilt
  if c.get("companies", 0) and not c.eval_files:
    from lag_jax.data.companies import make_company_world, write_kilt_files

    n, seed = c.companies, c.get("companies_seed", 0)
    world = make_company_world(n, seed=seed, questions_per_entity=c.get("questions_per_entity", 1))
    files = write_kilt_files(
      world, make_company_world(max(n, 64), seed=seed + 1000), os.path.join(root, "kilt_files")
    )
    c = ml_collections.ConfigDict({**c.to_dict(), **files})
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
  knowledge_jobs = (knowledge_recipe(config)[0], documents, None)
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
  if config.benchmark == "synthetic" and config.synthetic.get("domain", "people") not in DOMAINS:
    raise ConfigError(
      f"config field 'synthetic.domain'={config.synthetic.domain!r}: choose from {DOMAINS}"
    )
  builders = ("synthetic", "fanoutqa", "kilt")
  if config.benchmark not in builders:
    raise ConfigError(f"config field 'benchmark'={config.benchmark!r}: choose from {builders}")
  common.int_list("k_sweep", config.k_sweep)
  if config.get("extra_methods", ""):
    for name in common.split_list(config.extra_methods):
      try:
        harness.method_from_name(name, config.k)
      except ValueError as e:
        raise ConfigError(f"config field 'extra_methods': {e}") from None
  if config.methods:
    harness.select_methods(
      harness.standard_methods(config.k),
      common.split_list(config.methods),
      config.k,
      config.retrieval,
    )
  _train_config(config.knowledge_training)
  _train_config(config.task_training)
  knowledge_recipe(
    config,
    benchmark_has_generator=config.benchmark == "synthetic"
    and config.synthetic.get("domain", "people") == "people",
  )


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
  root = config.library_root or workdir
  (recipe, knowledge_docs, extra), examples, task_data, documents, families = builders[
    config.benchmark
  ](config, root)
  avg_families = common.split_list(config.get("avg_families", ""))
  if bad := sorted(set(avg_families) - set(families.values())):
    raise ConfigError(
      f"config field 'avg_families': {bad} are not among this benchmark's families "
      f"{sorted(set(families.values()))}"
    )
  sketch_calibration = config.get("sketch_calibration", "")
  sketch_ridge = float(config.get("sketch_ridge", arrow_sketch.RIDGE))
  if not sketch_ridge > 0:
    raise ConfigError(f"config field 'sketch_ridge'={sketch_ridge!r}: must be > 0")
  if sketch_calibration not in ("", "generic"):
    raise ConfigError(
      f"config field 'sketch_calibration'={sketch_calibration!r}: choose '' or 'generic'"
    )
  methods = harness.standard_methods(config.k, with_spectr=len(documents) <= config.spectr_max_n)
  methods = [m for m in methods if config.retrieval or not m.needs_retrieval]
  # methods: exactly these (standard names, and request-level ones: harness.BEYOND);
  # else the standard ones plus extra_methods.
  also = common.split_list(config.get("extra_methods", ""))
  if config.methods or also:
    wanted = common.split_list(config.methods) or [m.name for m in methods] + also
    methods = harness.select_methods(methods, wanted, config.k, config.retrieval)
  folder = common.resolve_checkpoint(config.checkpoint)
  model = load_model(folder)
  tokenizer = Tokenizer.from_dir(folder)

  t0 = time.perf_counter()
  knowledge_jobs, data_report = knowledge_jobs_of(
    knowledge_docs,
    recipe,
    model=model,
    tokenizer=tokenizer,
    cache_dir=os.path.join(root, "knowledge_data"),
    extra_texts=extra,
  )
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
  n_lib = config.synthetic.get("library_size", 0) if config.benchmark == "synthetic" else 0
  if n_lib:  # nested libraries: the first N adapters of the one build
    if n_lib > len(knowledge):
      raise ConfigError(
        f"config field 'synthetic.library_size'={n_lib}: the library holds {len(knowledge)}"
      )
    knowledge = knowledge.subset(range(n_lib))
  # Methods with their own removal (e.g. Vote-score(k=4;removal=top:4)) route a copy.
  knowledge_removed = {
    m.removal: remove_shared(knowledge, m.removal)[0]
    for m in methods
    if m.removal and m.removal != config.shared_removal
  }
  knowledge, shared = remove_shared(knowledge, config.shared_removal)
  knowledge_removed[config.shared_removal] = knowledge
  probes = [dict(m.knowledge_options).get("index_probe") or 0 for m in methods]
  # LAG+sketch methods: the dimensions of the arrow sketch they read.
  sketch_dims = {
    dict(m.knowledge_options).get("index_sketch") or 0
    for m in methods
    if dict(m.knowledge_options).get("index_probe")
  }
  if len(sketch_dims) > 1:
    raise ValueError(
      "config field 'methods': the methods through an arrow index ask for "
      + ", ".join("the clustered index" if d == 0 else f"a sketch of {d}" for d in sketch_dims)
      + "; a run holds one (run them in separate workdirs)"
    )
  if max(probes, default=0):
    # LAG+index methods scan the arrow index (its clusters sized for the largest probe
    # asked for), LAG+sketch ones the arrow sketch; exact methods never read either.
    t_index = time.perf_counter()
    (dims,) = sketch_dims
    moments = None
    if dims and sketch_calibration:
      from lag_jax.routing.calibration import generic_moments

      moments = generic_moments(model, tokenizer, knowledge.modules)
    knowledge_removed = {
      k: v.with_sketch(dims, moments=moments, ridge=sketch_ridge)
      if dims
      else v.with_index(probe=max(probes))
      for k, v in knowledge_removed.items()
    }
    knowledge = knowledge_removed[config.shared_removal]
    logging.info("Arrow index built in %.1fs", time.perf_counter() - t_index)
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
  if config.get("build_only", False):
    report = {
      "build_only": True,
      "num_knowledge_adapters": len(knowledge),
      "num_task_adapters": 0 if task_lib is None else len(task_lib),
      "build_seconds": t_build,
      "knowledge_data": dataclasses.asdict(data_report),
    }
    write_json_atomic(os.path.join(workdir, "build.json"), report)
    logging.info("Built the libraries in %.0f s (build_only: no evaluation)", t_build)
    return report

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
    knowledge_removed=knowledge_removed,
  )
  # Each finished method is kept in the workdir (eval/method_runs.py): a rerun of an
  # interrupted evaluation resumes where it stopped.
  reuse = config.get("reuse_method_runs", True)
  run_context = {
    "checkpoint": config.checkpoint,
    "knowledge": list(knowledge.names),
    "task": list(task_lib.names) if task_lib else None,
    "knowledge_training": config.knowledge_training.to_dict(),
    "task_training": config.task_training.to_dict() if config.use_task_library else None,
    "recipe": repr(recipe),
    "shared_removal": config.shared_removal,
    "index_probe": max(probes, default=0),
    "index_sketch": max(sketch_dims, default=0),
    "gold": gold,
    "task_ids": task_ids,
    "retrieved": retrieved,
    "max_new_tokens": config.max_new_tokens,
    "batch_size": config.batch_size,
    "rag_max_chars": config.rag_max_chars,
  }

  if max(sketch_dims, default=0) and sketch_calibration:
    # Only when calibrated: the plain sketch's runs keep the keys they had before.
    run_context["sketch_calibration"] = sketch_calibration
    # The first calibrated runs (ridge 10^-3) were keyed without the ridge: they stay so.
    if sketch_ridge != 1e-3:
      run_context["sketch_ridge"] = sketch_ridge

  kept_runs = {}  # method -> its key (method_runs/<key>.json), and whether it was reused

  def run_method(m):
    context = run_context
    if not dict(m.knowledge_options).get("index_probe"):
      # The index settings shape only the methods that read the index: an exact
      # method's run is the same in runs that differ in them, and is reused across.
      index_keys = ("index_probe", "index_sketch", "sketch_calibration", "sketch_ridge")
      context = {k: v for k, v in run_context.items() if k not in index_keys}
    key = method_runs.run_key(m, examples, context)
    r = method_runs.load(workdir, key, m.name) if reuse else None
    kept_runs[m.name] = {"key": key, "reused": r is not None}
    if r is None:
      r = harness.run_method(setting, m, examples, gold, task_ids, retrieved)
      method_runs.save(workdir, key, r)
    return r

  results = []
  for i, m in enumerate(methods):
    results.append(run_method(m))
    logging.info("method %d of %d done: %s", i + 1, len(methods), m.name)
  sweep = []
  for k in common.int_list("k_sweep", config.k_sweep):
    m = harness.Method(f"LAG(k={k})", "lag", "lag", k=k)
    # LAG with k = 1 is hard Arrow and with k >= N is SpectR, selection for selection
    # (tests/test_routing.py): reuse those runs instead of generating again.
    same = "Arrow" if k == 1 else "SpectR" if k >= len(knowledge) else m.name
    r = next((r for r in results if r.method in (m.name, same)), None)
    if r is None:
      r = run_method(m)
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
  fams = {harness.dataset_of(ex): families[ex.task] for ex in examples}
  per_question = {
    r.method: {
      d: [
        s[harness.PRIMARY_METRIC[f]]
        for ex, s in zip(examples, r.scores)
        if harness.dataset_of(ex) == d
      ]
      for d, f in fams.items()
    }
    for r in results
  }
  report = {
    "benchmark": config.benchmark,
    "num_examples": len(examples),
    "num_knowledge_adapters": len(knowledge),
    "shared_removal": config.shared_removal,
    "num_task_adapters": 0 if task_lib is None else len(task_lib),
    "build_seconds": t_build,
    "knowledge_data": {
      "steps": list(recipe.steps) + ([GENERATOR_STEP] if extra else []),
      **dataclasses.asdict(data_report),
    },
    "total_seconds": time.perf_counter() - t_start,
    # Methods read back from an earlier, interrupted run of the same evaluation.
    "method_runs": kept_runs,
    "methods": table,
    "k_sweep": {str(k): sweep_table.get(r.method) for k, r in sweep},
    "knowledge_injection": injection.knowledge_injection(per_question),
    "predictions": {
      r.method: [
        {"id": ex.id, "input": ex.input, "answers": list(ex.answers), "prediction": p, **s}
        for ex, p, s in zip(examples, r.predictions, r.scores, strict=True)
      ]
      for r in results
    },
  }
  if avg_families:  # checked above
    report["avg_families"] = avg_families
  if "sketch_calibration" in run_context:  # LAG+sketch methods read a calibrated sketch
    report["sketch_calibration"] = run_context["sketch_calibration"]
  markdown = report_lib.results_markdown(report)
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
