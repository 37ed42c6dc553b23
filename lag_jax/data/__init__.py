"""Data: KILT-format tasks and knowledge sources, the FanOutQA benchmark, a synthetic world."""

from __future__ import annotations

from lag_jax.data.fanoutqa import (
  FanOutQABenchmark,
  answer_strings,
  build_fanoutqa,
  read_single_hop,
  split_of,
)
from lag_jax.data.kilt import (
  KILT_DATASETS,
  Document,
  KiltExample,
  KiltFormatError,
  Problem,
  ReadReport,
  documents_by_title,
  load_kilt_hf,
  read_kilt,
  read_kilt_wikipedia,
  read_wiki_summaries,
  write_kilt,
)

__all__ = [
  "KILT_DATASETS",
  "Document",
  "FanOutQABenchmark",
  "KiltExample",
  "KiltFormatError",
  "Problem",
  "ReadReport",
  "answer_strings",
  "build_fanoutqa",
  "documents_by_title",
  "load_kilt_hf",
  "read_kilt",
  "read_kilt_wikipedia",
  "read_single_hop",
  "read_wiki_summaries",
  "split_of",
  "write_kilt",
]
