"""FanOutQA over Wikipedia summaries at the paper's library size (N = 1000).

  python -m lag_jax.run --config=configs/wiki_fanoutqa.py --workdir=/tmp/lag_fanoutqa
  python -m lag_jax.run --config=configs/wiki_fanoutqa.py --config.fanoutqa.split=test ...

All 312 evidence pages of the 546 single-hop questions grounded in the packaged
summaries, plus seeded distractor pages up to N = 1000, one knowledge LoRA each
(about 600 training tokens per adapter on 2 CPU cores, see LAG.md's compute budget),
and a QA task adapter trained on FanOutQA questions about pages outside the library.
Choose settings on the tuning half (the default split) and report the test half.
Tiny variant: --config=configs/wiki_fanoutqa.py:tiny (tiny random model).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import demo  # noqa: E402


def get_config(arg: str | None = None):
  c = demo.get_config("tiny" if arg == "tiny" else None)
  c.benchmark = "fanoutqa"
  c.fanoutqa.library_size = 1000
  c.fanoutqa.split = "tune"
  c.knowledge_training.epochs = 2
  c.k = 20
  c.k_sweep = "1,2,5,10,20,50"
  c.spectr_max_n = 1000
  if arg == "tiny":
    c.fanoutqa.library_size = 6
    c.fanoutqa.num_evidence_pages = 3
    c.fanoutqa.max_questions = 4
    c.fanoutqa.task_examples = 8
    c.k = 2
    c.k_sweep = "1"
  elif arg:
    raise ValueError(f"configs/wiki_fanoutqa.py: unknown variant {arg!r} (use 'tiny')")
  return c
