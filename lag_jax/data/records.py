"""The records every task and knowledge source reads into, below the readers
(``data/kilt.py``, ``data/fanoutqa.py``, the synthetic worlds) and the evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

# KILT's datasets (file-name prefixes and hub config names) -> the paper's task families.
KILT_DATASETS: dict[str, str] = {
  "wow": "chat",
  "fever": "fact",
  "aidayago2": "link",
  "wned": "link",
  "cweb": "link",
  "structured_zeroshot": "slot",
  "zsre": "slot",
  "trex": "slot",
  "nq": "qa",
  "triviaqa": "qa",
  "triviaqa_support_only": "qa",
  "hotpotqa": "qa",
  "eli5": "qa",
}


@dataclasses.dataclass(frozen=True)
class Document:
  """One page of a knowledge source: its (unique) title and plain text."""

  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class KiltExample:
  """One task instance.

  Attributes:
    id: unique within its dataset.
    input: the question / claim / "entity [SEP] relation" / dialogue, as in KILT.
    answers: acceptable answers (at least one), e.g. ("SUPPORTS",) for FEVER.
    provenance: titles of the pages that support the answer; the first is the gold
      page whose knowledge adapter the oracle applies.
    task: the task family: "chat", "fact", "link", "slot" or "qa".
    meta: JSON-serialisable extras; "dataset" names the dataset where known.
  """

  id: str
  input: str
  answers: tuple[str, ...]
  provenance: tuple[str, ...]
  task: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Lists are accepted for convenience; tuples keep the example immutable.
    object.__setattr__(self, "answers", tuple(self.answers))
    object.__setattr__(self, "provenance", tuple(self.provenance))

  @property
  def dataset(self) -> str | None:
    """``meta["dataset"]``, the dataset this example belongs to, if known."""
    return self.meta.get("dataset")

  def to_record(self) -> dict[str, Any]:
    """The KILT record: one output entry per answer, each with all provenance titles."""
    prov = [{"title": t} for t in self.provenance]
    return {
      "id": self.id,
      "input": self.input,
      "output": [{"answer": a, "provenance": list(prov)} for a in self.answers],
      "task": self.task,
      "meta": self.meta,
    }
