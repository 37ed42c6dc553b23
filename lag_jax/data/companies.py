"""A second seeded fictional world, held out: invented companies with multi-paragraph pages.

``synthetic.py``'s world (people, one short article each) is what the methods are
tuned on. This one is never used to choose anything: it tests whether knowledge
adapters trained only on documents carry their facts to questions, on pages that
look different from the tuning world's. It differs in every respect a method
could have overfitted to:

- Entities are invented companies ("Velmorant Foundry"); their names come from
  another syllable inventory than synthetic.py's and end in other suffixes
  (Works, Guild, Collective, ...), so no title of one world is a title of the other.
- Relations are other ones (``COMPANY_RELATIONS``): founding year (1850-2015),
  headquarters town, founder, main product and chief executive, with their own
  question, slot and claim wordings. Towns and products are shared between
  companies, so only the company ties a value to a question; founders and chief
  executives are invented full names, each used once in the world.
- Pages are three paragraphs of about 120-200 words, each paragraph drawn from
  three templates per company (seeded), so pages differ in wording and sentence
  order. The facts are spread over the paragraphs (the chief executive only in the
  last), several are stated about "it" / "the company" rather than the name, and
  sentences about the logo, the annual fair, the museum or the workforce carry no
  tested fact. Every tested value occurs verbatim in its page. Paragraphs are
  separated by "\\n" (KILT's Wikipedia format keeps them as a list).
- There are no training restatements: the knowledge adapters see the page only.

Tasks are KILT-style like synthetic.py's: "qa" ("Who founded X?"), "slot"
("X [SEP] founded by", Wikidata's property labels as in KILT's T-REx / zsRE) and
"fact" ("X was founded by Y." -> SUPPORTS / REFUTES, exactly balanced; a refuted
claim swaps in another value of the same relation). Provenance is the company's
title. ``write_kilt_files`` writes a world as KILT files for the ``kilt`` benchmark.

Everything is a pure function of (num_entities, seed, questions_per_entity).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import random
from typing import Any

from lag_jax.data.kilt import write_kilt
from lag_jax.data.records import Document, KiltExample
from lag_jax.files import atomic_write

__all__ = [
  "COMPANY_RELATIONS",
  "PRODUCTS",
  "Company",
  "CompanyRelation",
  "CompanyWorld",
  "make_company_world",
  "write_kilt_files",
]

# Another inventory than synthetic.py's (fewer harsh clusters, other vowels and codas),
# so that the two worlds' names do not look alike.
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ea", "ia", "oa")
_CODAS = ("", "", "", "l", "n", "r", "s", "m")
_FINALS = ("n", "r", "l", "s", "d", "x", "ck", "nt", "m", "rd")
_COMPANY_SUFFIXES = (
  "Works",
  "Collective",
  "Guild",
  "Foundry",
  "Cooperative",
  "Mills",
  "Forge",
  "Workshops",
  "Union",
  "Yards",
  "Atelier",
  "Consortium",
)
_TOWN_SUFFIXES = ("bridge", "field", "haven", "ton", "by", "well", "combe", "ley", "stow", "water")
_LAST_SUFFIXES = ("ek", "ard", "ow", "ine", "ello", "ansky", "ery", "oft")

# Main products, shared between companies; bare nouns, so that every template reads
# well for each ("its main product is rope", "mainly makes sewing machines").
PRODUCTS = (
  "bicycles",
  "rope",
  "umbrellas",
  "weather vanes",
  "sailcloth",
  "pocket watches",
  "lanterns",
  "typewriters",
  "roof tiles",
  "fishing nets",
  "garden tools",
  "barometers",
  "writing paper",
  "sewing machines",
  "church bells",
  "wool blankets",
  "tin toys",
  "canvas tents",
  "stained glass",
  "fountain pens",
)

# Filler: details that vary between pages but are never asked about.
_DESCRIPTORS = ("family-owned", "mid-sized", "privately held", "cooperatively run")
_ORIGINS = (
  "trained as a carpenter",
  "worked for years as a ship's clerk",
  "come back from a long apprenticeship abroad",
  "inherited a small workshop from an uncle",
  "spent a decade repairing machinery for farmers",
  "taught mechanics at a trade school",
)
_BUILDINGS = ("warehouse", "grain mill", "railway depot", "school building", "granary", "chapel")
_COLOURS = ("green", "blue", "red", "yellow", "grey", "brown", "violet", "white")
_EMBLEMS = ("heron", "anchor", "oak leaf", "swallow", "fox", "key", "compass rose", "beehive")
_MONTHS = ("March", "April", "May", "June", "September", "October")


@dataclasses.dataclass(frozen=True)
class CompanyRelation:
  """A company attribute with its task wordings.

  Attributes:
    slot: the relation name of slot filling ("X [SEP] founded by").
    question: the QA question, with {name}.
    claim: a fact-verification claim, with {name} and {value}.
  """

  slot: str
  question: str
  claim: str


# Question wordings differ from synthetic.py's RELATIONS (checked by a test).
COMPANY_RELATIONS: dict[str, CompanyRelation] = {
  "founded": CompanyRelation(
    "inception", "In which year was {name} founded?", "{name} was founded in {value}."
  ),
  "headquarters": CompanyRelation(
    "headquarters location",
    "In which town does {name} have its headquarters?",
    "{name} is headquartered in {value}.",
  ),
  "founder": CompanyRelation("founded by", "Who founded {name}?", "{name} was founded by {value}."),
  "product": CompanyRelation(
    "product or material produced",
    "What is the main product of {name}?",
    "{name} mainly makes {value}.",
  ),
  "chief_executive": CompanyRelation(
    "chief executive officer",
    "Who is the chief executive of {name}?",
    "The chief executive of {name} is {value}.",
  ),
}

FACT_LABELS = ("SUPPORTS", "REFUTES")

# Page templates: three variants per paragraph. Paragraph 1 states the founding
# year, founder and headquarters; paragraph 2 the main product; paragraph 3 the
# chief executive. Fields: the Company's fields() plus the filler keys drawn per
# page. Several facts are tied to "it" / "the company" / "the firm", not the name;
# every first paragraph states at least one fact that way.
_PARAGRAPH_1 = (
  "{name} is a {descriptor} company headquartered in {headquarters}. It was founded in "
  "{founded} by {founder}, who had {origin}. For its first years the business was run from "
  "a single rented room, and the company still describes that time as the one that formed "
  "its character.",
  "{name} was founded in {founded} by {founder}, who had {origin} and wanted a firm small "
  "enough for every worker to know the others by name. That wish is still quoted in the "
  "annual report. For most of its history the company has kept its headquarters in "
  "{headquarters}, in a brick building that {fpron} bought soon after the founding.",
  "The story of {name} begins in {founded}, when {founder}, who had {origin}, set up a "
  "workshop of {fpos} own. The firm that grew out of it is headquartered in {headquarters}, "
  "where its offices occupy a converted {building} close to the town centre. Local "
  "newspapers often call it one of the better-known employers of the district.",
)
_PARAGRAPH_2 = (
  "The main product of the company is {product}, and most of its income still comes from "
  "that single line. It employs about {staff} people, many of them in the workshops next to "
  "the head office. Smaller lines have come and gone over the years, but none has lasted "
  "for long.",
  "Today {name} is known above all for {product}. Its workshops supply shops, schools and "
  "public buildings, and its printed catalogue is sent to customers every spring. Around "
  "{staff} people work for the firm, a number that has changed little in recent decades.",
  "Whatever else it has tried, the firm has always come back to {product}, its main product "
  "to this day. Buyers recognise its goods by a small stamped mark, and the company keeps a "
  "record of every batch it has sold. About {staff} people are on its payroll.",
)
_PARAGRAPH_3 = (
  "The company's logo, a {colour} {emblem}, appears on everything it sells. Each {month} it "
  "holds an open fair at which visitors can watch the workshops at work. The firm is led by "
  "its chief executive, {chief_executive}, who also chairs the board of the small museum "
  "that the company keeps about its own past.",
  "{chief_executive} serves as chief executive of {name}. Under {cpos} direction the firm "
  "opened a small museum of its own history, where the first tools of the workshop are on "
  "display. Its emblem, a {colour} {emblem}, is painted above the main gate, and every "
  "{month} the company invites the public to a fair with music and guided tours.",
  "Visitors know the firm mostly from its annual fair, held every {month}, and from its "
  "logo, a {colour} {emblem}, which has barely changed since the early days. It also runs a "
  "museum in a former storeroom. Its present chief executive is {chief_executive}, who "
  "joined as an apprentice and worked in almost every department before taking charge.",
)
_PARAGRAPHS = (_PARAGRAPH_1, _PARAGRAPH_2, _PARAGRAPH_3)


@dataclasses.dataclass(frozen=True)
class Company:
  """One invented company; ``title`` (its name) is unique and names its page.

  ``founder_pronoun`` / ``executive_pronoun`` ("he" or "she") are for the page text.
  """

  title: str
  founded: int
  headquarters: str
  founder: str
  product: str
  chief_executive: str
  founder_pronoun: str
  executive_pronoun: str

  def value(self, relation: str) -> str:
    """The attribute ``relation`` (a key of COMPANY_RELATIONS) as answer text."""
    if relation not in COMPANY_RELATIONS:
      raise KeyError(f"unknown relation {relation!r}; known: {sorted(COMPANY_RELATIONS)}")
    return str(getattr(self, relation))

  def fields(self) -> dict[str, Any]:
    """Template fields: the name, every attribute, and the people's pronoun forms."""
    return {
      "name": self.title,
      "fpron": self.founder_pronoun,
      "fpos": "his" if self.founder_pronoun == "he" else "her",
      "cpos": "his" if self.executive_pronoun == "he" else "her",
      **{r: self.value(r) for r in COMPANY_RELATIONS},
    }


def _syllable(rng: random.Random, coda: bool = True) -> str:
  return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _company_stem(rng: random.Random) -> str:
  # Two or three syllables (1.2M / 180M stems, x 12 suffixes): two worlds of 1,000
  # companies share a title with probability ~2%, and write_kilt_files refuses them.
  middle = rng.choice(_ONSETS) + rng.choice(_VOWELS) if rng.random() < 0.5 else ""
  stem = _syllable(rng) + middle + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_FINALS)
  return stem.capitalize()


def _person_name(rng: random.Random, first_names: list[str]) -> str:
  middle = rng.choice(_VOWELS) + rng.choice(_ONSETS) if rng.random() < 0.5 else ""
  # Consonant before the suffix: every suffix opens with a vowel.
  last = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + middle
  return f"{rng.choice(first_names)} {last.capitalize()}{rng.choice(_LAST_SUFFIXES)}"


def _unique(rng: random.Random, n: int, make, taken: set[str] | None = None) -> list[str]:
  """``n`` distinct strings from ``make()``, none in ``taken`` (which is updated)."""
  taken = set() if taken is None else taken
  out: list[str] = []
  while len(out) < n:
    w = make()
    if w not in taken:
      taken.add(w)
      out.append(w)
  return out


def _page(company: Company, rng: random.Random) -> str:
  """The company's page: three paragraphs, each from a seeded template, joined by "\\n"."""
  fields = {
    **company.fields(),
    "descriptor": rng.choice(_DESCRIPTORS),
    "origin": rng.choice(_ORIGINS),
    "building": rng.choice(_BUILDINGS),
    # Under 1,000: no filler number reads like a year.
    "staff": 10 * rng.randint(3, 95),
    "colour": rng.choice(_COLOURS),
    "emblem": rng.choice(_EMBLEMS),
    "month": rng.choice(_MONTHS),
  }
  return "\n".join(rng.choice(templates).format(**fields) for templates in _PARAGRAPHS)


@dataclasses.dataclass(frozen=True)
class CompanyWorld:
  """A fictional world of companies (see the module doc); build it with ``make_company_world``.

  Attributes:
    seed: the generator seed.
    companies: every company, in generation order.
    documents: title -> page (three paragraphs separated by "\\n").
    tasks: "qa" / "slot" / "fact" -> examples (provenance = (gold title,)).
  """

  seed: int
  companies: tuple[Company, ...]
  documents: dict[str, str]
  tasks: dict[str, list[KiltExample]]

  @functools.cached_property
  def _by_title(self) -> dict[str, Company]:
    return {c.title: c for c in self.companies}

  def company(self, title: str) -> Company:
    """The company whose page is ``title``."""
    try:
      return self._by_title[title]
    except KeyError:
      raise KeyError(f"no company titled {title!r}") from None

  def knowledge(self) -> list[Document]:
    """The pages as Documents, in generation order (the adapter library's order)."""
    return [Document(t, text) for t, text in self.documents.items()]


def _check_int(name: str, value: Any) -> int:
  # numbers.Integral also takes numpy integers; bools are ints to Python, not counts.
  if not isinstance(value, numbers.Integral) or isinstance(value, bool):
    raise ValueError(f"{name} must be an int, got {value!r}")
  return int(value)


def make_company_world(
  num_entities: int, seed: int = 0, *, questions_per_entity: int = 1
) -> CompanyWorld:
  """Generates a world of ``num_entities`` invented companies.

  Args:
    num_entities: how many companies (each one page, one knowledge adapter).
    seed: everything is a pure function of the arguments.
    questions_per_entity: examples per company in each task, about distinct
      relations (1 to 5).
  Returns:
    The CompanyWorld; each task has ``num_entities * questions_per_entity`` examples.
  Raises:
    ValueError: a non-int argument, ``num_entities < 1``, or ``questions_per_entity``
      outside 1..5.
  """
  num_entities = _check_int("num_entities", num_entities)
  seed = _check_int("seed", seed)
  questions_per_entity = _check_int("questions_per_entity", questions_per_entity)
  if num_entities < 1:
    raise ValueError(f"num_entities must be positive, got {num_entities}")
  if not 1 <= questions_per_entity <= len(COMPANY_RELATIONS):
    raise ValueError(
      f"questions_per_entity must be in 1..{len(COMPANY_RELATIONS)}, got {questions_per_entity}"
    )
  rng = random.Random(f"lag_jax.companies:{seed}")

  # Towns shared by about five companies each; first names of founders and chief
  # executives shared too (full names are unique), so a first name alone is no cue.
  towns = _unique(
    rng,
    max(6, num_entities // 5),
    lambda: (_syllable(rng, coda=False) + rng.choice(_TOWN_SUFFIXES)).capitalize(),
  )
  first_names = _unique(
    rng,
    max(4, num_entities // 3),
    lambda: (_syllable(rng) + _syllable(rng, coda=False)).capitalize(),
  )
  first_pronoun = {f: rng.choice(("he", "she")) for f in first_names}
  titles = _unique(
    rng, num_entities, lambda: f"{_company_stem(rng)} {rng.choice(_COMPANY_SUFFIXES)}"
  )
  # Every founder and chief executive is a different person.
  people = _unique(rng, 2 * num_entities, lambda: _person_name(rng, first_names))

  companies: list[Company] = []
  documents: dict[str, str] = {}
  for i, title in enumerate(titles):
    founder, executive = people[2 * i], people[2 * i + 1]
    c = Company(
      title=title,
      founded=rng.randint(1850, 2015),
      headquarters=rng.choice(towns),
      founder=founder,
      product=rng.choice(PRODUCTS),
      chief_executive=executive,
      founder_pronoun=first_pronoun[founder.split()[0]],
      executive_pronoun=first_pronoun[executive.split()[0]],
    )
    companies.append(c)
    documents[title] = _page(c, rng)

  relations = list(COMPANY_RELATIONS)
  pools = {r: sorted({c.value(r) for c in companies}) for r in relations}

  qa: list[KiltExample] = []
  slot: list[KiltExample] = []
  fact_rows: list[tuple[int, Company, str]] = []
  for i, c in enumerate(companies):
    for r in rng.sample(relations, questions_per_entity):
      qa.append(
        KiltExample(
          id=f"comp-qa-{i:05d}-{r}",
          input=COMPANY_RELATIONS[r].question.format(name=c.title),
          answers=(c.value(r),),
          provenance=(c.title,),
          task="qa",
          meta={"dataset": "companies_qa", "relation": r, "entity": c.title},
        )
      )
    for r in rng.sample(relations, questions_per_entity):
      slot.append(
        KiltExample(
          id=f"comp-slot-{i:05d}-{r}",
          input=f"{c.title} [SEP] {COMPANY_RELATIONS[r].slot}",
          answers=(c.value(r),),
          provenance=(c.title,),
          task="slot",
          meta={"dataset": "companies_slot", "relation": r, "entity": c.title},
        )
      )
    for r in rng.sample(relations, questions_per_entity):
      fact_rows.append((i, c, r))

  # Exactly balanced labels (the extra one of an odd count is SUPPORTS), in seeded order.
  n_fact = len(fact_rows)
  labels = ["SUPPORTS"] * ((n_fact + 1) // 2) + ["REFUTES"] * (n_fact // 2)
  rng.shuffle(labels)
  fact: list[KiltExample] = []
  for (i, c, r), label in zip(fact_rows, labels):
    true_value = c.value(r)
    value = true_value
    if label == "REFUTES":
      others = [v for v in pools[r] if v != true_value]
      if not others:  # a world where every company shares the value (e.g. one company)
        others = _fallback_values(r, true_value, rng, first_names)
      value = rng.choice(others)
    fact.append(
      KiltExample(
        id=f"comp-fact-{i:05d}-{r}",
        input=COMPANY_RELATIONS[r].claim.format(name=c.title, value=value),
        answers=(label,),
        provenance=(c.title,),
        task="fact",
        meta={
          "dataset": "companies_fact",
          "relation": r,
          "entity": c.title,
          "claim_value": value,
          "true_value": true_value,
        },
      )
    )

  return CompanyWorld(
    seed=seed,
    companies=tuple(companies),
    documents=documents,
    tasks={"qa": qa, "slot": slot, "fact": fact},
  )


def _fallback_values(
  relation: str, true_value: str, rng: random.Random, first_names: list[str]
) -> list[str]:
  """Values other than ``true_value`` to refute with when the world has no other one."""
  if relation == "founded":
    return [str(y) for y in range(1850, 2016) if str(y) != true_value]
  if relation == "product":
    return [p for p in PRODUCTS if p != true_value]
  if relation == "headquarters":
    return _unique(
      rng,
      3,
      lambda: (_syllable(rng, coda=False) + rng.choice(_TOWN_SUFFIXES)).capitalize(),
      {true_value},
    )
  return _unique(rng, 3, lambda: _person_name(rng, first_names), {true_value})


# ---------------------------------------------------------------------------
# KILT files.

# Task -> KILT dataset whose file name makes read_kilt / the kilt benchmark map the
# file back to the same task family (KILT_DATASETS: nq -> qa, ...).
_KILT_FILES = {
  "qa": "nq-{split}-kilt.jsonl",
  "slot": "structured_zeroshot-{split}-kilt.jsonl",
  "fact": "fever-{split}-kilt.jsonl",
}
KNOWLEDGE_SOURCE = "kilt_knowledgesource.jsonl"


def write_kilt_files(
  world: CompanyWorld, train_world: CompanyWorld, folder: str | os.PathLike[str]
) -> dict[str, str]:
  """Writes ``world`` as KILT dev files, ``train_world`` as KILT train files, and both pages.

  Files (in ``folder``, created if missing; each written atomically):
  ``nq-dev-kilt.jsonl`` (qa), ``structured_zeroshot-dev-kilt.jsonl`` (slot),
  ``fever-dev-kilt.jsonl`` (fact), the same with ``-train-`` from ``train_world``,
  and ``kilt_knowledgesource.jsonl`` in KILT's Wikipedia format
  (``{"wikipedia_id", "wikipedia_title", "text": [title, paragraph, ...]}``) with
  ``world``'s pages then ``train_world``'s; the kilt benchmark keeps the pages the
  dev files cite, and drops train examples whose provenance is among them.
  Examples keep their ``meta["dataset"]`` ("companies_qa", ...), which ``read_kilt``
  prefers to the file name's; the task family comes from the record's ``task``
  field and agrees with the file name's dataset.

  Args:
    world: the evaluation world (dev files).
    train_world: another world for the task adapters (train files); no title may
      be shared with ``world``, else its train examples would cite library pages.
  Returns:
    {"eval_files": the three dev paths, comma-separated, "task_train_files": the
    three train paths, comma-separated, "knowledge_source": its path}, as the
    ``kilt`` config fields of the same names take them.
  Raises:
    ValueError: if the worlds share a title, or the folder's path has a comma (the
      file lists are comma-separated).
  """
  folder = os.fspath(folder)
  if "," in folder:
    raise ValueError(f"folder {folder!r} has a comma; the returned file lists are comma-separated")
  shared = sorted(set(world.documents) & set(train_world.documents))
  if shared:
    raise ValueError(
      f"world (seed {world.seed}) and train_world (seed {train_world.seed}) share "
      f"{len(shared)} titles, e.g. {shared[:3]}; use another seed for train_world"
    )
  os.makedirs(folder, exist_ok=True)
  out: dict[str, list[str]] = {"eval_files": [], "task_train_files": []}
  for key, split, w in (("eval_files", "dev", world), ("task_train_files", "train", train_world)):
    for task, pattern in _KILT_FILES.items():
      path = os.path.join(folder, pattern.format(split=split))
      write_kilt(path, w.tasks[task])
      out[key].append(path)
  pages = [
    json.dumps(
      {"wikipedia_id": title, "wikipedia_title": title, "text": [title, *text.split("\n")]},
      ensure_ascii=False,
    )
    for w in (world, train_world)
    for title, text in w.documents.items()
  ]
  knowledge_source = os.path.join(folder, KNOWLEDGE_SOURCE)
  with atomic_write(knowledge_source) as f:
    f.writelines(page + "\n" for page in pages)
  return {
    "eval_files": ",".join(out["eval_files"]),
    "task_train_files": ",".join(out["task_train_files"]),
    "knowledge_source": knowledge_source,
  }
