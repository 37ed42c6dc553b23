"""FanOutQA over Wikipedia summaries at the paper's library size (N = 1000).

  python -m lag_jax.run --config=configs/wiki_fanoutqa.py --workdir=/tmp/lag_fanoutqa
  python -m lag_jax.run --config=configs/wiki_fanoutqa.py --config.fanoutqa.split=test ...

All 312 evidence pages of the 546 single-hop questions grounded in the packaged
summaries, plus seeded distractor pages up to N = 1000, one knowledge LoRA each
(about 600 training tokens per adapter on 2 CPU cores, see LAG.md's compute budget),
and a QA task adapter trained on FanOutQA questions about pages outside the library.
Choose settings on the tuning half (the default split) and report the test half.

Variant ``:answerable`` (what RESULTS.md reports from 2 CPU cores): only the 86
questions whose answer occurs in their page's summary, their 71 pages plus 29
distractors (N = 100), each adapter trained 2 epochs on its page and the data made
from it (``knowledge_data``, the demo's recipe); run it with ``--config.fanoutqa.split=tune``
and ``=test`` on one ``--config.library_root`` so both halves share the library.
Tiny variant: --config=configs/wiki_fanoutqa.py:tiny (tiny random model).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import demo  # noqa: E402

VARIANTS = ("tiny", "answerable")


def get_config(arg: str | None = None):
  c = demo.get_config("tiny" if arg == "tiny" else None)
  c.benchmark = "fanoutqa"
  c.fanoutqa.library_size = 1000
  c.fanoutqa.split = "tune"
  # A small budget per adapter for N = 1000 on 2 cores (LAG.md): one epoch, the first
  # four sentences restated.
  c.knowledge_data.restate_sentences = 4
  c.knowledge_training.epochs = 1
  c.k = 20
  c.k_sweep = "1,2,5,10,20,50"
  c.spectr_max_n = 1000
  # Keep each finished method's run in the workdir; a rerun resumes (eval/method_runs.py).
  c.reuse_method_runs = True
  c.extra_methods = ""  # the standard methods (request-level ones: --config.methods)
  if arg == "tiny":
    c.fanoutqa.library_size = 6
    c.fanoutqa.num_evidence_pages = 3
    c.fanoutqa.max_questions = 4
    c.fanoutqa.task_examples = 8
    c.k = 2
    c.k_sweep = "1"
  elif arg == "answerable":
    c.fanoutqa.answerable_only = True
    c.fanoutqa.library_size = 100
    c.knowledge_training.epochs = 2
    c.k = 4
    c.k_sweep = "1,2,4,8,16,32,50"
  elif arg:
    raise ValueError(
      f"configs/wiki_fanoutqa.py: unknown variant {arg!r} (use 'tiny' or 'answerable')"
    )
  return c
