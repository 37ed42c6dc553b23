"""The ``routing_scale`` job: how routing accuracy falls as the library grows.

Builds (or reuses) one knowledge adapter per person of a synthetic world, then for
nested libraries of the first N people (``sizes``) runs each router over requests
about those N people and counts how often it routes to the request's own person:
per decision on the entity's tokens, and per request (the adapter a vote applies;
for per-token routers, the majority of their decisions over the question). Each
router also runs on the library with shared directions removed (``shared_removal``,
``lag_jax.routing.shared``) where listed in ``shared_routers``. Prefill and one
generated token per request: the routing is measured, not the answers.

Writes scale.json, scale.md, scale.png (accuracy against N) and scale_k.png (against k,
where a k sweep ran) in the workdir; with ``analysis_sizes`` the vote taken apart
(analysis.*), with ``index_sizes`` the arrow index's decisions against exact LAG
(index_effect.*).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.eval import harness, routing_analysis
from lag_jax.jobs import common, evaluate
from lag_jax.jobs.evaluate import _train_config
from lag_jax.routing import arrow_sketch, calibration
from lag_jax.routing.library import AdapterLibrary
from lag_jax.routing.shared import parse_mode, remove_shared
from lag_jax.text.tokenizer import Tokenizer, right_pad
from lag_jax.training import build_library
from lag_jax.training.knowledge_data import knowledge_jobs

# Per-token routers by name (the BEYOND ones come from harness.method_from_name).
_PER_TOKEN = {"LAG": "lag", "Arrow": "arrow", "SpectR": "spectr"}


def method(name: str, k: int) -> harness.Method:
  """A knowledge-only method (no task library) for a router name."""
  if name in _PER_TOKEN:
    return harness.Method(name, _PER_TOKEN[name], "none", k=k)
  m = harness.method_from_name(name if "(" in name else f"{name}(k={k})", k)
  if m.needs_retrieval:
    raise ValueError(f"config field 'routers': {name!r} needs retrieval; routing_scale routes only")
  return dataclasses.replace(m, name=name, task="none")


def pick_requests(examples, names: list[str], limit: int, seed: int, split=None):
  """Up to ``limit`` examples about the people ``names``, spread evenly over them
  (seeded), in a fixed order. ``split``: None (any question) or (questions_per_task,
  'tune' | 'test'): only the questions the evaluate job draws for that half over the
  same people (jobs/evaluate.py ``sample_questions``), so that routers chosen here are
  chosen on the tuning half alone."""
  if split is not None:
    from lag_jax.jobs.evaluate import sample_questions

    by_task: dict = {}
    for ex in examples:
      by_task.setdefault(ex.task, []).append(ex)
    examples = sample_questions(by_task, names, split[0], split[1], seed)
  wanted = set(names)
  pool = [ex for ex in examples if ex.provenance[0] in wanted]
  if limit and len(pool) > limit:
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(pool), limit, replace=False))
    pool = [pool[i] for i in keep]
  return pool


def _split(config):
  """(questions_per_task, half) when requests come from one half of the evaluate job's
  draw (config ``synthetic.split`` 'tune' / 'test'; ``sample_questions`` rejects any
  other value), else None."""
  split = config.synthetic.get("split", "all")
  return None if split == "all" else (config.synthetic.get("questions_per_task", 0), split)


def _routing_setting(model, tokenizer, library, batch_size: int) -> harness.Setting:
  """The knowledge library alone, prefill and one generated token: routing is measured."""
  return harness.Setting(
    model=model,
    tokenizer=tokenizer,
    knowledge=library,
    task=None,
    documents=[],
    max_new_tokens=1,
    batch_size=batch_size,
  )


def _analyse(config, world, full, examples, model, tokenizer, workdir) -> dict:
  """The vote taken apart (lag_jax/eval/routing_analysis.py) at ``analysis_sizes``:
  per-token choices of ``analysis_router`` over the same requests as the table,
  with ``analysis_removal``; writes analysis.json, analysis.md and analysis_<N>.png."""
  sizes = [int(v) for v in common.split_list(config.get("analysis_sizes", ""))]
  if not sizes:
    return {}
  spec = config.get("analysis_removal", "none")
  name = config.get("analysis_router", "LAG")
  out, md = {}, []
  attributes = {
    p.title: {
      "first name": p.first_name,
      "birthplace": p.birthplace,
      "employer": p.employer,
      "occupation": p.occupation,
      "instrument": p.instrument,
    }
    for p in world.people
  }
  for n in sizes:
    if not 2 <= n <= len(full):
      raise ValueError(f"config field 'analysis_sizes': {n} is not in [2, {len(full)}]")
    lib = full.subset(range(n))
    if spec != "none":
      lib = remove_shared(lib, spec)[0]
    reqs = pick_requests(
      examples, list(lib.names), config.max_requests, config.synthetic.seed, _split(config)
    )
    gold = [lib.names.index(ex.provenance[0]) for ex in reqs]
    setting = _routing_setting(model, tokenizer, lib, config.batch_size)
    r = harness.run_method(setting, method(name, config.k), reqs, gold, None, None, True)
    a = routing_analysis.analyse(r.routing_ids, gold, list(lib.names), attributes)
    out[n] = a
    title = f"{name} (k={config.k}) choices, N = {n}, removal {spec}"
    md.append(routing_analysis.markdown(a, title))
    routing_analysis.plot(a, os.path.join(workdir, f"analysis_{n}.png"), title)
    logging.info("analysis N=%d: vote %.3f, gold rank %s", n, a["vote_acc"], a["gold_rank"])
  common.write_json_atomic(
    os.path.join(workdir, "analysis.json"),
    {"router": name, "k": config.k, "removal": spec, "sizes": out},
  )
  tmp = os.path.join(workdir, ".analysis.md.tmp")
  with open(tmp, "w") as f:
    f.write("\n".join(md))
  os.replace(tmp, os.path.join(workdir, "analysis.md"))
  return out


def decision_agreement(exact: list[dict], other: list[dict]) -> dict:
  """The share of per-token decisions two routers make alike over the same requests
  (``run_method(..., keep_routing=True).routing_ids``: per request, token types [T] and
  module -> chosen ids [L, T]): every prompt token, layer and module; entity tokens
  only; and per module (every token)."""
  same = collections.Counter()
  total = collections.Counter()
  for a, b in zip(exact, other, strict=True):
    entity = np.asarray(a["types"]) == routing_analysis.ENTITY
    for m, ids in a["ids"].items():
      eq = np.asarray(ids) == np.asarray(b["ids"][m])  # [L, T]
      for key, sel in (("all", slice(None)), ("entity", entity), (m, slice(None))):
        same[key] += int(eq[:, sel].sum())
        total[key] += int(eq[:, sel].size)
  return {key: same[key] / max(total[key], 1) for key in total}


@functools.partial(jax.jit, static_argnames="k")
def _exact_top(x, arrows, k: int):
  """The exact Arrow filter's top-k ids: x [M, I], arrows [I, N] -> [M, k]."""
  return jax.lax.top_k(jnp.abs(x @ arrows.astype(x.dtype)), k)[1]


def index_recall(
  model, tokenizer, lib, reqs, probes, k: int, batch_size: int, sketches=None
) -> dict:
  """Top-k recall of the arrow index against the exact scan on the same module inputs
  (the base model's, over the requests' prompts: no decision feeds the next layer), per
  probe: the mean share of each token's exact top-k the index finds, the share of
  tokens whose top-1 it finds, and the recall per layer (mean over modules). The same
  for each of ``sketches``: label -> (module -> stacked ArrowSketch of this library's
  arrows, pool) (routing/arrow_sketch.py)."""
  from lag_jax.eval.prompts import render_prompt
  from lag_jax.routing import arrow_index, arrow_sketch

  graphdef, state = nnx.split(model)
  modules = lib.modules
  L = model.config.num_hidden_layers
  hook = calibration.recorder(model, modules)
  n = len(lib)
  k = min(k, n)
  # One compiled search per probe and batch shape (the search's loops would otherwise
  # be traced again at every call).
  search = jax.jit(arrow_index.search, static_argnames=("k", "probe", "method"))
  sketch_search = jax.jit(arrow_sketch.search, static_argnames=("k", "pool"))
  sketches = sketches or {}
  keys = [*probes, *sketches]
  found = {p: np.zeros(L) for p in keys}
  first = {p: 0 for p in keys}
  tokens_seen = 0
  t0 = time.perf_counter()
  for start in range(0, len(reqs), batch_size):
    ids = [
      tokenizer.backend.encode(render_prompt(tokenizer, ex)[0], add_special_tokens=False).ids
      for ex in reqs[start : start + batch_size]
    ]
    batch, real = right_pad(ids)
    aux = calibration.module_inputs(graphdef, state, jnp.asarray(batch), hook)
    tokens_seen += int(real.sum())
    for m in modules:
      xs = np.asarray(aux[m][0])  # [L, B, T, I]
      rows = xs[:, real]  # [L, M, I] the prompts' real tokens
      M = rows.shape[1]
      # Padded to a multiple of 128 tokens: the compiled searches are reused across
      # batches instead of traced again for every batch's token count (padding rows
      # are zeros, searched and dropped).
      rows = np.pad(rows, ((0, 0), (0, -M % 128), (0, 0)))
      for layer in range(L):
        x = jnp.asarray(rows[layer][None])  # [1, M', I]
        exact = np.asarray(_exact_top(x[0, :M], lib.weights.arrows[m][layer], k))  # [M, k]
        index = jax.tree.map(lambda v, layer=layer: v[layer], lib.weights.index[m])
        allowed = jnp.ones((1, n), bool)
        got = {p: search(index, x, allowed, k=k, probe=p)[1][0] for p in probes}
        for label, (stacked, pool) in sketches.items():
          sk = jax.tree.map(lambda v, layer=layer: v[layer], stacked[m])
          arrows = lib.weights.arrows[m][layer]
          got[label] = sketch_search(sk, arrows, x, allowed, k=k, pool=pool)[1][0]
        for p, ids_p in got.items():
          ids_p = np.asarray(ids_p)[:M]
          hit = (exact[:, :, None] == ids_p[:, None, :]).any(-1)  # [M, k]
          found[p][layer] += hit.sum() / k
          first[p] += int(hit[:, 0].sum())
    done = min(start + batch_size, len(reqs))
    logging.info(
      "index recall: %d of %d requests, %d tokens (%.1f tokens/s; %d filters each)",
      done,
      len(reqs),
      tokens_seen,
      tokens_seen / (time.perf_counter() - t0),
      len(keys),
    )
  per = tokens_seen * len(modules)
  return {
    p: {
      "recall": float(found[p].sum() / (per * L)),
      "top1": first[p] / (per * L),
      "recall_by_layer": [round(float(v / per), 4) for v in found[p]],
    }
    for p in keys
  }


def _sketch_specs(config) -> list[tuple[int, int, bool]]:
  """index_sketches as (dims, pool, calibrated): LAG+sketch (routing/arrow_sketch.py)
  beside the index; DIMS:POOL:cal is the sketch calibrated on generic prompts
  (routing/calibration.py). Raises ValueError naming the field."""
  sketches = []
  for spec in common.split_list(config.get("index_sketches", "")):
    parts = spec.split(":")
    ok = len(parts) in (2, 3) and all(v.isdigit() and int(v) >= 1 for v in parts[:2])
    if not ok or parts[2:] not in ([], ["cal"]):
      raise ValueError(f"config field 'index_sketches': {spec!r} is not DIMS:POOL[:cal]")
    sketches.append((int(parts[0]), int(parts[1]), len(parts) == 3))
  k = config.get("index_k", 20)
  if any(pool < k for _, pool, _ in sketches):
    raise ValueError(f"config field 'index_sketches': every pool must be >= index_k ({k})")
  ridge = config.get("sketch_ridge", arrow_sketch.RIDGE)
  if not (isinstance(ridge, (int, float)) and ridge > 0):
    raise ValueError(f"config field 'sketch_ridge'={ridge!r}: must be > 0")
  return sketches


def _index_effect(config, full, examples, model, tokenizer, workdir) -> dict:
  """The arrow index on this library's arrows and the requests' real module inputs
  (lag_jax/routing/arrow_index.py): top-k recall against the exact scan on the same
  inputs (``index_recall``); then LAG at ``index_k`` with the exact Arrow filter, and
  through the index at each of ``index_probes`` with ``index_prefill`` (the prompt's
  tokens probe too, so that there are many decisions to compare), over the same
  requests. Reports the share of decisions that agree with exact LAG (every prompt
  token, layer and module: differences compound over the layers, as in use) and each
  one's routing accuracy. The clusters are sized for the largest probe, as the
  evaluate job's. Writes index_effect.json and index_effect.md."""
  sizes = common.int_list("index_sizes", config.get("index_sizes", ""))
  probes = common.int_list("index_probes", config.get("index_probes", ""))
  sketches = _sketch_specs(config)
  decisions = config.get("index_decisions", True)
  k = config.get("index_k", 20)
  if not sizes or not probes:
    return {}
  out, lines = {}, []
  moments = None  # the calibrated sketches' input moments, computed once
  for n in sizes:
    if not 2 <= n <= len(full):
      raise ValueError(f"config field 'index_sizes': {n} is not in [2, {len(full)}]")
    # One subset for the index and every sketch (a subset of fewer than all copies the
    # factors; at N = 1,000 a copy per sketch ran a 24 GB machine out of memory).
    base = full.subset(range(n))
    t0 = time.perf_counter()
    lib = base.with_index(probe=max(probes))
    t_index = time.perf_counter() - t0
    J, W = next(iter(lib.weights.index.values())).members.shape[-2:]
    reqs = pick_requests(
      examples, list(lib.names), config.max_requests, config.synthetic.seed, _split(config)
    )
    gold = [lib.names.index(ex.provenance[0]) for ex in reqs]
    setting = _routing_setting(model, tokenizer, lib, config.batch_size)

    def row(r):
      req = r.request_routing
      return {
        "request_acc": req["correct"] / max(req["total"], 1),
        "entity_token_acc": harness.routing_accuracy(r.routing, "entity")[0],
        "seconds": r.seconds,
      }

    # Each Z's sketch once (plain or calibrated), for the recall and for the decisions
    # at every pool; the calibration's moments once for the run.
    if any(cal for *_, cal in sketches) and moments is None:
      moments = calibration.generic_moments(model, tokenizer, full.modules)
    sketched = {
      (d, cal): _routing_setting(
        model,
        tokenizer,
        base.with_sketch(d, moments=moments if cal else None, ridge=config.get("sketch_ridge")),
        config.batch_size,
      )
      for d, _, cal in sketches
    }
    label = {s: f"sketch {s[0]}:{s[1]}" + (" cal" if s[2] else "") for s in sketches}
    recall = index_recall(
      model,
      tokenizer,
      lib,
      reqs,
      probes,
      k,
      config.batch_size,
      sketches={label[s]: (sketched[s[0], s[2]].knowledge.weights.index, s[1]) for s in sketches},
    )
    I = {m: lib.weights.arrows[m].shape[-2] for m in lib.modules}
    read = {
      s: round(
        float(np.mean([arrow_sketch.numbers_read(n, i, s[0], s[1]) for i in I.values()])) * n
      )
      for s in sketches
    }
    if not decisions:  # recall only: no LAG run through any filter
      rows = {"exact": {"arrows_read": n, "recall": 1.0, "top1": 1.0}}
      rows.update({f"probe {p}": {"arrows_read": J + min(p, J) * W, **recall[p]} for p in probes})
      rows.update({label[s]: {"arrows_read": read[s], **recall[label[s]]} for s in sketches})
      probes_run, sketches_run = [], []
    else:
      exact = harness.run_method(setting, method("LAG", k), reqs, gold, None, None, True)
      rows = {"exact": {**row(exact), "arrows_read": n, "recall": 1.0, "top1": 1.0}}
      probes_run, sketches_run = probes, sketches
    for p in probes_run:
      name = f"LAG+index(k={k};probe={p};index_prefill=1)"
      r = harness.run_method(setting, method(name, k), reqs, gold, None, None, True)
      agree = decision_agreement(exact.routing_ids, r.routing_ids)
      rows[f"probe {p}"] = {
        **row(r),
        "arrows_read": J + min(p, J) * W,
        "agreement": agree,
        **recall[p],
      }
      logging.info(
        "index N=%d probe %d: %.4f of decisions agree with exact LAG (entity tokens %.4f)",
        n,
        p,
        agree["all"],
        agree["entity"],
      )
    for s in sketches_run:
      d, pool, _ = s
      name = f"LAG+sketch(k={k};pool={pool};sketch={d};index_prefill=1)"
      r = harness.run_method(sketched[d, s[2]], method(name, k), reqs, gold, None, None, True)
      agree = decision_agreement(exact.routing_ids, r.routing_ids)
      rows[label[s]] = {**row(r), "arrows_read": read[s], "agreement": agree, **recall[label[s]]}
      logging.info("%s N=%d: %.4f of decisions agree with exact LAG", label[s], n, agree["all"])
    out[n] = {"clusters": J, "width": W, "index_seconds": t_index, "requests": len(reqs)}
    out[n]["rows"] = rows
    lines += [
      f"N = {n}, k = {k}, {len(reqs)} requests, J = {J} clusters of <= {W} arrows "
      f"(built in {t_index:.1f} s)",
      "",
      "| Arrow filter | arrows read per token | top-k recall | top-1 found "
      "| decisions = exact LAG | entity tokens = exact | request acc. | entity-token acc. |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
      head = f"| {name} | {r['arrows_read']} | {100 * r['recall']:.1f}% | {100 * r['top1']:.1f}% "
      if "request_acc" not in r:  # recall only (index_decisions False)
        lines.append(head + "| - | - | - | - |")
        continue
      agree = r.get("agreement", {"all": 1.0, "entity": 1.0})
      lines.append(
        head + f"| {100 * agree['all']:.2f}% | "
        f"{100 * agree['entity']:.2f}% | {100 * r['request_acc']:.1f} | "
        f"{100 * r['entity_token_acc']:.1f} |"
      )
    if sketches:
      lines += [
        "",
        "Sketch Z:P (routing/arrow_sketch.py): the arrows' Z leading directions scanned for "
        "all N, a pool of P rescored exactly; its reads are numbers read / I (arrow "
        "equivalents, mean over modules); 'cal': calibrated on generic prompts "
        "(routing/calibration.py).",
      ]
    lines.append("")
  ridge = config.get("sketch_ridge", arrow_sketch.RIDGE)
  common.write_json_atomic(
    os.path.join(workdir, "index_effect.json"), {"k": k, "sketch_ridge": ridge, "sizes": out}
  )
  tmp = os.path.join(workdir, ".index_effect.md.tmp")
  with open(tmp, "w") as f:
    f.write("\n".join(lines))
  os.replace(tmp, os.path.join(workdir, "index_effect.md"))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if jax.process_count() > 1:
    raise ValueError("the routing_scale job runs in a single process (drop --distributed)")
  from lag_jax.data.synthetic import make_world

  t_start = time.perf_counter()
  folder = common.resolve_checkpoint(config.checkpoint)
  model = load_model(folder)
  tokenizer = Tokenizer.from_dir(folder)
  c = config.synthetic
  world = make_world(c.num_entities, seed=c.seed)
  root = config.library_root or workdir
  recipe, generator = evaluate.knowledge_recipe(config, benchmark_has_generator=True)
  jobs = []
  if config.build:
    extra = {t: world.rewrites(t) + world.qa_restatements(t) for t in world.documents}
    jobs, _ = knowledge_jobs(
      world.knowledge(),
      recipe,
      model=model,
      tokenizer=tokenizer,
      cache_dir=os.path.join(root, "knowledge_data"),
      extra_texts=extra if generator else None,
    )
  doc_eos = "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else None
  t0 = time.perf_counter()
  if config.build:
    full = build_library(
      jobs,
      model,
      tokenizer,
      os.path.join(root, "knowledge"),
      _train_config(config.knowledge_training),
      eos_token=doc_eos,
    )
  else:
    # The library as it stands (e.g. while a build is still running elsewhere): the
    # world's first people, in order, for as many as it holds.
    full = AdapterLibrary.load(os.path.join(root, "knowledge", "library"))
    expected = list(world.documents)[: len(full)]
    if list(full.names) != expected:
      raise ValueError(
        f"{root}/knowledge/library does not hold the first {len(full)} people of this "
        "world in order (another world, seed or order)"
      )
  t_build = time.perf_counter() - t0

  sizes = sorted({int(v) for v in common.split_list(config.sizes)})
  if not sizes or sizes[0] < 2 or sizes[-1] > len(full):
    raise ValueError(
      f"config field 'sizes'={config.sizes!r}: sizes must lie in [2, {len(full)}] "
      "(the world's people)"
    )
  routers = common.split_list(config.routers)
  shared_specs = [s for s in common.split_list(config.shared_removal) if parse_mode(s)[0] != "none"]
  shared_routers = common.split_list(config.shared_routers)
  unknown = sorted(set(shared_routers) - set(routers))
  if unknown:
    raise ValueError(f"config field 'shared_routers': {unknown} are not in 'routers'")
  for name in routers:
    method(name, config.k)  # checks every name before any run
  _sketch_specs(config)
  examples = [ex for task in c.tasks for ex in world.tasks[task]]

  sweep_ks = [int(v) for v in common.split_list(config.k_sweep)]
  sweep_routers = common.split_list(config.k_sweep_routers)
  sweep_sizes = {int(v) for v in common.split_list(config.k_sweep_sizes)}
  for name in sweep_routers:
    method(name, 1)
  # Sizes measured before with the same settings (scale.json in the workdir) are kept,
  # so a run can add the largest size once its library is complete.
  rows: dict[str, dict] = {}
  removed: dict[str, dict] = {}  # spec -> N -> module -> mean leading eigenvalue
  settings = {
    "k": config.k,
    "max_requests": config.max_requests,
    "seed": c.seed,
    "training": dict(config.knowledge_training),
  }
  previous = os.path.join(workdir, "scale.json")
  if os.path.exists(previous):
    with open(previous) as f:
      old = json.load(f)
    if old.get("settings") == settings:
      rows = old["routers"]
      removed = old.get("shared_leading_eigenvalue", {})
      logging.info("Keeping %d measured rows from %s", len(rows), previous)

  def save(**extra):
    measured = sorted({int(n) for row in rows.values() for n in row})
    report = {
      "num_entities": len(full),
      "sizes": measured,
      "settings": settings,
      "k": config.k,
      "training": dict(config.knowledge_training),
      "build_seconds": t_build,
      "total_seconds": time.perf_counter() - t_start,
      "shared_leading_eigenvalue": removed,
      "routers": rows,
      **extra,
    }
    common.write_json_atomic(os.path.join(workdir, "scale.json"), report)
    return report

  for n in sizes:
    lib = full.subset(range(n))
    reqs = pick_requests(examples, list(lib.names), config.max_requests, c.seed, _split(config))
    gold = [lib.names.index(ex.provenance[0]) for ex in reqs]
    runs = [(name, config.k, name) for name in routers]
    if n in sweep_sizes:
      runs += [(name, k, f"{name} (k={k})") for name in sweep_routers for k in sweep_ks]
    for spec in ["none", *shared_specs]:
      todo = []
      for name, k, base_label in runs:
        if spec != "none" and (name not in shared_routers or k != config.k):
          continue
        if name == "SpectR" and n > config.spectr_max_n:
          continue
        label = base_label if spec == "none" else f"{base_label} [shared {spec}]"
        if str(n) not in rows.get(label, {}):
          todo.append((name, k, label))
      if not todo:  # measured before: skip the removal too
        continue
      lib_v = lib
      if spec != "none":
        lib_v, shared = remove_shared(lib, spec)
        removed.setdefault(spec, {})[str(n)] = {
          m: float(np.mean(v[:, 0])) for m, v in shared.leading.items()
        }
      setting = _routing_setting(model, tokenizer, lib_v, config.batch_size)
      for name, k, label in todo:
        r = harness.run_method(setting, method(name, k), reqs, gold, None, None)
        entity_acc, by_layer = harness.routing_accuracy(r.routing, "entity")
        req = r.request_routing
        rows.setdefault(label, {})[str(n)] = {
          "requests": len(reqs),
          "request_acc": req["correct"] / max(req["total"], 1),
          "entity_token_acc": entity_acc,
          "entity_token_acc_by_layer": by_layer,
          "seconds": r.seconds,
        }
        logging.info(
          "N=%d %s: request %.3f, entity tokens %.3f (%d requests, %.1fs)",
          n,
          label,
          rows[label][str(n)]["request_acc"],
          entity_acc,
          len(reqs),
          r.seconds,
        )
        save()  # each row as it is measured: a rerun after an interruption keeps it
  # The libraries above are copies (a subset, shared directions removed): free them
  # before the index effect makes its own.
  lib = lib_v = setting = None

  analyses = _analyse(config, world, full, examples, model, tokenizer, workdir)
  index_effect = _index_effect(config, full, examples, model, tokenizer, workdir)

  report = save(analysis_sizes=sorted(analyses), index_sizes=sorted(index_effect))
  markdown = markdown_table(report)
  tmp = os.path.join(workdir, ".scale.md.tmp")
  with open(tmp, "w") as f:
    f.write(markdown)
  os.replace(tmp, os.path.join(workdir, "scale.md"))
  plot(report, os.path.join(workdir, "scale.png"))
  plot_k(report, os.path.join(workdir, "scale_k.png"))
  print(markdown)
  logging.info(
    "routing_scale: %.1fs in all (library build %.1fs)", report["total_seconds"], t_build
  )
  return report


def markdown_table(report: dict) -> str:
  sizes = [str(n) for n in report["sizes"]]
  head = "| Router | " + " | ".join(f"N={n} request" for n in sizes)
  head += " | " + " | ".join(f"N={n} entity tokens" for n in sizes) + " |"
  lines = [head, "|---" * (1 + 2 * len(sizes)) + "|"]

  def pct(row, n, key):
    return f"{100 * row[n][key]:.1f}" if n in row else "-"

  for label, row in report["routers"].items():
    cells = [pct(row, n, "request_acc") for n in sizes] + [
      pct(row, n, "entity_token_acc") for n in sizes
    ]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  counts = {
    n: next((r[n]["requests"] for r in report["routers"].values() if n in r), 0) for n in sizes
  }
  lines.append("")
  lines.append(
    "Requests per size: "
    + ", ".join(f"N={n}: {counts[n]}" for n in sizes)
    + f"; k = {report['k']}."
  )
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for label, row in report["routers"].items():
    if " (k=" in label:  # the k sweep runs at one or two sizes: it is in the table
      continue
    ns = [n for n in report["sizes"] if str(n) in row]
    style = "--" if "[shared" in label else "-"
    for ax, key in zip(axes, ("request_acc", "entity_token_acc"), strict=True):
      ax.plot(ns, [100 * row[str(n)][key] for n in ns], style, marker="o", label=label)
  for ax, title in zip(
    axes, ("requests routed to their own adapter", "entity-token decisions"), strict=True
  ):
    ax.set_xscale("log")
    ax.set_xlabel("N (knowledge adapters)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("% gold")
  axes[1].legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def plot_k(report: dict, path: str) -> None:
  """Request and entity-token accuracy against k for each swept router and size."""
  import re

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves: dict[tuple[str, str], dict[int, dict]] = {}
  for label, row in report["routers"].items():
    m = re.fullmatch(r"(.+) \(k=(\d+)\)", label)
    if m is None:
      continue
    for n, cell in row.items():
      curves.setdefault((m.group(1), n), {})[int(m.group(2))] = cell
  if not curves:
    return
  for (name, n), points in curves.items():  # the main run at the configured k
    if n in report["routers"].get(name, {}):
      points.setdefault(report["k"], report["routers"][name][n])
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
  for (name, n), points in sorted(curves.items()):
    ks = sorted(points)
    for ax, key in zip(axes, ("request_acc", "entity_token_acc"), strict=True):
      ax.plot(ks, [100 * points[k][key] for k in ks], marker="o", label=f"{name}, N={n}")
  for ax, title in zip(
    axes, ("requests routed to their own adapter", "entity-token decisions"), strict=True
  ):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (Arrow-filter candidates)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("% gold")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
