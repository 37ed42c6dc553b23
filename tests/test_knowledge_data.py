"""Knowledge-adapter data from the document alone: the text steps, the rewrite filter,
the per-document generation cache, and the evaluate job's recipe fields."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from lag_jax.data.kilt import Document
from lag_jax.data.restate import anchored_sentences, cloze_spans, cloze_turns, shuffled_pages
from lag_jax.data.synthetic import make_world
from lag_jax.errors import ConfigError
from lag_jax.training.knowledge_data import (
  STEPS,
  KnowledgeRecipe,
  clean_rewrite,
  knowledge_jobs,
  knowledge_texts,
  rewrite_problem,
)

ADA = Document(
  "Ada Lovelace",
  "Ada Lovelace (1815-1852) was an English mathematician and writer. She is chiefly "
  "known for her work on Charles Babbage's Analytical Engine. Her father was Lord Byron. "
  "In 1843 she published notes on the engine. Outside work, Ada played the harp.",
)


def test_anchored_sentences_name_the_entity():
  assert anchored_sentences(ADA.title, ADA.text) == [
    "Ada Lovelace (1815-1852) was an English mathematician and writer.",
    "Ada Lovelace is chiefly known for her work on Charles Babbage's Analytical Engine.",
    "Ada Lovelace's father was Lord Byron.",
    "Ada Lovelace: In 1843 she published notes on the engine.",
    "Ada Lovelace: Outside work, Ada played the harp.",
  ]
  assert anchored_sentences("Acme Works", "The company makes gears. It was founded in 1901.") == [
    "Acme Works makes gears.",
    "Acme Works was founded in 1901.",
  ]


def test_cloze_turns_blank_one_span_that_the_page_states():
  turns = cloze_turns(ADA.title, ADA.text)
  answers = [t.split(" A: ", 1)[1] for t in turns]
  assert answers == [
    "1815",
    "1852",
    "English",
    "Charles Babbage's Analytical Engine",
    "Lord Byron",
    "1843",
    "engine",
    "harp",
  ]
  for turn, answer in zip(turns, answers, strict=True):
    assert answer in ADA.text
    question = turn.split(" A: ", 1)[0]
    assert question.count("___") == 1 and ADA.title in question
    assert question.replace("___", answer).removeprefix("Q: Fill in the blank: ").replace(
      "Ada Lovelace: ", ""
    ).replace("Ada Lovelace's father", "Her father").replace("Ada Lovelace is", "She is") in (
      ADA.text
    )
  assert len(cloze_turns(ADA.title, ADA.text, max_turns=3)) == 3
  assert cloze_turns(ADA.title, ADA.text, max_turns=0) == []
  with pytest.raises(ValueError, match="max_turns"):
    cloze_turns(ADA.title, ADA.text, max_turns=-1)
  # The title's own words are never the blank (a question names the entity).
  assert cloze_spans("Ada Lovelace", "Ada Lovelace met Ada.") == []


def test_shuffled_pages_are_seeded_permutations():
  a = shuffled_pages(ADA.title, ADA.text, 3, seed=0)
  assert a == shuffled_pages(ADA.title, ADA.text, 3, seed=0)
  assert a != shuffled_pages(ADA.title, ADA.text, 3, seed=1)
  anchored = sorted(anchored_sentences(ADA.title, ADA.text))
  for page in a:
    assert sorted(re.split(r"(?<=\.) ", page)) == anchored


def test_text_steps_use_only_the_page():
  """Every word of every non-generative text is the page's, the title's, or one of the
  steps' fixed template words: nothing comes from questions, relations or facts."""
  world = make_world(6, seed=3)
  template = set("Q: What is one fact about A: Fill in the blank: ___".replace(":", " ").split())
  recipe = KnowledgeRecipe(steps=("page", "restate", "cloze", "shuffle"))
  for doc in world.knowledge():
    by_step, dropped = knowledge_texts(doc, recipe)
    assert dropped == 0 and list(by_step) == ["page", "restate", "cloze", "shuffle"]
    page_words = set(re.findall(r"[\w'-]+", doc.text)) | template
    for texts in by_step.values():
      for t in texts:
        assert set(re.findall(r"[\w'-]+", t)) <= page_words, t
    # The texts differ from the generator's own data (paraphrases, Q/A restatements).
    generator = set(world.rewrites(doc.title) + world.qa_restatements(doc.title))
    assert not generator & {t for texts in by_step.values() for t in texts}


def test_rewrite_filter_drops_invented_facts():
  page = ADA.text
  assert rewrite_problem(ADA.title, page, "Ada Lovelace wrote notes on the engine in 1843.") is None
  assert rewrite_problem(ADA.title, page, "Lovelace was the daughter of Lord Byron.") is None
  assert "numbers" in rewrite_problem(ADA.title, page, "Ada Lovelace was born in 1816 in London.")
  assert "names" in rewrite_problem(
    ADA.title, page, "Ada Lovelace worked at Google with Alan Turing in Paris."
  )
  assert "entity" in rewrite_problem(ADA.title, page, "She was an English mathematician.")
  assert rewrite_problem(ADA.title, page, "Ada") == "too short"
  assert clean_rewrite('Sure! Here is the rewrite:\n"Ada Lovelace was a writer."') == (
    "Ada Lovelace was a writer."
  )
  assert clean_rewrite("Rewrite: Ada Lovelace was a writer.") == "Ada Lovelace was a writer."


def test_recipe_fields_are_checked():
  with pytest.raises(ConfigError, match=r"knowledge_data.steps.*'rewrites'"):
    KnowledgeRecipe.from_config({"steps": "page,rewrites"})
  with pytest.raises(ConfigError, match=r"knowledge_data.*\['shuffels'\]"):
    KnowledgeRecipe.from_config({"steps": "page", "shuffels": 2})
  with pytest.raises(ConfigError, match="rewrite_prompts"):
    KnowledgeRecipe(rewrite_prompts=0)
  assert KnowledgeRecipe.from_config({"steps": "page, cloze"}).steps == ("page", "cloze")
  assert set(KnowledgeRecipe().steps) <= set(STEPS)
  with pytest.raises(ValueError, match="rewrite"):
    knowledge_jobs([ADA], KnowledgeRecipe(steps=("page", "rewrite")))


@pytest.fixture(scope="module")
def tiny():
  from lag_jax import testing
  from lag_jax.checkpoints.safetensors_loader import load_model
  from lag_jax.text.tokenizer import Tokenizer

  folder = testing.tiny_checkpoint()
  return load_model(folder), Tokenizer.from_dir(folder)


def test_rewrites_are_generated_once_per_document_and_cached(tiny, tmp_path):
  model, tok = tiny
  docs = [Document("Ada Lovelace", "Ada wrote notes."), Document("Alan Turing", "Alan ran.")]
  recipe = KnowledgeRecipe(
    steps=("page", "rewrite"), rewrite_prompts=1, rewrite_samples=2, max_new_tokens=6
  )
  cache = str(tmp_path / "cache")
  kw = dict(model=model, tokenizer=tok, cache_dir=cache, progress=False)
  jobs, report = knowledge_jobs(docs, recipe, **kw)
  assert report.generated_documents == 2 and report.generated_tokens > 0
  assert report.kept + report.dropped == 4
  assert [j.name for j in jobs] == ["Ada Lovelace", "Alan Turing"]
  assert jobs[0].texts[0] == "Ada wrote notes."

  def read(name):
    with open(os.path.join(cache, name)) as f:
      return json.load(f)

  entries = {n: read(n) for n in os.listdir(cache) if n != "report.json"}
  assert len(entries) == 2 and all(len(e["generations"]) == 2 for e in entries.values())
  assert read("report.json")["generated_documents"] == 2

  # A rerun reads every document back; an edited page is generated again, alone.
  _, again = knowledge_jobs(docs, recipe, **kw)
  assert again.generated_documents == 0 and again.cached_tokens == report.generated_tokens
  edited = [docs[0], Document("Alan Turing", "Alan ran far.")]
  _, one = knowledge_jobs(edited, recipe, **kw)
  assert one.generated_documents == 1
  # Other sampling settings are another cache key; a damaged entry is regenerated.
  _, hot = knowledge_jobs(docs, KnowledgeRecipe(**{**vars(recipe), "temperature": 1.3}), **kw)
  assert hot.generated_documents == 2
  path = next(os.path.join(cache, n) for n in os.listdir(cache) if n.startswith("Ada"))
  with open(path, "w") as f:
    f.write("{not json")
  _, fixed = knowledge_jobs(docs, KnowledgeRecipe(**{**vars(recipe), "temperature": 1.3}), **kw)
  assert fixed.generated_documents == 1


def test_evaluate_refuses_generator_step_outside_the_people_world():
  import importlib.util

  from lag_jax.jobs import evaluate

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "wiki_fanoutqa.py")
  spec = importlib.util.spec_from_file_location("wiki_fanoutqa_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.knowledge_data.steps = "page,generator"
  with pytest.raises(ConfigError, match="knowledge_data.steps.*generator"):
    evaluate._check_config(config)


def test_injection_statistics_against_direct_computation():
  from lag_jax.eval import injection

  rng = np.random.default_rng(0)
  oracle = (rng.random(60) < 0.55).astype(float)
  floor = (rng.random(60) < 0.1).astype(float)
  ceiling = np.maximum(oracle, (rng.random(60) < 0.6).astype(float))
  # McNemar: both tails of Binomial(discordant, 1/2), enumerated.
  wins, losses = (
    int(np.sum((oracle == 1) & (floor == 0))),
    int(np.sum((oracle == 0) & (floor == 1))),
  )
  n = wins + losses
  probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
  p_obs = probs[wins]
  want = sum(p for p in probs if p <= p_obs + 1e-12)
  assert injection.mcnemar_p(oracle, floor) == pytest.approx(min(1.0, want), rel=1e-9)
  assert injection.mcnemar_p([1, 0], [1, 0]) == 1.0
  g = injection.paired_gain(oracle, floor)
  d = oracle - floor
  half = 1.959964 * d.std(ddof=1) / math.sqrt(60)
  assert g["gain"] == pytest.approx(d.mean()) and g["ci95"][1] - g["gain"] == pytest.approx(half)
  assert g["beyond_noise"] == (d.mean() - half > 0)
  # At the needed question count (and not one fewer) a gain at these rates is beyond
  # noise by the paired interval and by McNemar's exact test.
  win, loss = np.mean((oracle == 1) & (floor == 0)), np.mean((oracle == 0) & (floor == 1))

  def significant(m):
    var = win + loss - (win - loss) ** 2
    w, lo = round(win * m), round(loss * m)
    exact = injection.mcnemar_p([1] * w + [0] * lo, [0] * w + [1] * lo)
    return 1.959964 * math.sqrt(var / m) < win - loss and exact < 0.05

  m = g["questions_needed"]
  assert significant(m) and not significant(m - 1)
  assert injection.paired_gain(floor, oracle)["questions_needed"] is None
  table = injection.knowledge_injection(
    {
      "Oracle": {"qa": oracle},
      "Task only": {"qa": floor},
      "Page+Task": {"qa": ceiling},
    }
  )
  r = table["qa"]
  assert r["recovered"] == pytest.approx(oracle.mean() / ceiling.mean())
  lo, hi = r["recovered_ci95"]
  assert lo < r["recovered"] < hi
  assert r["meets_goal"] == (r["recovered"] >= 0.8)
  assert "| qa | 60 |" in injection.markdown(table)
  assert injection.knowledge_injection({"Oracle": {"qa": oracle}}) == {}


def test_kilt_path_on_written_company_files_trains_on_pages_alone(tmp_path):
  """The KILT path end to end on files it writes itself (a companies world), with the
  tiny model: every knowledge adapter records the document-only steps it trained on,
  and the report has the injection table (floor, oracle, ceiling)."""
  from tests.cli import run_cli

  proc = run_cli(
    "--config=configs/llama3_2_3b_kilt.py:tiny",
    "--config.kilt.eval_files=",
    "--config.kilt.task_train_files=",
    "--config.kilt.knowledge_source=",
    "--config.kilt.companies=3",
    "--config.kilt.num_pages=3",
    "--config.methods=Oracle,Task only,Page+Task",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = sorted(os.listdir(tmp_path / "kilt_files"))
  assert files == [
    "fever-dev-kilt.jsonl",
    "fever-train-kilt.jsonl",
    "kilt_knowledgesource.jsonl",
    "nq-dev-kilt.jsonl",
    "nq-train-kilt.jsonl",
    "structured_zeroshot-dev-kilt.jsonl",
    "structured_zeroshot-train-kilt.jsonl",
  ]
  with open(tmp_path / "results.json") as f:
    report = json.load(f)
  assert report["num_knowledge_adapters"] == 3
  assert report["knowledge_data"]["steps"] == ["page", "restate", "qa", "shuffle"]
  assert set(report["knowledge_injection"]) == {"companies_qa", "companies_slot", "companies_fact"}
  with open(tmp_path / "knowledge" / "library" / "library.json") as f:
    meta = json.load(f)
  per_step = [m["texts_per_step"] for m in meta["metadata"].values()]
  assert all(p["page"] == 1 and p["qa"] > 3 for p in per_step), per_step


def test_question_turns_ask_each_span_in_place():
  from lag_jax.data.restate import question_turns

  turns = question_turns(ADA.title, ADA.text)
  assert [a for _, a in turns] == [t.split(" A: ", 1)[1] for t in cloze_turns(ADA.title, ADA.text)]
  assert turns[0] == (
    "Ada Lovelace (which year-1852) was an English mathematician and writer?",
    "1815",
  )
  assert ("Ada Lovelace's father was what?", "Lord Byron") in turns
  assert ("About Ada Lovelace: In which year she published notes on the engine?", "1843") in turns
  for q, a in turns:
    assert ADA.title in q and q.endswith("?") and a not in q.replace(ADA.title, "")


def test_qa_step_makes_chat_pairs_with_the_answer_only_as_target(tiny):
  _, tok = tiny
  recipe = KnowledgeRecipe(steps=("page", "qa"))
  jobs, report = knowledge_jobs([ADA], recipe, tokenizer=tok, progress=False)
  (job,) = jobs
  assert job.texts == [ADA.text] and len(job.pairs) == len(cloze_turns(ADA.title, ADA.text))
  prompt, answer = job.pairs[0]
  assert answer == "1815" and "which year-1852" in prompt
  assert prompt == tok.apply_chat_template(
    [
      {
        "role": "user",
        "content": "Ada Lovelace (which year-1852) was an English mathematician and writer?",
      }
    ],
    add_generation_prompt=True,
  )
  assert job.metadata["texts_per_step"] == {"page": 1, "qa": 8}
  assert "rewrites" not in report.summary()
  with pytest.raises(ValueError, match="'qa' step needs the tokenizer"):
    knowledge_jobs([ADA], recipe)


def test_selfqa_filter_keeps_answers_the_page_states():
  from lag_jax.training.knowledge_data import selfqa_pairs

  generation = (
    "Q: Who was Ada Lovelace's father?\nA: Lord Byron.\n\n"
    "Q: What is Ada Lovelace's nationality?\nA: Not specified in the text.\n"
    "Q: When did she publish notes?\nA: 1843\n"
    "Q: Who is Ada Lovelace?\nA: Ada Lovelace\n"
    "Question 5: What did Ada Lovelace play?\nAnswer 5: the harp"
  )
  kept, dropped = selfqa_pairs(ADA.title, ADA.text, generation)
  assert kept == [
    ("Who was Ada Lovelace's father?", "Lord Byron"),
    ("About Ada Lovelace: When did she publish notes?", "1843"),
    ("What did Ada Lovelace play?", "the harp"),
  ]
  assert dropped == 2


def test_synthetic_benchmark_on_the_companies_domain(tmp_path):
  from tests.cli import run_cli

  base = ["--config=configs/demo.py:tiny", f"--workdir={tmp_path}"]
  proc = run_cli(*base, "--config.synthetic.domain=company")
  assert proc.returncode != 0
  assert "'synthetic.domain'='company'" in proc.stderr and "companies" in proc.stderr
  proc = run_cli(
    *base, "--config.synthetic.domain=companies", "--config.knowledge_data.steps=page,generator"
  )
  assert proc.returncode != 0 and "'generator' exists for the synthetic people world" in proc.stderr
  proc = run_cli(
    *base,
    "--config.synthetic.domain=companies",
    "--config.methods=Oracle,Task only,Page+Task",
    "--config.k_sweep=",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    report = json.load(f)
  assert set(report["knowledge_injection"]) == {"companies_qa", "companies_slot", "companies_fact"}
  assert set(report["methods"]) == {"Oracle", "Task only", "Page+Task"}
  assert "Knowledge injection" in (tmp_path / "results.md").read_text()


def test_fanoutqa_split_pages_only_trains_the_cited_pages(tmp_path):
  from tests.cli import run_cli

  proc = run_cli(
    "--config=configs/wiki_fanoutqa.py:tiny",
    f"--workdir={tmp_path}",
    "--config.fanoutqa.split=all",
    "--config.fanoutqa.split_pages_only=True",
    "--config.methods=Oracle,Task only,Page+Task",
    "--config.k_sweep=",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    report = json.load(f)
  cited = {p["id"] for p in report["predictions"]["Oracle"]}
  with open(tmp_path / "knowledge" / "library" / "library.json") as f:
    names = json.load(f)["names"]
  assert 1 <= len(names) <= len(cited) < 6  # the tiny library holds 6 pages
  assert set(report["knowledge_injection"]) == {"fanoutqa"}
