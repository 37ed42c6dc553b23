"""Training data of one adapter: jobs, tokenisation, rows, and per-adapter seeds.

Everything an adapter's training depends on is derived from (seed, adapter name)
and its own data: the initial A, the order of its examples in every epoch and its
dropout masks. Never from its position in the job list or the slot it trains in,
so that a resumed build retrains an adapter exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Round a build's row length T up to a multiple of this (fewer distinct shapes).
_LENGTH_QUANTUM = 8


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterJob:
  """One adapter to train.

  Attributes:
    name: the adapter's name (library name, PEFT adapter name; its folder name is
      derived from it by ``folder_name``).
    texts: knowledge data (a document and rewrites of it): continued pretraining,
      the loss counts every token.
    pairs: task data, (prompt, answer) strings: the loss counts the answer only.
      Format the prompt (e.g. with a chat template) before passing it.
    metadata: free-form JSON-able dict stored with the adapter in the library.
  """

  name: str
  texts: Sequence[str] = ()
  pairs: Sequence[tuple[str, str]] = ()
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """A job, tokenised: texts [each an int32 array] and pairs (ids, loss mask)."""

  texts: list[np.ndarray]
  pairs: list[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterRows:
  """All of one adapter's training rows, every epoch, in training order.

  Attributes:
    tokens: [rows, T] int32, padded with ``pad_id``.
    loss_mask: [rows, T] bool; position t counts when True (position 0 of a row
      never counts: it has no context in the row).
    targets: number of target tokens (positions that count, position 0 excluded).
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  targets: int

  def steps(self, batch_size: int) -> int:
    return -(-self.tokens.shape[0] // batch_size)


def adapter_seeds(seed: int, name: str) -> tuple[np.ndarray, int]:
  """(raw threefry key [2] uint32, numpy seed) of adapter ``name`` under ``seed``."""
  digest = hashlib.sha256(f"lag_jax.training/{int(seed)}/{name}".encode()).digest()
  key = np.frombuffer(digest[:8], np.uint32).copy()
  return key, int.from_bytes(digest[8:16], "little")


def folder_name(name: str) -> str:
  """A file-system-safe folder name for adapter ``name``: the name itself when it is
  plain ([A-Za-z0-9_.-], not starting with a dot), else a slug plus a hash."""
  if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}", name):
    return name
  slug = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._")[:60] or "adapter"
  return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def tokenize_job(job: AdapterJob, tokenizer, eos_id: int | None) -> Examples:
  """Tokenises a job's texts (+ EOS) and pairs (prompt, answer + EOS).

  Raises:
    ValueError: the job has no data, or a pair has an empty answer.
  """
  extra = [] if eos_id is None else [eos_id]
  texts = [np.asarray(tokenizer.encode(t) + extra, np.int32) for t in job.texts if t]
  pairs = []
  for k, pair in enumerate(job.pairs):
    if len(pair) != 2:
      raise ValueError(f"adapter {job.name!r}: pair {k} must be (prompt, answer), got {pair!r}")
    prompt, answer = (tokenizer.encode(s) for s in pair)
    if not answer:
      raise ValueError(f"adapter {job.name!r}: pair {k} has an empty answer")
    ids = np.asarray(prompt + answer + extra, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt) :] = True
    pairs.append((ids, mask))
  if not texts and not pairs:
    raise ValueError(f"adapter {job.name!r} has no training data (no non-empty texts, no pairs)")
  return Examples(texts, pairs)


def longest_row(examples: Examples, epochs: int, max_seq_len: int, pack: bool) -> int:
  """Length of the longest row ``make_rows`` will produce for these examples."""
  if pack and examples.texts and examples.pairs:
    total = sum(len(t) for t in examples.texts) + sum(len(ids) for ids, _ in examples.pairs)
    return min(epochs * total, max_seq_len)
  lengths = [min(len(ids), max_seq_len) for ids, _ in examples.pairs]
  if examples.texts:
    if pack:
      lengths.append(min(epochs * sum(len(t) for t in examples.texts), max_seq_len))
    else:
      lengths.append(min(max(len(t) for t in examples.texts), max_seq_len))
  return max(lengths)


def build_seq_len(
  all_examples: Sequence[Examples], epochs: int, max_seq_len: int, pack: bool
) -> int:
  """T of a build: max_seq_len, or less when every row of every job is shorter.

  It depends on the whole job list only, so a resumed build uses the same T (the
  compiled shape, and so the exact arithmetic, of every step).
  """
  longest = max(longest_row(e, epochs, max_seq_len, pack) for e in all_examples)
  return min(max_seq_len, -(-longest // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)


def _chunks(ids: np.ndarray, mask: np.ndarray, T: int):
  """Rows of at most T tokens with stride T - 1: each row's first token is the
  previous row's last, so every token after the first is a target exactly once."""
  start = 0
  while start < len(ids) - 1:
    yield ids[start : start + T], mask[start : start + T]
    start += T - 1


def make_rows(
  examples: Examples,
  *,
  epochs: int,
  T: int,
  pack: bool,
  pad_id: int,
  np_seed: int,
  max_targets: int | None = None,
) -> AdapterRows:
  """Rows of every epoch, in the adapter's own deterministic order.

  Texts: each epoch visits them in a fresh random order; with ``pack`` all epochs
  form one token stream cut into rows (a row may span two texts; EOS separates
  them), else each text is cut on its own. Pairs: one row each per epoch, in a
  fresh order; a pair longer than T loses the start of its prompt (or, when the
  answer alone is that long, the end of the answer). With both, the rows are
  shuffled together once; with both and ``pack``, each epoch visits texts and pairs
  together in a fresh order in one stream (a pair keeps its loss mask), cut into
  rows as packed texts are: a short question-answer turn then costs its own tokens,
  not a padded row. ``max_targets`` keeps the first rows (at least one)
  whose targets add up to at most that many: a token budget that cuts the last
  epochs short.
  """
  rng = np.random.default_rng(np_seed)
  text_rows, pair_rows = [], []
  if pack and examples.texts and examples.pairs:
    items = [(t, np.ones(len(t), bool)) for t in examples.texts] + list(examples.pairs)
    order = [i for _ in range(epochs) for i in rng.permutation(len(items))]
    ids = np.concatenate([items[i][0] for i in order])
    mask = np.concatenate([items[i][1] for i in order])
    return _pad_rows(list(_chunks(ids, mask, T)), T, pad_id, max_targets)
  if examples.texts:
    pieces = []
    for _ in range(epochs):
      pieces += [examples.texts[i] for i in rng.permutation(len(examples.texts))]
    if pack:
      pieces = [np.concatenate(pieces)]
    for ids in pieces:
      text_rows += list(_chunks(ids, np.ones(len(ids), bool), T))
  for _ in range(epochs):
    for i in rng.permutation(len(examples.pairs)):
      ids, mask = examples.pairs[i]
      if len(ids) > T:
        first_answer = int(np.argmax(mask))
        start = min(len(ids) - T, max(first_answer - 1, 0))
        ids, mask = ids[start : start + T], mask[start : start + T]
      pair_rows.append((ids, mask))
  rows = text_rows + pair_rows
  if text_rows and pair_rows:
    rows = [rows[i] for i in rng.permutation(len(rows))]
  return _pad_rows(rows, T, pad_id, max_targets)


def _pad_rows(rows, T: int, pad_id: int, max_targets: int | None) -> AdapterRows:
  """(ids, mask) rows -> padded AdapterRows, cut to the token budget."""
  tokens = np.full((len(rows), T), pad_id, np.int32)
  loss_mask = np.zeros((len(rows), T), bool)
  for r, (ids, mask) in enumerate(rows):
    tokens[r, : len(ids)] = ids
    loss_mask[r, : len(ids)] = mask
  loss_mask[:, 0] = False
  if max_targets is not None:
    keep = max(1, int(np.sum(np.cumsum(loss_mask.sum(axis=1)) <= max_targets)))
    tokens, loss_mask = tokens[:keep], loss_mask[:keep]
  return AdapterRows(tokens, loss_mask, int(loss_mask.sum()))
