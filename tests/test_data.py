"""lag_jax.data: KILT read/write, malformed records, the synthetic world, the FanOutQA builder."""

from __future__ import annotations

import collections
import json
import pathlib
import time

import pytest

from lag_jax.data import (
  Document,
  KiltExample,
  KiltFormatError,
  answer_strings,
  build_fanoutqa,
  documents_by_title,
  load_kilt_hf,
  read_kilt,
  read_kilt_wikipedia,
  read_single_hop,
  read_wiki_summaries,
  split_of,
  write_kilt,
)
from lag_jax.data.restate import restatements, sentences
from lag_jax.data.synthetic import RELATIONS, TRAIN_QA, make_world
from lag_jax.eval.metrics import normalize_answer

# ---------------------------------------------------------------------------
# KILT format.


def _examples() -> list[KiltExample]:
  return [
    KiltExample(
      "q1",
      "Who wrote Hamlet?",
      ("William Shakespeare", "Shakespeare"),
      ("Hamlet", "William Shakespeare"),
      "qa",
      {"dataset": "nq"},
    ),
    KiltExample(
      "f1",
      "The oboe is a brass instrument.",
      ("REFUTES",),
      ("Oboe",),
      "fact",
      {"dataset": "fever", "nested": {"a": [1, 2]}},
    ),
    KiltExample("s1", "Paris [SEP] country", ("France",), ("Paris",), "slot", {}),
  ]


@pytest.mark.parametrize("name", ["out.jsonl", "out.json"])
def test_kilt_round_trip(tmp_path, name):
  path = tmp_path / name
  write_kilt(path, _examples())
  examples, report = read_kilt(path)
  assert examples == _examples()
  assert report.records == 3 and report.kept == 3 and report.counts == {}
  assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary files left


def test_kilt_records_follow_the_kilt_layout(tmp_path):
  path = tmp_path / "x.jsonl"
  write_kilt(path, _examples()[:1])
  record = json.loads(path.read_text())
  assert record["id"] == "q1" and record["input"] == "Who wrote Hamlet?"
  assert [o["answer"] for o in record["output"]] == ["William Shakespeare", "Shakespeare"]
  assert record["output"][0]["provenance"] == [
    {"title": "Hamlet"},
    {"title": "William Shakespeare"},
  ]


def test_kilt_reads_official_records_and_infers_the_task(tmp_path):
  # As in KILT's files: extra provenance-only outputs, extra fields, an empty answer.
  records = [
    {
      "id": "1",
      "input": "where is the eiffel tower",
      "output": [
        {
          "answer": "Paris",
          "provenance": [{"wikipedia_id": "1", "title": "Eiffel Tower", "start_paragraph_id": 1}],
        },
        {"answer": "", "provenance": [{"title": "Paris"}]},
        {"provenance": [{"title": "Eiffel Tower"}]},
        {"answer": "Paris"},
      ],
    },
  ]
  path = tmp_path / "nq-dev-kilt.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  (ex,), _ = read_kilt(path)
  assert ex.answers == ("Paris",) and ex.provenance == ("Eiffel Tower", "Paris")
  assert ex.task == "qa" and ex.dataset == "nq"
  # An explicit task and dataset win over the file name.
  (ex,), _ = read_kilt(path, task="slot", dataset="mine")
  assert ex.task == "slot" and ex.dataset == "mine"


def test_kilt_through_datasets_matches_the_plain_reader(tmp_path):
  path = tmp_path / "out.jsonl"
  write_kilt(path, _examples())
  examples, report = load_kilt_hf(
    "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
  )
  assert report.kept == 3
  # datasets fills keys absent from a record with None; nothing else changes.
  assert [(e.id, e.input, e.answers, e.provenance, e.task) for e in examples] == [
    (e.id, e.input, e.answers, e.provenance, e.task) for e in _examples()
  ]


def _malformed_file(tmp_path: pathlib.Path) -> pathlib.Path:
  good = {"id": "ok1", "input": "q", "output": [{"answer": "a", "provenance": [{"title": "A"}]}]}
  lines = [
    json.dumps(good),  # 1 kept
    '{"id": "broken", "input": ',  # 2 json
    json.dumps({"id": "noinput", "output": good["output"]}),  # 3 missing
    json.dumps(
      {"id": "noans", "input": "q", "output": [{"answer": "", "provenance": [{"title": "A"}]}]}
    ),
    json.dumps(
      {
        "id": "unknown",
        "input": "q",
        "output": [{"answer": "a", "provenance": [{"title": "Nowhere"}]}],
      }
    ),  # 5
    "",  # blank
    json.dumps(
      {"id": "numans", "input": "q", "output": [{"answer": 3, "provenance": [{"title": "A"}]}]}
    ),  # 7 bad
    json.dumps(good),  # 8 dup
    json.dumps(["not", "an", "object"]),  # 9
    json.dumps(
      {
        "id": "notitle",
        "input": "q",
        "output": [{"answer": "a", "provenance": [{"wikipedia_id": "3"}]}],
      }
    ),  # 10
    json.dumps({"id": "noprov", "input": "q", "output": [{"answer": "a"}]}),  # 11
    json.dumps(
      {
        "id": "partial",
        "input": "q2",
        "output": [{"answer": "b", "provenance": [{"title": "Nowhere"}, {"title": "B"}]}],
      }
    ),  # 12 kept
  ]
  path = tmp_path / "mixed.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_malformed_records_are_skipped_and_counted(tmp_path):
  path = _malformed_file(tmp_path)
  knowledge = [Document("A", "a"), Document("B", "b")]
  examples, report = read_kilt(path, task="qa", knowledge=knowledge)
  assert [e.id for e in examples] == ["ok1", "partial"]
  assert examples[1].provenance == ("B",)  # the unknown title is dropped
  assert report.dropped_titles == 1
  assert report.counts == {
    "invalid_json": 1,
    "missing_field": 2,
    "empty_answers": 1,
    "unknown_provenance": 1,
    "bad_field": 1,
    "duplicate_id": 1,
    "not_an_object": 1,
    "missing_provenance": 1,
  }
  # The blank line is no record.
  assert report.records == 11 and report.kept == 2 and report.skipped == 9
  assert report.ids("missing_field") == ["noinput", "notitle"]
  by_id = {p.example_id: p for p in report.problems}
  assert (by_id["noinput"].line, by_id["noinput"].field) == (3, "input")
  assert (by_id["numans"].line, by_id["numans"].field) == (7, "output[0].answer")
  assert by_id["notitle"].field == "output[0].provenance[0].title"
  assert by_id["unknown"].line == 5
  summary = report.summary()
  assert "skipped 9" in summary and "unknown_provenance: 1" in summary and "mixed.jsonl" in summary
  # Without a knowledge source, the unknown title is fine; provenance can be optional.
  examples, report = read_kilt(path, task="qa", require_provenance=False)
  assert {"unknown", "noprov"} <= {e.id for e in examples}
  assert "unknown_provenance" not in report.counts and "missing_provenance" not in report.counts


def test_strict_mode_names_file_line_and_field(tmp_path):
  path = _malformed_file(tmp_path)
  with pytest.raises(KiltFormatError) as err:
    read_kilt(path, task="qa", strict=True)
  e = err.value
  assert (e.file, e.line, e.kind) == (str(path), 2, "invalid_json")
  assert f"{path}:2" in str(e)
  # Past the JSON error, the next problem is a missing field on line 3.
  lines = path.read_text().splitlines()
  del lines[1]
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(KiltFormatError) as err:
    read_kilt(path, task="qa", strict=True)
  assert (err.value.line, err.value.field, err.value.example_id) == (2, "input", "noinput")
  assert "field 'input'" in str(err.value) and "noinput" in str(err.value)


def test_missing_task_is_a_problem(tmp_path):
  path = tmp_path / "custom.jsonl"
  path.write_text(
    json.dumps(
      {"id": "1", "input": "q", "output": [{"answer": "a", "provenance": [{"title": "A"}]}]}
    )
  )
  examples, report = read_kilt(path)
  assert examples == [] and report.problems[0].field == "task"


def test_broken_json_array_is_an_error_with_its_line(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[\n {"id": "1", "input": "q", "output": []},\n {"id": x}\n]\n')
  with pytest.raises(KiltFormatError) as err:
    read_kilt(path, task="qa")
  assert err.value.line == 3 and err.value.kind == "invalid_json"


def test_json_array_problems_name_the_record_line(tmp_path):
  path = tmp_path / "arr.json"
  path.write_text(
    '[\n {"id": "1", "input": "q", "output": [{"answer": "a", '
    '"provenance": [{"title": "A"}]}]},\n\n {"id": "2", "output": []}\n]\n'
  )
  examples, report = read_kilt(path, task="qa")
  assert [e.id for e in examples] == ["1"]
  assert (report.problems[0].line, report.problems[0].field) == (4, "input")


def test_write_is_all_or_nothing(tmp_path):
  path = tmp_path / "out.jsonl"
  write_kilt(path, _examples())
  before = path.read_bytes()
  bad = _examples()
  bad.insert(1, KiltExample("e", "q", (), ("A",), "qa"))  # empty answers
  with pytest.raises(ValueError, match="example 1"):
    write_kilt(path, bad)
  dup = _examples() + [_examples()[0]]
  with pytest.raises(ValueError, match="duplicate id"):
    write_kilt(path, dup)
  # A meta value that JSON cannot hold fails while writing the temporary file.
  unserialisable = _examples() + [KiltExample("z", "q", ("a",), ("A",), "qa", {"x": object()})]
  with pytest.raises(TypeError):
    write_kilt(path, unserialisable)
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_knowledge_sources(tmp_path):
  wiki = tmp_path / "kilt_knowledgesource.json"
  pages = [
    {
      "wikipedia_id": "1",
      "wikipedia_title": "Oboe",
      "text": [
        "Oboe\n",
        "The oboe is a woodwind instrument.\n",
        "Section::::History.\n",
        "BULLET::::- It has a double reed.\n",
      ],
    },
    {"wikipedia_id": "2", "wikipedia_title": "Harp", "text": ["Harp\n", "A harp has strings."]},
    {"wikipedia_id": "3"},  # malformed: skipped with a warning
  ]
  wiki.write_text("".join(json.dumps(p) + "\n" for p in pages))
  docs = read_kilt_wikipedia(wiki)
  assert docs == [
    Document("Oboe", "The oboe is a woodwind instrument.\n- It has a double reed."),
    Document("Harp", "A harp has strings."),
  ]
  assert read_kilt_wikipedia(wiki, titles={"Harp"}) == docs[1:]
  with pytest.raises(KiltFormatError) as err:
    read_kilt_wikipedia(wiki, strict=True)
  assert err.value.line == 3

  summaries = tmp_path / "summaries.json"
  summaries.write_text(
    json.dumps(
      {
        "Zeta": {"title": "Zeta", "extract": " Zeta text. ", "description": "", "topic": "x"},
        "Alpha": {"title": "Alpha", "extract": "Alpha text.", "description": "", "topic": "x"},
      }
    )
  )
  docs = read_wiki_summaries(summaries)
  assert docs == [Document("Alpha", "Alpha text."), Document("Zeta", "Zeta text.")]
  assert set(documents_by_title(docs)) == {"Alpha", "Zeta"}
  with pytest.raises(ValueError, match="duplicate"):
    documents_by_title(docs + docs[:1])


# ---------------------------------------------------------------------------
# The synthetic world.


def test_synthetic_world_is_deterministic():
  a, b = (
    make_world(60, seed=3, questions_per_entity=2),
    make_world(60, seed=3, questions_per_entity=2),
  )
  assert a.documents == b.documents and a.tasks == b.tasks and a.people == b.people
  title = a.people[7].title
  assert a.training_texts(title) == b.training_texts(title)
  c = make_world(60, seed=4, questions_per_entity=2)
  assert c.documents != a.documents


def test_synthetic_world_names_and_gold_provenance():
  world = make_world(200, seed=0, questions_per_entity=2)
  titles = [p.title for p in world.people]
  assert len(set(titles)) == 200 == len(world.documents)
  firsts = collections.Counter(p.first_name for p in world.people)
  assert max(firsts.values()) >= 2  # shared first names, on purpose
  for task, examples in world.tasks.items():
    assert len(examples) == 400 and len({e.id for e in examples}) == 400
    for ex in examples:
      (gold,) = ex.provenance
      person = world.person(gold)
      assert ex.task == task and person.title in ex.input
      rel = ex.meta["relation"]
      if task in ("qa", "slot"):
        assert ex.answers == (person.value(rel),)
        assert person.value(rel) in world.documents[gold]
      else:
        supports = ex.answers == ("SUPPORTS",)
        assert supports == (ex.meta["claim_value"] == person.value(rel))
        assert ex.meta["claim_value"] in ex.input
  assert world.tasks["slot"][0].input.endswith(
    f"[SEP] {RELATIONS[world.tasks['slot'][0].meta['relation']].slot}"
  )


@pytest.mark.parametrize("n", [1, 7, 50])
def test_synthetic_fact_labels_are_balanced(n):
  labels = collections.Counter(e.answers[0] for e in make_world(n, seed=1).tasks["fact"])
  assert labels["SUPPORTS"] - labels["REFUTES"] == n % 2
  assert set(labels) <= {"SUPPORTS", "REFUTES"}


def test_synthetic_training_texts_use_other_wordings_than_the_questions():
  world = make_world(30, seed=2, questions_per_entity=5)
  for person in world.people:
    texts = world.training_texts(person.title)
    assert texts[0] == world.documents[person.title]
    assert sum(t.startswith("Q: ") for t in texts) == sum(len(v) for v in TRAIN_QA.values())
    questions = [
      e.input
      for task in ("qa", "slot")
      for e in world.tasks[task]
      if e.provenance == (person.title,)
    ]
    for q in questions:
      assert all(q not in t for t in texts), q
    # Every attribute value is in the training texts (the adapter can learn it).
    blob = "\n".join(texts)
    assert all(person.value(r) in blob for r in RELATIONS)


def test_synthetic_world_scales():
  start = time.perf_counter()
  world = make_world(1000, seed=0)
  texts = sum(len(world.training_texts(p.title)) for p in world.people)
  assert time.perf_counter() - start < 5
  assert len(world.documents) == 1000 and texts > 10_000
  assert len(world.knowledge()) == 1000


# ---------------------------------------------------------------------------
# FanOutQA.


def _leaf(id_: str, question: str, answer, title: str | None) -> dict:
  evidence = (
    None
    if title is None
    else {"pageid": 1, "revid": 2, "title": title, "url": f"https://en.wikipedia.org/wiki/{title}"}
  )
  return {
    "id": id_,
    "question": question,
    "decomposition": [],
    "answer": answer,
    "depends_on": [],
    "evidence": evidence,
  }


def _fanoutqa_fixture(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A FanOutQA-shaped file (nested decompositions, repeats, every answer type) + summaries."""
  capital = _leaf("cap-cn", "What is the capital of China?", "Beijing", "China")
  questions = [
    {
      "id": "m1",
      "question": "multi 1",
      "answer": {"x": 1},
      "categories": ["Geo"],
      "decomposition": [
        capital,
        _leaf("pop-mo", "What is the population of Macau?", 680000, "Macau"),
        _leaf("grav", "What is the surface gravity of Mars in g?", 0.3794, "Mars"),
        _leaf("temp", "Highest temperature in Sao Paulo?", 37.0, "São Paulo"),
        _leaf("nowhere", "A question about a page not in the summaries?", "x", "Elsewhere"),
      ],
    },
    {
      "id": "m2",
      "question": "multi 2",
      "answer": [],
      "categories": ["Misc"],
      "decomposition": [
        {
          "id": "inner",
          "question": "inner node",
          "answer": None,
          "depends_on": [],
          "evidence": None,
          "decomposition": [
            _leaf(
              "yt",
              "Who are the founders of YouTube?",
              ["Steve Chen", "Chad Hurley", "Jawed Karim"],
              "YouTube",
            ),
            _leaf("mono", "Does Kuwait have a monarchy?", True, "Kuwait"),
            _leaf("one", "Who is the head of state of France?", ["Emmanuel Macron"], "France"),
          ],
        },
        dict(capital),  # the same sub-question under a second parent
        _leaf("emp", "How many employees does Apple have?", {"Apple": 161000}, "Apple Inc."),
        _leaf(
          "wc", "Who won the world cups?", {"2022": "Argentina", "2018": "France"}, "FIFA World Cup"
        ),
      ],
    },
  ]
  qpath = tmp_path / "fanout-final-dev.json"
  qpath.write_text(json.dumps(questions))
  pages = [
    "China",
    "Macau",
    "Mars",
    "São Paulo",
    "YouTube",
    "Kuwait",
    "France",
    "Apple Inc.",
    "FIFA World Cup",
  ] + [f"Distractor {i:02d}" for i in range(20)]
  extracts = {t: f"{t} is a page." for t in pages}
  extracts["China"] = "China's capital is Beijing."
  extracts["YouTube"] = "YouTube was founded by Steve Chen, Chad Hurley, and Jawed Karim."
  spath = tmp_path / "summaries.json"
  spath.write_text(
    json.dumps(
      {t: {"title": t, "extract": x, "description": "", "topic": "t"} for t, x in extracts.items()}
    )
  )
  return qpath, spath


def test_answer_strings():
  assert answer_strings("Beijing") == (("Beijing",), None)
  assert answer_strings(680000) == (("680000",), None)
  assert answer_strings(37.0) == (("37",), None)
  assert answer_strings(0.3794) == (("0.3794",), None)
  assert answer_strings(True) == (("yes", "true"), None)
  assert answer_strings(False) == (("no", "false"), None)
  assert answer_strings([True]) == (("yes", "true"), None)
  assert answer_strings(["Emmanuel Macron"]) == (("Emmanuel Macron",), None)
  assert answer_strings(["A", ["B", 3]]) == (("A, B, 3",), ("A", "B", "3"))
  assert answer_strings({"Apple": 161000}) == (("161000",), None)
  assert answer_strings({"2022": "Argentina", "2018": "France"}) == (
    ("2022: Argentina, 2018: France",),
    ("2022", "Argentina", "2018", "France"),
  )
  for bad in (None, "", [], {}):
    with pytest.raises((ValueError, TypeError)):
      answer_strings(bad)


def test_fanoutqa_builder_on_a_fixture(tmp_path):
  qpath, spath = _fanoutqa_fixture(tmp_path)
  hops = read_single_hop(qpath)
  assert sum(h.occurrences for h in hops) == 11 and len(hops) == 10
  assert next(h for h in hops if h.id == "cap-cn").parent_ids == ("m1", "m2")

  bench = build_fanoutqa(questions_path=qpath, summaries_path=spath)
  st = bench.stats
  assert (st["grounded_occurrences"], st["questions"], st["evidence_pages"]) == (10, 9, 9)
  assert st["library_size"] == 9 and st["distractors"] == 0
  by_id = {e.id: e for e in bench.examples}
  assert "nowhere" not in by_id
  assert by_id["pop-mo"].answers == ("680000",) and by_id["temp"].answers == ("37",)
  assert by_id["yt"].meta["answer_elements"] == ["Steve Chen", "Chad Hurley", "Jawed Karim"]
  assert by_id["mono"].answers == ("yes", "true")
  assert by_id["temp"].provenance == ("São Paulo",)
  assert by_id["cap-cn"].meta["answer_in_document"] and by_id["yt"].meta["answer_in_document"]
  assert not by_id["pop-mo"].meta["answer_in_document"]
  assert all(e.task == "qa" and e.dataset == "fanoutqa" for e in bench.examples)
  assert bench.evidence_titles == tuple(sorted(bench.evidence_titles))
  # Every example belongs to the half of its page, and the halves partition the examples.
  tune, test = bench.split("tune"), bench.split("test")
  assert len(tune) + len(test) == 9
  assert all(e.meta["split"] == split_of(e.provenance[0]) for e in bench.examples)
  with pytest.raises(ValueError):
    bench.split("train")


def test_fanoutqa_answerable_only(tmp_path):
  qpath, spath = _fanoutqa_fixture(tmp_path)
  kw = {"questions_path": qpath, "summaries_path": spath}
  full = build_fanoutqa(**kw)
  only = build_fanoutqa(12, answerable_only=True, **kw)
  want = {e.id for e in full.examples if e.meta["answer_in_document"]}
  assert {e.id for e in only.examples} == want and "cap-cn" in want and "pop-mo" not in want
  assert set(only.evidence_titles) == {e.provenance[0] for e in only.examples}
  assert len(only.documents) == 12 and only.stats["answer_in_document"] == len(want)


def test_restatements_tie_each_sentence_to_the_title():
  text = (
    "Macau is a city in China.  It had 680,000 people in 2020! Is it big? yes. "
    "U.S. Army. J. F. Kennedy."
  )
  assert sentences(text) == [
    "Macau is a city in China.",
    "It had 680,000 people in 2020!",
    "Is it big? yes.",
    "U.S. Army.",
    "J. F. Kennedy.",
  ]
  out = restatements("Macau", text, max_sentences=2)
  assert out == [
    "Macau: Macau is a city in China.",
    "Macau: It had 680,000 people in 2020!",
    "Q: What is one fact about Macau? A: Macau is a city in China.",
    "Q: What is one fact about Macau? A: It had 680,000 people in 2020!",
  ]
  assert restatements("Macau", text, max_sentences=0) == []
  with pytest.raises(ValueError, match="max_sentences"):
    restatements("Macau", text, max_sentences=-1)


def test_fanoutqa_distractors_are_seeded_and_nest(tmp_path):
  qpath, spath = _fanoutqa_fixture(tmp_path)
  kw = {"questions_path": qpath, "summaries_path": spath}
  big = build_fanoutqa(25, seed=0, **kw)
  small = build_fanoutqa(15, seed=0, **kw)
  assert len(big.documents) == 25 and big.num_evidence == 9
  assert small.distractor_titles == big.distractor_titles[:6]
  assert not set(big.distractor_titles) & set(big.evidence_titles)
  assert build_fanoutqa(25, seed=0, **kw).documents == big.documents
  assert build_fanoutqa(25, seed=1, **kw).distractor_titles != big.distractor_titles
  sub = build_fanoutqa(10, num_evidence_pages=3, seed=0, **kw)
  assert sub.num_evidence == 3 and len(sub.documents) == 10
  assert {e.provenance[0] for e in sub.examples} <= set(sub.evidence_titles)
  # The distractors do not depend on the evidence sample.
  assert sub.distractor_titles == big.distractor_titles[:7]
  with pytest.raises(ValueError, match="smaller"):
    build_fanoutqa(5, **kw)
  with pytest.raises(ValueError, match="distractors"):
    build_fanoutqa(100, **kw)


def test_split_rule_is_fixed():
  # Pinned: changing the rule would silently move questions between tuning and test.
  assert [
    split_of(t)
    for t in ("Pat Burrell", "Mark Mulder", "Macau", "Star Wars", "Alpha", "Beta", "Gamma", "Delta")
  ] == ["test", "tune", "test", "test", "tune", "test", "test", "tune"]


def test_fanoutqa_rejects_other_structures(tmp_path):
  path = tmp_path / "q.json"
  path.write_text(json.dumps({"not": "a list"}))
  with pytest.raises(KiltFormatError):
    read_single_hop(path)
  path.write_text(json.dumps([{"id": "m", "decomposition": "oops"}]))
  with pytest.raises(KiltFormatError, match="decomposition"):
    read_single_hop(path)


@pytest.mark.real_assets
def test_real_fanoutqa_benchmark():
  bench = build_fanoutqa(1000)
  st = bench.stats
  assert st["single_hop_occurrences"] == 2142
  assert st["grounded_occurrences"] == 558  # ASSETS.md's count, repeats included
  assert st["questions"] == 546 and st["evidence_pages"] == 312
  assert len(bench.documents) == 1000 and st["distractors"] == 688
  assert (st["tune_questions"], st["tune_pages"]) == (239, 144)
  assert (st["test_questions"], st["test_pages"]) == (307, 168)
  assert st["skipped_answers"] == 0
  assert all(normalize_answer(a) for e in bench.examples for a in e.answers)
