"""BM25 over a list of Documents with ``bm25s`` (the retriever of the RAG and PRAG baselines).

Each document is indexed as its title followed by its text (the title names the
entity a question asks about). Tokenisation is ``bm25s.tokenize``: lowercase,
words of two or more characters (scikit-learn's pattern), English stopwords
removed (bm25s' NLTK list). No stemming by default, so that bm25s (numpy only)
is the only dependency; ``stemmer="english"`` uses PyStemmer when installed (a
small binary wheel), and the choice is saved with the index so that queries are
tokenised as the documents were.

Retrieval uses bm25s' numpy backends explicitly: its "auto" top-k would use JAX
and compile for every new shape.

An index folder holds bm25s' files plus ``documents.jsonl`` (title, text) and
``lag_index.json`` (our settings); ``save`` writes it to a temporary folder and
renames it into place, so a folder under the final name is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from lag_jax.data.records import Document

__all__ = ["BM25Index", "recall_at_k"]

_SETTINGS_FILE = "lag_index.json"
_DOCS_FILE = "documents.jsonl"
_FORMAT_VERSION = 1


def _stemmer(name: str | None):
  if name is None:
    return None
  try:
    import Stemmer  # PyStemmer; optional
  except ImportError:
    raise ImportError(f"stemmer={name!r} needs PyStemmer (pip install PyStemmer)") from None
  return Stemmer.Stemmer(name)


@dataclasses.dataclass(frozen=True)
class _Settings:
  stopwords: str | None = "en"
  stemmer: str | None = None
  k1: float = 1.5
  b: float = 0.75
  method: str = "lucene"


class BM25Index:
  """A BM25 index over Documents; row i of a search result refers to ``documents[i]``."""

  def __init__(self, retriever, documents: Sequence[Document], settings: _Settings):
    """Use ``build`` or ``load``."""
    self._retriever = retriever
    self.documents: tuple[Document, ...] = tuple(documents)
    self._settings = settings
    self._stem = _stemmer(settings.stemmer)

  @property
  def titles(self) -> list[str]:
    return [d.title for d in self.documents]

  def __len__(self) -> int:
    return len(self.documents)

  @classmethod
  def build(
    cls,
    documents: Sequence[Document],
    *,
    stopwords: str | None = "en",
    stemmer: str | None = None,
    k1: float = 1.5,
    b: float = 0.75,
    method: str = "lucene",
  ) -> BM25Index:
    """Indexes ``documents`` (title + text).

    Args:
      stopwords: a bm25s stopword list name ("en"), or None for none.
      stemmer: a PyStemmer language ("english"), or None (default) for no stemming.
      k1, b, method: BM25 parameters (bm25s' defaults, Lucene's variant).
    Raises:
      ValueError: for no documents.
    """
    import bm25s  # imported here: only retrieval needs it

    documents = list(documents)
    if not documents:
      raise ValueError("cannot index an empty list of documents")
    settings = _Settings(stopwords=stopwords, stemmer=stemmer, k1=k1, b=b, method=method)
    stem = _stemmer(stemmer)
    corpus = [f"{d.title}\n{d.text}" for d in documents]
    tokens = bm25s.tokenize(corpus, stopwords=stopwords, stemmer=stem, show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method=method, backend="numpy")
    retriever.index(tokens, show_progress=False)
    return cls(retriever, documents, settings)

  def _tokenize_queries(self, queries: Sequence[str]) -> list[list[str]]:
    import bm25s

    # Strings, not ids: the retriever maps them through the index's own vocabulary
    # (ids from a fresh tokenize call would index a different vocabulary).
    return bm25s.tokenize(
      list(queries),
      stopwords=self._settings.stopwords,
      stemmer=self._stem,
      return_ids=False,
      show_progress=False,
    )

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents for each query, best first.

    Args:
      queries: Q query strings.
      k: results per query.
    Returns:
      (ids [Q, k] int64 into ``documents``, scores [Q, k] float32). Where k exceeds the
      number of documents, the missing places hold id -1 and score -inf. A query
      with no indexed word scores 0 everywhere (its order is then arbitrary).
    """
    if isinstance(queries, str):
      raise TypeError("queries must be a sequence of strings, not one string")
    if k < 1:
      raise ValueError(f"k must be positive, got {k}")
    q = len(queries)
    ids = np.full((q, k), -1, dtype=np.int64)
    scores = np.full((q, k), -np.inf, dtype=np.float32)
    if q == 0:
      return ids, scores
    kk = min(k, len(self.documents))
    found, found_scores = self._retriever.retrieve(
      self._tokenize_queries(queries),
      k=kk,
      show_progress=False,
      backend_selection="numpy",
      n_threads=0,
    )
    ids[:, :kk] = found
    scores[:, :kk] = found_scores
    return ids, scores

  def search_titles(self, queries: Sequence[str], k: int) -> list[list[str]]:
    """Like ``search``, as titles (missing places left out)."""
    ids, _ = self.search(queries, k)
    return [[self.documents[i].title for i in row if i >= 0] for row in ids]

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the index folder atomically (replacing an existing one at ``path``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
      self._retriever.save(str(tmp), show_progress=False)
      with open(tmp / _DOCS_FILE, "w", encoding="utf-8") as f:
        for d in self.documents:
          f.write(json.dumps({"title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
      settings = {"format_version": _FORMAT_VERSION, **dataclasses.asdict(self._settings)}
      # Written last: its presence marks a complete folder.
      (tmp / _SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
      tmp.chmod(0o755)  # mkdtemp makes it private
      if path.exists():
        # A directory rename cannot replace a non-empty directory: move the old aside.
        old = pathlib.Path(
          tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
        )
        os.replace(path, old / "x")
        shutil.rmtree(old, ignore_errors=True)
      os.rename(tmp, path)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> BM25Index:
    """Reads a folder written by ``save``.

    Raises:
      FileNotFoundError: if the folder is missing or incomplete.
      ValueError: if it was written by an incompatible version.
    """
    import bm25s

    path = pathlib.Path(path)
    settings_path = path / _SETTINGS_FILE
    if not settings_path.is_file():
      raise FileNotFoundError(f"{path}: not a complete BM25 index (no {_SETTINGS_FILE})")
    raw = json.loads(settings_path.read_text())
    if raw.pop("format_version", None) != _FORMAT_VERSION:
      raise ValueError(f"{path}: index format is not version {_FORMAT_VERSION}; rebuild it")
    settings = _Settings(**raw)
    with open(path / _DOCS_FILE, encoding="utf-8") as f:
      documents = [Document(**json.loads(line)) for line in f if line.strip()]
    retriever = bm25s.BM25.load(str(path), show_progress=False)
    retriever.backend = "numpy"
    return cls(retriever, documents, settings)


def recall_at_k(ids: np.ndarray, gold: Sequence[int], ks: Sequence[int]) -> dict[int, float]:
  """Share of queries whose gold document id is among the first k results, for each k."""
  ids = np.asarray(ids)
  gold_arr = np.asarray(gold)[:, None]
  hit_rank = np.where(ids == gold_arr, np.arange(ids.shape[1])[None, :], ids.shape[1])
  first = hit_rank.min(axis=1)
  return {k: float(np.mean(first < k)) if len(first) else float("nan") for k in ks}
