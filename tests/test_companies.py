"""lag_jax.data.companies: the held-out world of invented companies and its KILT files."""

import collections
import json
import os

import pytest

from lag_jax.data.companies import (
  COMPANY_RELATIONS,
  CompanyWorld,
  make_company_world,
  write_kilt_files,
)
from lag_jax.data.kilt import KILT_DATASETS, dataset_from_filename, read_kilt, read_kilt_wikipedia
from lag_jax.data.restate import sentences
from lag_jax.data.synthetic import RELATIONS, make_world


@pytest.fixture(scope="module")
def world() -> CompanyWorld:
  return make_company_world(120, seed=0, questions_per_entity=3)


def test_world_is_deterministic():
  a = make_company_world(40, seed=3, questions_per_entity=2)
  b = make_company_world(40, seed=3, questions_per_entity=2)
  assert a == b and a.knowledge() == b.knowledge()
  c = make_company_world(40, seed=4, questions_per_entity=2)
  assert c.companies != a.companies and c.documents != a.documents and c.tasks != a.tasks


def test_titles_and_people_are_unique(world):
  titles = [c.title for c in world.companies]
  assert len(set(titles)) == 120 == len(world.documents)
  assert list(world.documents) == titles == [d.title for d in world.knowledge()]
  people = [c.founder for c in world.companies] + [c.chief_executive for c in world.companies]
  assert len(set(people)) == 240  # every founder and chief executive is another person
  # Towns and products are shared, so only the company ties a value to a question.
  assert max(collections.Counter(c.headquarters for c in world.companies).values()) >= 2
  assert max(collections.Counter(c.product for c in world.companies).values()) >= 2
  assert all(1850 <= c.founded <= 2015 for c in world.companies)
  # No title is a person's name of synthetic.py's world (its titles are two words, no suffix).
  assert not set(titles) & set(make_world(120, seed=0).documents)


def test_pages_are_long_multi_paragraph_and_hold_every_value(world):
  paragraph_sets = set()
  for c in world.companies:
    page = world.documents[c.title]
    paragraphs = page.split("\n")
    assert len(paragraphs) >= 3 and all(p.strip() == p and p for p in paragraphs)
    assert 100 <= len(page.split()) <= 220
    for r in COMPANY_RELATIONS:
      assert c.value(r) in page, (c.title, r)
    # The chief executive is not stated in the first paragraph: facts are spread out.
    assert c.chief_executive not in paragraphs[0]
    paragraph_sets.add(tuple(p.replace(c.title, "X")[:40] for p in paragraphs))
  # Several template variants per paragraph are in use.
  assert len(paragraph_sets) >= 10
  # Some facts are stated about "it" / "the company", not by name: in every page at least
  # one value only occurs in sentences without the company's name.
  for c in world.companies:
    unnamed = [s for s in sentences(world.documents[c.title]) if c.title not in s]
    named = [s for s in sentences(world.documents[c.title]) if c.title in s]
    assert any(
      any(c.value(r) in s for s in unnamed) and not any(c.value(r) in s for s in named)
      for r in COMPANY_RELATIONS
    ), c.title


def test_tasks_answers_provenance_and_ids(world):
  for task, examples in world.tasks.items():
    assert len(examples) == 360 and len({e.id for e in examples}) == 360
    for ex in examples:
      (gold,) = ex.provenance
      company = world.company(gold)
      rel = ex.meta["relation"]
      assert ex.task == task and company.title in ex.input
      assert ex.meta["dataset"] == f"companies_{task}" and ex.meta["entity"] == gold
      assert ex.id.startswith(f"comp-{task}-") and ex.id.endswith(f"-{rel}")
      if task == "qa":
        assert ex.input == COMPANY_RELATIONS[rel].question.format(name=gold)
        assert ex.answers == (company.value(rel),)
      elif task == "slot":
        assert ex.input == f"{gold} [SEP] {COMPANY_RELATIONS[rel].slot}"
        assert ex.answers == (company.value(rel),)
      else:
        assert ex.meta["true_value"] == company.value(rel)
        assert ex.meta["claim_value"] in ex.input
        refuted = ex.answers == ("REFUTES",)
        assert refuted == (ex.meta["claim_value"] != company.value(rel))


@pytest.mark.parametrize("n,q", [(1, 1), (1, 5), (7, 1), (30, 3)])
def test_fact_labels_are_balanced(n, q):
  fact = make_company_world(n, seed=1, questions_per_entity=q).tasks["fact"]
  labels = collections.Counter(e.answers[0] for e in fact)
  assert set(labels) <= {"SUPPORTS", "REFUTES"}
  assert labels["SUPPORTS"] - labels["REFUTES"] == (n * q) % 2
  for e in fact:  # a refuted claim names another value of the same relation
    if e.answers == ("REFUTES",):
      assert e.meta["claim_value"] != e.meta["true_value"]
      if e.meta["relation"] == "founded":
        assert 1850 <= int(e.meta["claim_value"]) <= 2015


def test_questions_differ_from_the_synthetic_world():
  assert not set(COMPANY_RELATIONS) & set(RELATIONS)
  ours = {r.question.format(name="X") for r in COMPANY_RELATIONS.values()}
  theirs = {r.question.format(name="X") for r in RELATIONS.values()}
  assert len(ours) == 5 and not ours & theirs
  assert not {r.slot for r in COMPANY_RELATIONS.values()} & {r.slot for r in RELATIONS.values()}


@pytest.mark.parametrize("q", [1, 2, 5])
def test_questions_per_entity_are_distinct_relations(q):
  world = make_company_world(10, seed=2, questions_per_entity=q)
  for examples in world.tasks.values():
    assert len(examples) == 10 * q
    per_entity = collections.defaultdict(list)
    for e in examples:
      per_entity[e.meta["entity"]].append(e.meta["relation"])
    assert len(per_entity) == 10
    assert all(len(set(rels)) == len(rels) == q for rels in per_entity.values())


@pytest.mark.parametrize(
  "args,kwargs",
  [
    ((0,), {}),
    ((-3,), {}),
    ((5,), {"questions_per_entity": 0}),
    ((5,), {"questions_per_entity": 6}),
    ((2.0,), {}),
    ((True,), {}),
    ((5, "0"), {}),
  ],
)
def test_bad_arguments_raise(args, kwargs):
  with pytest.raises(ValueError):
    make_company_world(*args, **kwargs)


def test_kilt_files_round_trip(tmp_path):
  world = make_company_world(6, seed=5, questions_per_entity=2)
  train = make_company_world(4, seed=6)
  folder = tmp_path / "new" / "companies"  # created if missing
  files = write_kilt_files(world, train, folder)
  eval_files = files["eval_files"].split(",")
  train_files = files["task_train_files"].split(",")
  assert [os.path.basename(p) for p in eval_files] == [
    "nq-dev-kilt.jsonl",
    "structured_zeroshot-dev-kilt.jsonl",
    "fever-dev-kilt.jsonl",
  ]
  assert [os.path.basename(p) for p in train_files] == [
    n.replace("-dev-", "-train-") for n in map(os.path.basename, eval_files)
  ]
  # No temp files left behind.
  assert sorted(os.listdir(folder)) == sorted(
    [os.path.basename(p) for p in eval_files + train_files] + ["kilt_knowledgesource.jsonl"]
  )
  for paths, w in ((eval_files, world), (train_files, train)):
    for path, task in zip(paths, ("qa", "slot", "fact")):
      examples, report = read_kilt(path, strict=True, knowledge=w.documents)
      assert examples == w.tasks[task] and report.kept == len(examples) and not report.problems
      # The file name maps to the task family, as the kilt benchmark reads train files.
      assert KILT_DATASETS[dataset_from_filename(path)] == task
  pages = read_kilt_wikipedia(files["knowledge_source"], strict=True)
  assert pages == world.knowledge() + train.knowledge()
  with open(files["knowledge_source"], encoding="utf-8") as f:
    first = json.loads(f.readline())
  title = world.companies[0].title
  assert first["wikipedia_title"] == first["wikipedia_id"] == title
  assert first["text"] == [title, *world.documents[title].split("\n")] and len(first["text"]) == 4
  # The library keeps only the pages the dev files cite.
  cited = {t for p in eval_files for e in read_kilt(p)[0] for t in e.provenance}
  assert cited == set(world.documents)
  # Rewriting is allowed (atomic replace), and a shared title is refused.
  assert write_kilt_files(world, train, folder) == files
  with pytest.raises(ValueError, match="share"):
    write_kilt_files(world, world, tmp_path / "bad")
  with pytest.raises(ValueError, match="comma"):
    write_kilt_files(world, train, tmp_path / "a,b")
