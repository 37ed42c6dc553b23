"""The paper's setting on a TPU VM: Llama-3.2-3B-Instruct, KILT tasks, 1000 pages.

  python -m lag_jax.run --config=configs/llama3_2_3b_kilt.py --workdir=$HOME/lag_kilt \
      --config.checkpoint=/path/to/Llama-3.2-3B-Instruct \
      --config.kilt.knowledge_source=/path/to/kilt_knowledgesource.json \
      --config.kilt.eval_files=/kilt/nq-dev-kilt.jsonl,/kilt/fever-dev-kilt.jsonl,...

The knowledge library is one LoRA per page for the 1000 pages most cited as
provenance by the evaluation files (rank 6, alpha 12, gate/up/down, 4 epochs, lr
1e-4, dropout 0.05, batch 1); task adapters are rank 8, alpha 16 on q/k/v/o, one
epoch, trained on KILT train examples whose provenance lies outside those pages.
Each page's adapter trains on the page and data made from it alone
(``knowledge_data``, as configs/demo.py: restatements, fill-in-the-blank turns,
shuffles, and rewrites by the base model, as the paper's synthetic continued
pretraining), never on anything derived from the questions.

Variant ``:smollm2`` (the packaged model on 2 CPU cores, one command): writes a
synthetic companies world (lag_jax/data/companies.py, 3-paragraph pages) as KILT
files into the workdir and runs this path on them, with configs/demo.py's training:
  python -m lag_jax.run --config=configs/llama3_2_3b_kilt.py:smollm2 --workdir=/tmp/lag_kilt
Your own KILT files: the same, with --config.kilt.eval_files=... etc.
Tiny variant (fixture KILT files, tiny random model; used by the tests):
  python -m lag_jax.run --config=configs/llama3_2_3b_kilt.py:tiny
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import demo  # noqa: E402

_FIXTURES = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "kilt"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "evaluate"
  c.checkpoint = ""  # an HF folder of Llama-3.2-3B-Instruct (local or downloaded)
  c.benchmark = "kilt"
  c.library_root = ""

  c.kilt = ml_collections.ConfigDict()
  c.kilt.eval_files = ""  # comma-separated KILT dev files (names tell the dataset)
  c.kilt.task_train_files = ""  # KILT train files for the task adapters
  c.kilt.knowledge_source = ""  # KILT Wikipedia JSONL
  c.kilt.num_pages = 1000
  c.kilt.max_per_dataset = 0
  c.kilt.task_examples = 10000
  # > 0 and no eval_files: write a synthetic companies world of this many pages as KILT
  # files into <library_root or workdir>/kilt_files and run on them.
  c.kilt.companies = 0
  c.kilt.companies_seed = 0
  c.kilt.questions_per_entity = 1
  c.knowledge_data = demo.get_config().knowledge_data

  c.knowledge_training = ml_collections.ConfigDict(
    dict(
      rank=6,
      alpha=12.0,
      target_modules="gate_proj,up_proj,down_proj",
      epochs=4,
      learning_rate=1e-4,
      warmup_steps=0,
      batch_size=1,
      max_seq_len=1024,
      dropout=0.05,
      n_slots=64,
      seed=0,
    )
  )
  c.task_training = ml_collections.ConfigDict(
    dict(
      rank=8,
      alpha=16.0,
      target_modules="q_proj,k_proj,v_proj,o_proj",
      epochs=1,
      learning_rate=1e-4,
      warmup_steps=0,
      batch_size=8,
      max_seq_len=1024,
      dropout=0.05,
      n_slots=5,
      seed=0,
      pack=False,
    )
  )
  c.use_task_library = True
  c.retrieval = True
  c.rag_max_chars = 4000  # of the retrieved page, in the RAG prompt
  c.k = 20
  c.k_sweep = "1,2,5,10,20,50"
  c.spectr_max_n = 1000
  # Keep each finished method's run in the workdir; a rerun resumes (eval/method_runs.py).
  c.reuse_method_runs = True
  c.shared_removal = "none"  # none | mean:S | top:S (lag_jax/routing/shared.py)
  c.methods = ""
  c.max_new_tokens = 32
  c.batch_size = 64

  if arg == "smollm2":
    demo_config = demo.get_config()
    c.checkpoint = "smollm2"
    c.kilt.companies = 16
    c.kilt.questions_per_entity = 3
    c.kilt.num_pages = 16
    c.kilt.task_examples = 192
    c.knowledge_training = demo_config.knowledge_training
    c.knowledge_training.max_seq_len = 256  # the pages are 3 paragraphs (~250 tokens)
    c.knowledge_training.epochs = 6  # as the recipe was chosen (the demo trains 4)
    c.task_training = demo_config.task_training
    c.k = 4
    c.k_sweep = "1,2,4,8,16"
    c.max_new_tokens = 12
    c.batch_size = 16
  elif arg == "tiny":
    c.checkpoint = "tiny-random"
    c.kilt.eval_files = ",".join(
      os.path.join(_FIXTURES, f"{d}-dev-kilt.jsonl") for d in ("nq", "fever", "structured_zeroshot")
    )
    c.kilt.task_train_files = ",".join(
      os.path.join(_FIXTURES, f"{d}-train-kilt.jsonl")
      for d in ("nq", "fever", "structured_zeroshot")
    )
    c.kilt.knowledge_source = os.path.join(_FIXTURES, "kilt_knowledgesource.jsonl")
    c.kilt.num_pages = 4
    c.knowledge_training.update(dict(epochs=1, max_seq_len=64, n_slots=4, batch_size=2))
    c.task_training.update(dict(max_seq_len=96, n_slots=3))
    c.k = 2
    c.k_sweep = "1"
    c.max_new_tokens = 4
    c.rag_max_chars = 200  # the tiny model's byte tokenizer and 512-token context
    c.batch_size = 8
    c.knowledge_data = demo.get_config("tiny").knowledge_data
  elif arg:
    raise ValueError(
      f"configs/llama3_2_3b_kilt.py: unknown variant {arg!r} (use 'smollm2' or 'tiny')"
    )
  return c
