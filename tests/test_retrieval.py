"""lag_jax.retrieval: BM25 over Documents (bm25s), search and atomic save/load."""

from __future__ import annotations

import numpy as np
import pytest

from lag_jax.data import Document
from lag_jax.data.synthetic import make_world
from lag_jax.retrieval import BM25Index, recall_at_k

_DOCS = [
  Document("Oboe", "The oboe is a double-reed woodwind instrument used in orchestras."),
  Document("Harp", "The harp is a stringed instrument played by plucking its strings."),
  Document(
    "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."
  ),
  Document("Paris", "Paris is the capital and largest city of France."),
  Document("Berlin", "Berlin is the capital and largest city of Germany."),
]


@pytest.fixture(scope="module")
def index():
  return BM25Index.build(_DOCS)


def test_finds_the_right_document(index):
  queries = [
    "Which woodwind uses a double reed?",
    "What is the highest mountain on Earth?",
    "What is the capital of Germany?",
    "Who plucks strings?",
  ]
  ids, scores = index.search(queries, 2)
  assert ids.shape == scores.shape == (4, 2)
  assert [index.documents[i].title for i in ids[:, 0]] == [
    "Oboe",
    "Mount Everest",
    "Berlin",
    "Harp",
  ]
  assert np.all(scores[:, 0] >= scores[:, 1]) and np.all(scores[:, 0] > 0)
  assert index.search_titles(["capital of France"], 1) == [["Paris"]]


def test_titles_are_indexed(index):
  # "Berlin" is the title; the query shares no other word with any text.
  assert index.search_titles(["Berlin"], 1) == [["Berlin"]]


def test_edge_cases(index):
  ids, scores = index.search(["capital", "the of a", "zzzz unknownword"], 7)
  assert ids.shape == (3, 7)
  assert np.all(ids[:, 5:] == -1) and np.all(np.isneginf(scores[:, 5:]))
  assert np.all(scores[1:, :5] == 0)  # only stopwords / unknown words: no evidence
  ids, scores = index.search([], 3)
  assert ids.shape == (0, 3)
  with pytest.raises(TypeError):
    index.search("one string", 1)
  with pytest.raises(ValueError):
    BM25Index.build([])


def test_save_load_gives_equal_results(tmp_path, index):
  path = tmp_path / "bm25"
  index.save(path)
  loaded = BM25Index.load(path)
  assert loaded.documents == index.documents
  queries = ["capital city", "instrument strings", "Himalayas"]
  for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
    np.testing.assert_array_equal(a, b)
  # Saving over an existing index replaces it whole, with no leftovers.
  small = BM25Index.build(_DOCS[:2])
  small.save(path)
  assert len(BM25Index.load(path)) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25"]
  (path / "lag_index.json").unlink()
  with pytest.raises(FileNotFoundError, match="not a complete"):
    BM25Index.load(path)


def test_synthetic_world_recall():
  # Every question names its person in full, so BM25 finds the gold article nearly always.
  world = make_world(200, seed=0)
  index = BM25Index.build(world.knowledge())
  pos = {t: i for i, t in enumerate(index.titles)}
  qa = world.tasks["qa"]
  ids, _ = index.search([e.input for e in qa], 5)
  recall = recall_at_k(ids, [pos[e.provenance[0]] for e in qa], [1, 5])
  assert recall[1] > 0.9 and recall[5] > 0.95


def test_recall_at_k():
  ids = np.array([[3, 1, 2], [0, 2, 1], [5, 6, 7]])
  assert recall_at_k(ids, [1, 0, 4], [1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}
