"""Routing accuracy against library size: the synthetic world at up to 1,000 people.

  python -m lag_jax.run --config=configs/synthetic_scale.py --workdir=/tmp/lag_scale

Trains one knowledge LoRA per person of a 1,000-person world with a cheap recipe (one
epoch of each person's texts: about 560 tokens, 5 optimizer steps), then measures, for
every router and for nested libraries of the first N people (N = 16 ... 1,000), how
often each request's routing picks its own person's adapter: per token (entity tokens)
and per request. Prefill only: no answers are generated, so the measurement is the
routing itself. Writes scale.json, scale.md and scale.png.
The recipe's effect on routing is calibrated at N = 16 against configs/demo.py's
six-epoch library (RESULTS.md).
Tiny variant (random tiny model, seconds): --config=configs/synthetic_scale.py:tiny
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import demo  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "routing_scale"
  c.checkpoint = "smollm2"
  c.library_root = ""  # default: the workdir
  # False: measure the library in <library_root>/knowledge/library as it stands (its
  # first people), without training; sizes measured before in the workdir are kept.
  c.build = True

  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.num_entities = 1000
  c.synthetic.seed = 0
  c.synthetic.tasks = ("qa", "slot", "fact")
  # all: requests drawn from every question; tune / test: only the questions of that
  # half of the evaluate job's draw of questions_per_task per task (configs/n1000.py),
  # so that routers are chosen on the tuning half alone.
  c.synthetic.split = "all"
  c.synthetic.questions_per_task = 200

  c.sizes = "16,64,250,1000"  # nested libraries: the first N people
  c.max_requests = 150  # per size, spread evenly over the N people and the tasks
  c.routers = "LAG,Arrow,SpectR,Vote,Vote-score,ReqLAG,LAG+gate"
  # Each of shared_routers also runs with each of these removals (routing/shared.py);
  # at N = 16 (configs/demo.py's library) one direction did not help, four did.
  c.shared_removal = "mean:4,top:4"
  c.shared_routers = "Vote,Vote-score"
  c.spectr_max_n = 250  # SpectR projects onto all N adapters per token
  # Candidates k for these routers at these sizes (besides k above).
  c.k_sweep = "1,2,8,16"
  c.k_sweep_routers = "LAG,Vote,ReqLAG"
  c.k_sweep_sizes = "16"
  c.k = 4
  c.batch_size = 16
  # The vote taken apart at these sizes (lag_jax/eval/routing_analysis.py): the
  # per-token choices of analysis_router over the same requests, with
  # analysis_removal; writes analysis.json, analysis.md, analysis_<N>.png.
  c.analysis_sizes = ""
  c.analysis_router = "LAG"
  c.analysis_removal = "none"
  # The arrow index against the exact filter at these sizes (index_effect.json / .md):
  # LAG(k=index_k) exact and through the index at each probe, decisions compared.
  c.index_sizes = ""
  c.index_probes = "4,8"
  # DIMS:POOL[:cal],... the arrow sketch's recall beside the index's; ':cal' calibrates
  # the sketch on generic prompts (routing/calibration.py; fetches the real assets).
  c.index_sketches = ""
  c.sketch_ridge = 10.0  # the calibrated sketches' ridge (routing/arrow_sketch.py)
  # False: recall only (no LAG run through the exact filter, the index or the sketches).
  c.index_decisions = True
  c.index_k = 20

  # Document-only training data, as the demo's (configs/demo.py), without the
  # base-model rewrites: generating them for 1,000 pages is the hour-long part.
  c.knowledge_data = demo.get_config().knowledge_data
  c.knowledge_data.steps = "page,restate,qa,shuffle"
  c.knowledge_training = ml_collections.ConfigDict(
    dict(
      rank=6,
      alpha=12.0,
      target_modules="gate_proj,up_proj,down_proj",
      epochs=1,
      learning_rate=3e-3,
      warmup_steps=1,
      batch_size=1,
      max_seq_len=128,
      dropout=0.05,
      n_slots=8,
      seed=0,
    )
  )

  if arg == "tiny":
    c.checkpoint = "tiny-random"
    c.synthetic.num_entities = 6
    c.sizes = "3,6"
    c.max_requests = 8
    c.routers = "LAG,Vote,ReqLAG"
    c.shared_removal = "top:1"
    c.shared_routers = "LAG,Vote"
    c.k_sweep = "1"
    c.k_sweep_routers = "Vote"
    c.k_sweep_sizes = "6"
    c.analysis_sizes = "6"
    c.index_sizes = "6"
    c.index_probes = "1,64"  # 64: every cluster, the exact filter
    c.index_sketches = "1:20"  # a pool beyond the 6 adapters: the exact top-k
    c.k = 2
    c.knowledge_training.max_seq_len = 64
  elif arg:
    raise ValueError(f"configs/synthetic_scale.py: unknown variant {arg!r} (use 'tiny')")
  return c
