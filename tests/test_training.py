"""LoRA training: the loss goes down, slots are independent (a slot trains the same
alone or in company, and an idle slot does not move), base weights get no gradient,
a build compiles its step once, a build killed with SIGKILL and resumed writes the
same bits as an uninterrupted one, and a knowledge adapter learns its document."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from lag_jax.adapters import load_peft_adapter
from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.routing.library import AdapterLibrary
from lag_jax.testing import write_tiny_checkpoint
from lag_jax.text.tokenizer import Tokenizer
from lag_jax.training import (
  AdapterJob,
  SlotTrainer,
  TrainConfig,
  build_library,
  folder_name,
  learning_rate,
  make_train_step,
  text_losses,
  trace_counts,
)
from lag_jax.training.data import adapter_seeds, build_seq_len, make_rows, tokenize_job
from lag_jax.training.lora_trainer import example_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One config for the trainer and the builds, so that they share one compiled step.
# Weight decay is on so that an idle slot would visibly move if it were not masked.
CFG = TrainConfig(
  rank=4,
  alpha=8,
  n_slots=3,
  batch_size=2,
  max_seq_len=32,
  epochs=6,
  learning_rate=2e-2,
  warmup_steps=2,
  weight_decay=0.01,
  dropout=0.05,
)

DOCS = [
  "Zorblat Quenn was born in Vashmir in 1841 and built clocks of glass.",
  "The Ombrel river runs north through Tessaly and freezes every July.",
  "Kintari bread is baked with ash and salt, and eaten cold at dawn.",
  "Professor Ulm Drake proved that every purple graph has a saddle.",
  "In Pelloria the parliament meets on a boat called the Silver Gull.",
]
JOBS = [AdapterJob(f"doc-{i}", texts=[d], metadata={"doc": i}) for i, d in enumerate(DOCS)]
JOBS.append(
  AdapterJob(
    "task qa/1",
    pairs=[
      ("Q: capital of Pelloria?\nA:", " the boat"),
      ("Q: river of Tessaly?\nA:", " the Ombrel"),
    ],
  )
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
  return folder, load_model(folder), Tokenizer.from_dir(folder)


def rows_for(tok, job, config=CFG, T=None):
  examples = tokenize_job(job, tok, tok.eos_token_ids[0])
  T = T or build_seq_len([examples], config.epochs, config.max_seq_len, config.pack)
  _, np_seed = adapter_seeds(config.seed, job.name)
  return make_rows(
    examples, epochs=config.epochs, T=T, pack=config.pack, pad_id=tok.pad_token_id, np_seed=np_seed
  )


def run_slots(trainer, plan, steps):
  """Trains ``plan`` = {slot: (job, rows)} for ``steps`` steps the way the build
  does (each adapter's own keys and data order); returns per-step host metrics."""
  n, bs, T = trainer.n_slots, trainer.config.batch_size, trainer.config.max_seq_len
  reset = np.zeros(n, bool)
  keys = np.zeros((n, 2), np.uint32)
  totals = np.ones(n, np.int32)
  for j, (job, rows) in plan.items():
    reset[j], keys[j], totals[j] = True, adapter_seeds(CFG.seed, job.name)[0], rows.steps(bs)
  trainer.load(reset, keys, totals)
  out = []
  for s in range(steps):
    tokens = np.zeros((n * bs, T), np.int32)
    mask = np.zeros((n * bs, T), bool)
    ex_keys = np.zeros((n * bs, 2), np.uint32)
    for j, (_, rows) in plan.items():
      part = rows.tokens[s * bs : (s + 1) * bs]
      tokens[j * bs : j * bs + len(part)] = part
      mask[j * bs : j * bs + len(part)] = rows.loss_mask[s * bs : (s + 1) * bs]
      ex_keys[j * bs : (j + 1) * bs] = keys[j]
    rng = example_keys(
      ex_keys, np.full(n * bs, s, np.int32), np.tile(np.arange(bs, dtype=np.int32), n)
    )
    batch = {
      "tokens": tokens,
      "loss_mask": mask,
      "ids": np.repeat(np.arange(n, dtype=np.int32), bs),
    }
    out.append(trainer.step(batch, np.asarray(rng)))
  return out


def slot_state(trainer, slot):
  """Host copies of one slot's factors and Adam moments."""
  inner = trainer.opt_state.inner
  return jax.tree.map(
    lambda x: np.asarray(x[slot] if x.ndim == 1 else x[:, slot]), (trainer.lora, inner)
  )


def test_learning_rate_schedule():
  cfg = dataclasses.replace(CFG, learning_rate=1.0, warmup_steps=4)
  steps = np.arange(10)
  lr = np.asarray(learning_rate(steps, np.full(10, 10), cfg))
  np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(lr[4], 1.0)
  assert np.all(np.diff(lr[4:]) < 0) and lr[-1] > 0
  const = dataclasses.replace(cfg, schedule="constant")
  np.testing.assert_allclose(np.asarray(learning_rate(steps, np.full(10, 10), const))[4:], 1.0)


def test_rows_targets_pairs_and_token_budget(tiny):
  """Packed texts make every token after the first a target exactly once per epoch;
  pairs count only the answer (+ EOS); the budget keeps whole leading rows."""
  _, _, tok = tiny
  eos = tok.eos_token_ids[0]
  ex = tokenize_job(AdapterJob("k", texts=DOCS[:2]), tok, eos)
  rows = make_rows(ex, epochs=3, T=32, pack=True, pad_id=0, np_seed=1)
  assert rows.targets == 3 * sum(len(t) for t in ex.texts) - 1
  assert rows.tokens.shape[1] == 32 and rows.steps(2) == -(-rows.tokens.shape[0] // 2)
  cut = make_rows(ex, epochs=3, T=32, pack=True, pad_id=0, np_seed=1, max_targets=100)
  assert 62 <= cut.targets <= 100
  np.testing.assert_array_equal(cut.tokens, rows.tokens[: len(cut.tokens)])
  pair = tokenize_job(JOBS[-1], tok, eos)
  prow = make_rows(pair, epochs=2, T=64, pack=True, pad_id=0, np_seed=1)
  answers = [" the boat", " the Ombrel"]
  assert prow.targets == 2 * sum(len(tok.encode(a)) + 1 for a in answers)
  first = prow.tokens[0][prow.loss_mask[0]]
  assert tok.decode(first[:-1]) in answers and first[-1] == eos
  with pytest.raises(ValueError, match="no training data"):
    tokenize_job(AdapterJob("empty", texts=[""]), tok, eos)


def test_texts_and_pairs_pack_into_one_stream_with_answer_masks(tiny):
  """A knowledge job with texts and question turns, packed: no padded rows, every text
  token after the stream's first and every answer token a target once per epoch,
  no question token a target; unpacked, the old layout (a padded row per pair)."""
  _, _, tok = tiny
  eos = tok.eos_token_ids[0]
  job = AdapterJob(
    "mixed", texts=DOCS[:2], pairs=[("Q: who? A:", " Ada"), ("Q: when? A:", " 1815")]
  )
  ex = tokenize_job(job, tok, eos)
  rows = make_rows(ex, epochs=3, T=32, pack=True, pad_id=0, np_seed=1)
  answers = sum(int(m.sum()) for _, m in ex.pairs)
  stream = 3 * (sum(len(t) for t in ex.texts) + sum(len(i) for i, _ in ex.pairs))
  first_counts = 1  # the stream's first token is never a target (a text's or a pair's)
  assert rows.targets in (
    3 * (sum(len(t) for t in ex.texts) + answers) - first_counts,
    3 * (sum(len(t) for t in ex.texts) + answers),
  )
  assert rows.tokens.shape[0] == -(-(stream - 1) // 31)  # stride T - 1, no padded rows
  targets = rows.tokens[rows.loss_mask]
  question = tok.encode("Q: who? A:")
  assert not any(
    np.array_equal(targets[i : i + len(question)], question) for i in range(len(targets))
  )
  assert tok.decode(rows.tokens[0]) != tok.decode(
    make_rows(ex, epochs=3, T=32, pack=True, pad_id=0, np_seed=2).tokens[0]
  )
  unpacked = make_rows(ex, epochs=3, T=32, pack=False, pad_id=0, np_seed=1)
  assert unpacked.tokens.shape[0] > rows.tokens.shape[0]
  assert build_seq_len([ex], 3, 512, True) == 512 and build_seq_len([ex], 3, 512, False) < 512


def test_loss_decreases_on_a_tiny_document(tiny):
  _, model, tok = tiny
  job = AdapterJob("repeat", texts=[DOCS[0] * 3])
  rows = rows_for(tok, job, T=CFG.max_seq_len)
  trainer = SlotTrainer(model, CFG)
  metrics = run_slots(trainer, {1: (job, rows)}, rows.steps(CFG.batch_size))
  losses = [float(m["loss"][1]) for m in metrics]
  assert all(m["active"].tolist() == [False, True, False] for m in metrics)
  # The tiny random model's tied embeddings cap its logits, hence a modest drop.
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses


def test_slots_are_independent_and_idle_slots_do_not_move(tiny):
  """Three adapters trained together equal each trained alone, bit for bit in the
  same compiled step (other slots empty, another slot index), and to 1e-5 in a
  one-slot trainer; an idle slot keeps its factors and moments despite weight
  decay; the base weights are untouched."""
  _, model, tok = tiny
  jobs = JOBS[:2] + JOBS[-1:]  # two knowledge adapters and the task adapter
  rows = [rows_for(tok, j, T=CFG.max_seq_len) for j in jobs]
  k = 4
  base_before = jax.tree.map(np.array, nnx.split(model)[1])

  together = SlotTrainer(model, CFG)
  run_slots(together, {j: (job, r) for j, (job, r) in enumerate(zip(jobs, rows))}, k)
  one_slot = dataclasses.replace(CFG, n_slots=1)
  for i, (job, r) in enumerate(zip(jobs, rows)):
    want = slot_state(together, i)
    alone = SlotTrainer(model, CFG)
    other, idle = (i + 1) % 3, (i + 2) % 3
    # Give the slot that will sit idle momentum and non-zero weights first.
    run_slots(alone, {idle: (jobs[idle], rows[idle])}, 2)
    idle_before = slot_state(alone, idle)
    run_slots(alone, {other: (job, r)}, k)
    jax.tree.map(np.testing.assert_array_equal, slot_state(alone, other), want)
    jax.tree.map(np.testing.assert_array_equal, slot_state(alone, idle), idle_before)
    single = SlotTrainer(model, one_slot)
    run_slots(single, {0: (job, r)}, k)
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0), slot_state(single, 0), want
    )
  jax.tree.map(
    np.testing.assert_array_equal, jax.tree.map(np.array, nnx.split(model)[1]), base_before
  )


def _dot_output_shapes(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.outvars[0].aval.shape))
    for v in eqn.params.values():
      for sub in v if isinstance(v, tuple | list) else (v,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _dot_output_shapes(inner, out)
  return out


def test_no_gradient_flows_to_base_weights(tiny):
  """No matmul in the step produces a base-weight-shaped result (a weight
  gradient), per layer or stacked."""
  _, model, _ = tiny
  trainer = SlotTrainer(model, CFG)
  n, bs, T = CFG.n_slots, CFG.batch_size, CFG.max_seq_len
  batch = {
    "tokens": np.zeros((n * bs, T), np.int32),
    "loss_mask": np.ones((n * bs, T), bool),
    "ids": np.repeat(np.arange(n, dtype=np.int32), bs),
  }
  step = make_train_step(CFG)
  jaxpr = jax.make_jaxpr(step, static_argnums=0)(
    trainer.graphdef,
    trainer.base_params,
    trainer.lora,
    trainer.opt_state,
    batch,
    np.zeros((n * bs, 2), np.uint32),
  )
  dots = set(_dot_output_shapes(jaxpr.jaxpr, []))
  weights = {tuple(x.shape) for x in jax.tree.leaves(trainer.base_params) if x.ndim >= 2}
  weights |= {s[1:] for s in weights if len(s) == 3}
  assert dots and not dots & weights, dots & weights


@pytest.fixture(scope="module")
def reference_build(tiny, tmp_path_factory):
  """An uninterrupted build of JOBS (6 adapters through 3 slots)."""
  _, model, tok = tiny
  out = tmp_path_factory.mktemp("reference")
  before = trace_counts()
  library = build_library(JOBS, model, tok, out, CFG, progress=False)
  return out, library, before, trace_counts()


def test_build_compiles_once_and_writes_peft_and_library(tiny, reference_build):
  _, model, tok = tiny
  out, library, before, after = reference_build
  assert after.get("train_step", 0) - before.get("train_step", 0) <= 1
  assert after.get("load_slots", 0) - before.get("load_slots", 0) <= 1
  assert library.names == tuple(j.name for j in JOBS)
  assert library.metadata["doc-3"]["doc"] == 3
  peft = [load_peft_adapter(out / "adapters" / folder_name(j.name), name=j.name) for j in JOBS]
  assert folder_name("task qa/1") != "task qa/1"
  assert peft[0].config["r"] == CFG.rank and peft[0].config["lora_alpha"] == CFG.alpha
  assert sorted({m.module for m in peft[0].modules.values()}) == sorted(CFG.target_modules)
  # The packed library is exactly the PEFT adapters, aligned in one go.
  fresh = AdapterLibrary.from_adapters(peft, model.config, library.modules)
  jax.tree.map(np.testing.assert_array_equal, fresh.weights, library.weights)
  on_disk = AdapterLibrary.load(out / "library")
  jax.tree.map(np.testing.assert_array_equal, on_disk.weights, library.weights)
  # A finished build reruns without training; other settings are refused.
  again = build_library(JOBS, model, tok, out, CFG, progress=False)
  assert again.names == library.names and trace_counts() == after
  with pytest.raises(ValueError, match="other settings"):
    build_library(
      JOBS, model, tok, out, dataclasses.replace(CFG, learning_rate=1e-3), progress=False
    )


_KILLED_BUILD = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from lag_jax.checkpoints.safetensors_loader import load_model
    from lag_jax.text.tokenizer import Tokenizer
    from lag_jax.training import build_library
    sys.path.insert(0, {tests!r})
    import test_training as t

    count = 0

    def saved(name):
      global count
      count += 1
      if count == 2:  # after the library took the first adapter
        print("SAVED", name, flush=True)
        time.sleep(600)  # the test kills us here

    build_library(t.JOBS, load_model({ckpt!r}), Tokenizer.from_dir({ckpt!r}), {out!r},
                  t.CFG, on_adapter_saved=saved, progress=False)
""")


def test_sigkilled_build_resumes_to_the_same_bits(tiny, reference_build, tmp_path):
  ckpt, model, tok = tiny
  ref_out, ref_library, _, _ = reference_build
  out = tmp_path / "build"
  script = _KILLED_BUILD.format(tests=os.path.join(ROOT, "tests"), ckpt=str(ckpt), out=str(out))
  proc = subprocess.Popen(
    [sys.executable, "-c", script],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  try:
    deadline = time.time() + 300
    line = ""
    while time.time() < deadline and not line.startswith("SAVED"):
      line = proc.stdout.readline()
      if not line and proc.poll() is not None:
        break
    assert line.startswith("SAVED"), f"the build never saved an adapter (rc {proc.poll()})"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  # Killed with one adapter in the library and one more in its PEFT folder only.
  assert AdapterLibrary.load(out / "library").names == ("doc-0",)
  done = sorted(d for d in os.listdir(out / "adapters") if not d.startswith("."))
  assert done == ["doc-0", "doc-1"] and line.split()[1] == "doc-1"
  stamps = {
    d: os.stat(out / "adapters" / d / "adapter_model.safetensors").st_mtime_ns for d in done
  }

  library = build_library(JOBS, model, tok, out, CFG, progress=False)
  for d, stamp in stamps.items():  # finished adapters are not retrained
    assert os.stat(out / "adapters" / d / "adapter_model.safetensors").st_mtime_ns == stamp
  assert library.names == ref_library.names and library.metadata == ref_library.metadata
  jax.tree.map(np.testing.assert_array_equal, library.weights, ref_library.weights)
  for job in JOBS:
    a = load_peft_adapter(out / "adapters" / folder_name(job.name))
    b = load_peft_adapter(ref_out / "adapters" / folder_name(job.name))
    assert a.config == b.config
    for path, m in b.modules.items():
      np.testing.assert_array_equal(a.modules[path].a, m.a)
      np.testing.assert_array_equal(a.modules[path].b, m.b)


def test_knowledge_adapter_lowers_the_loss_of_its_own_document(tiny, reference_build):
  """Every document's loss is lowest with its own adapter, well below the base's."""
  _, model, tok = tiny
  out, _, _, _ = reference_build
  adapters = [load_peft_adapter(out / "adapters" / f"doc-{i}") for i in range(len(DOCS))]
  base = text_losses(model, tok, DOCS)
  losses = np.stack([text_losses(model, tok, DOCS, a) for a in adapters], axis=1)  # doc, adapter
  own = np.diag(losses)
  assert np.all(own < base - 0.2), (base, losses)
  assert np.all(np.argmin(losses, axis=1) == np.arange(len(DOCS))), losses
  off = losses + np.diag(np.full(len(DOCS), np.inf))
  assert np.all(own < off.min(axis=1) - 0.05), losses
