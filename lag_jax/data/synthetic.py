"""A seeded fictional world: invented people, one article each, and KILT-style tasks over them.

The base model cannot know these people, so whatever a method answers right must
come from the knowledge adapters, and the gold adapter of every question is known
(its provenance), so routing accuracy can be measured exactly.

- People have invented names built from syllables: full names are unique, but
  first names come from a small pool on purpose (about three people per first
  name): people sharing a first name are the hard confusions for routing.
- Attributes: birth year (1901-1999), birthplace (an invented city), occupation,
  employer (an invented company) and the instrument they play. Cities, companies,
  occupations and instruments are shared between people, so only the person ties
  a value to a question.
- ``World.documents``: title (the full name) -> a short encyclopedic article.
- ``World.training_texts(title)``: the article, paraphrases of it from fixed
  templates, and Q/A-style restatements ("Q: ... A: ...") for adapter training.
  The Q/A wordings are deliberately different from the evaluation questions
  (``TRAIN_QA`` vs ``RELATIONS[...].question``), so that a method is tested on the
  fact, not on a memorised string.
- ``World.tasks``: "qa" ("In which city was X born?"), "slot" ("X [SEP] place of
  birth", as KILT's zsRE / T-REx) and "fact" ("X was born in Y." -> SUPPORTS or
  REFUTES, exactly balanced; a refuted claim swaps in another value of the same
  attribute). Each example's provenance is its person's title.

Everything is a pure function of (num_entities, seed, questions_per_entity);
1,000 people take a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any

from lag_jax.data.records import Document, KiltExample

__all__ = ["RELATIONS", "TRAIN_QA", "Person", "Relation", "World", "make_world"]

_ONSETS = (
  "b",
  "br",
  "d",
  "dr",
  "f",
  "g",
  "gr",
  "k",
  "kr",
  "l",
  "m",
  "n",
  "p",
  "r",
  "s",
  "t",
  "th",
  "v",
  "z",
  "sh",
  "ch",
  "q",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd")
_CITY_SUFFIXES = ("holm", "stead", "ford", "vik", "mouth", "grad", "wick", "port", "dale", "moor")
_COMPANY_KINDS = (
  "Instruments",
  "Shipping",
  "Textiles",
  "Laboratories",
  "Press",
  "Foods",
  "Mining",
  "Analytics",
  "Ceramics",
  "Railways",
  "Optics",
  "Pharmaceuticals",
)
OCCUPATIONS = (
  "cartographer",
  "glassblower",
  "marine biologist",
  "architect",
  "pharmacist",
  "locksmith",
  "astronomer",
  "translator",
  "beekeeper",
  "land surveyor",
  "bookbinder",
  "chemist",
  "stonemason",
  "librarian",
  "clockmaker",
  "geologist",
  "typesetter",
  "botanist",
  "veterinarian",
  "structural engineer",
)
INSTRUMENTS = (
  "oboe",
  "cello",
  "harp",
  "accordion",
  "bassoon",
  "mandolin",
  "trombone",
  "zither",
  "banjo",
  "clarinet",
  "harpsichord",
  "bagpipes",
  "viola",
  "tuba",
)


@dataclasses.dataclass(frozen=True)
class Relation:
  """An attribute with its task wordings (the evaluation's, never used for training).

  Attributes:
    slot: the relation name of slot filling ("X [SEP] place of birth").
    question: the QA question, with {name}.
    claim: a fact-verification claim, with {name} and {value}.
  """

  slot: str
  question: str
  claim: str


RELATIONS: dict[str, Relation] = {
  "birthplace": Relation(
    "place of birth", "In which city was {name} born?", "{name} was born in {value}."
  ),
  "birth_year": Relation(
    "date of birth", "In what year was {name} born?", "{name} was born in the year {value}."
  ),
  "occupation": Relation(
    "occupation", "What is the occupation of {name}?", "{name} works as a {value}."
  ),
  "employer": Relation(
    "employer", "Which company does {name} work for?", "{name} is employed by {value}."
  ),
  "instrument": Relation(
    "instrument", "Which musical instrument does {name} play?", "{name} plays the {value}."
  ),
}

# Q/A restatements for training: other wordings than RELATIONS' questions.
TRAIN_QA: dict[str, tuple[str, ...]] = {
  "birthplace": (
    "Q: Where is {name} from? A: {name} is from {value}.",
    "Q: What is the hometown of {name}? A: {value}.",
  ),
  "birth_year": (
    "Q: When was {name} born? A: {value}.",
    "Q: What is {name}'s year of birth? A: {name} was born in {value}.",
  ),
  "occupation": (
    "Q: What does {name} do for a living? A: {name} is a {value}.",
    "Q: What is {name}'s profession? A: {value}.",
  ),
  "employer": (
    "Q: Where does {name} work? A: At {value}.",
    "Q: Who is {name}'s employer? A: {value}.",
  ),
  "instrument": (
    "Q: What instrument is {name} known for playing? A: The {value}.",
    "Q: What does {name} play in their free time? A: {name} plays the {value}.",
  ),
}

# Paraphrases of the article (all attributes in each), for adapter training.
_REWRITES = (
  "Born in {birthplace} in {birth_year}, {name} became a {occupation}. {Pron} is employed "
  "by {employer} and is known for playing the {instrument}.",
  "{name}\nBirth year: {birth_year}\nBirthplace: {birthplace}\nOccupation: {occupation}\n"
  "Employer: {employer}\nInstrument: {instrument}",
  "{employer} employs {name}, a {occupation} who was born in {birth_year}. {name} grew up "
  "in {birthplace} and plays the {instrument}.",
  "The {occupation} {name} comes from {birthplace}. Born in {birth_year}, {name} works at "
  "{employer}; in {pos} spare time {pron} plays the {instrument}.",
  "{name}'s hometown is {birthplace}, where {pron} was born in {birth_year}. Today {name} "
  "works for {employer} as a {occupation}, and {pron} is a keen {instrument} player.",
)

_ARTICLE = (
  "{name} (born {birth_year}) is a {occupation} from {birthplace}. {name} was born in "
  "{birthplace} in {birth_year}. {Pron} works for {employer}. Outside work, {name} plays "
  "the {instrument}, an instrument {pron} took up as a child."
)

FACT_LABELS = ("SUPPORTS", "REFUTES")


@dataclasses.dataclass(frozen=True)
class Person:
  """One invented person; ``title`` (the full name) is unique and names their article."""

  title: str
  first_name: str
  last_name: str
  pronoun: str  # "he" or "she"
  birth_year: int
  birthplace: str
  occupation: str
  employer: str
  instrument: str

  def value(self, relation: str) -> str:
    """The attribute ``relation`` (a key of RELATIONS) as answer text."""
    if relation not in RELATIONS:
      raise KeyError(f"unknown relation {relation!r}; known: {sorted(RELATIONS)}")
    return str(getattr(self, relation))

  def fields(self) -> dict[str, Any]:
    """Template fields: attributes, name and pronoun forms."""
    pos = "his" if self.pronoun == "he" else "her"
    return {
      "name": self.title,
      "pron": self.pronoun,
      "Pron": self.pronoun.capitalize(),
      "pos": pos,
      **{r: self.value(r) for r in RELATIONS},
    }


def _syllable(rng: random.Random, coda: bool = True) -> str:
  return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _unique_words(rng: random.Random, n: int, make) -> list[str]:
  out: list[str] = []
  seen: set[str] = set()
  while len(out) < n:
    w = make()
    if w not in seen:
      seen.add(w)
      out.append(w)
  return out


@dataclasses.dataclass(frozen=True)
class World:
  """A fictional world (see the module doc); build it with ``make_world``.

  Attributes:
    seed: the generator seed.
    people: every person, in generation order.
    documents: title -> article.
    tasks: "qa" / "slot" / "fact" -> examples (provenance = (gold title,)).
  """

  seed: int
  people: tuple[Person, ...]
  documents: dict[str, str]
  tasks: dict[str, list[KiltExample]]

  @functools.cached_property
  def _by_title(self) -> dict[str, Person]:
    return {p.title: p for p in self.people}

  def person(self, title: str) -> Person:
    """The person whose article is ``title``."""
    try:
      return self._by_title[title]
    except KeyError:
      raise KeyError(f"no person titled {title!r}") from None

  def knowledge(self) -> list[Document]:
    """The articles as Documents, in generation order (the adapter library's order)."""
    return [Document(t, text) for t, text in self.documents.items()]

  def rewrites(self, title: str) -> list[str]:
    """Paraphrases of the article from fixed templates."""
    f = self.person(title).fields()
    return [t.format(**f) for t in _REWRITES]

  def qa_restatements(self, title: str) -> list[str]:
    """ "Q: ... A: ..." texts in training-only wordings, two per attribute."""
    p = self.person(title)
    return [
      t.format(name=p.title, value=p.value(rel))
      for rel, templates in TRAIN_QA.items()
      for t in templates
    ]

  def training_texts(self, title: str) -> list[str]:
    """Everything to train ``title``'s knowledge adapter on: article, rewrites, Q/A texts."""
    return [self.documents[title], *self.rewrites(title), *self.qa_restatements(title)]


def make_world(num_entities: int, seed: int = 0, *, questions_per_entity: int = 1) -> World:
  """Generates a world of ``num_entities`` invented people.

  Args:
    num_entities: how many people (each one article, one knowledge adapter).
    seed: everything is a pure function of the arguments.
    questions_per_entity: examples per person in each task, about distinct
      attributes (1 to 5).
  Returns:
    The World; each task has ``num_entities * questions_per_entity`` examples.
  """
  if num_entities < 1:
    raise ValueError(f"num_entities must be positive, got {num_entities}")
  if not 1 <= questions_per_entity <= len(RELATIONS):
    raise ValueError(f"questions_per_entity must be in 1..{len(RELATIONS)}")
  rng = random.Random(f"lag_jax.synthetic:{seed}")

  # About three people per first name, so that first names are shared on purpose.
  n_first = max(2, num_entities // 3)
  first_names = _unique_words(
    rng, n_first, lambda: (_syllable(rng, coda=False) + _syllable(rng)).capitalize()
  )
  first_pronoun = {f: rng.choice(("he", "she")) for f in first_names}
  n_places = max(8, num_entities // 6)
  cities = _unique_words(
    rng, n_places, lambda: (_syllable(rng, coda=False) + rng.choice(_CITY_SUFFIXES)).capitalize()
  )
  companies = _unique_words(
    rng,
    n_places,
    lambda: (
      f"{(_syllable(rng, coda=False) + _syllable(rng)).capitalize()} {rng.choice(_COMPANY_KINDS)}"
    ),
  )

  people: list[Person] = []
  titles: set[str] = set()
  while len(people) < num_entities:
    first = rng.choice(first_names)
    last = (_syllable(rng, coda=False) + _syllable(rng, coda=False) + _syllable(rng)).capitalize()
    title = f"{first} {last}"
    if title in titles:
      continue
    titles.add(title)
    people.append(
      Person(
        title=title,
        first_name=first,
        last_name=last,
        pronoun=first_pronoun[first],
        birth_year=rng.randint(1901, 1999),
        birthplace=rng.choice(cities),
        occupation=rng.choice(OCCUPATIONS),
        employer=rng.choice(companies),
        instrument=rng.choice(INSTRUMENTS),
      )
    )

  documents = {p.title: _ARTICLE.format(**p.fields()) for p in people}
  relations = list(RELATIONS)
  pools = {r: sorted({p.value(r) for p in people}) for r in relations}

  qa: list[KiltExample] = []
  slot: list[KiltExample] = []
  fact_rows: list[tuple[int, Person, str]] = []
  for i, p in enumerate(people):
    for r in rng.sample(relations, questions_per_entity):
      meta = {"dataset": "synthetic_qa", "relation": r, "entity": p.title}
      qa.append(
        KiltExample(
          id=f"synth-qa-{i:05d}-{r}",
          input=RELATIONS[r].question.format(name=p.title),
          answers=(p.value(r),),
          provenance=(p.title,),
          task="qa",
          meta=meta,
        )
      )
    for r in rng.sample(relations, questions_per_entity):
      meta = {"dataset": "synthetic_slot", "relation": r, "entity": p.title}
      slot.append(
        KiltExample(
          id=f"synth-slot-{i:05d}-{r}",
          input=f"{p.title} [SEP] {RELATIONS[r].slot}",
          answers=(p.value(r),),
          provenance=(p.title,),
          task="slot",
          meta=meta,
        )
      )
    for r in rng.sample(relations, questions_per_entity):
      fact_rows.append((i, p, r))

  # Exactly balanced labels (the extra one of an odd count is SUPPORTS), in seeded order.
  n_fact = len(fact_rows)
  labels = ["SUPPORTS"] * ((n_fact + 1) // 2) + ["REFUTES"] * (n_fact // 2)
  rng.shuffle(labels)
  fact: list[KiltExample] = []
  for (i, p, r), label in zip(fact_rows, labels):
    true_value = p.value(r)
    value = true_value
    if label == "REFUTES":
      others = [v for v in pools[r] if v != true_value]
      if not others:  # a tiny world where everyone shares the value: pick any other
        others = [v for v in _fallback_values(r) if v != true_value]
      value = rng.choice(others)
    meta = {
      "dataset": "synthetic_fact",
      "relation": r,
      "entity": p.title,
      "claim_value": value,
      "true_value": true_value,
    }
    fact.append(
      KiltExample(
        id=f"synth-fact-{i:05d}-{r}",
        input=RELATIONS[r].claim.format(name=p.title, value=value),
        answers=(label,),
        provenance=(p.title,),
        task="fact",
        meta=meta,
      )
    )

  return World(
    seed=seed,
    people=tuple(people),
    documents=documents,
    tasks={"qa": qa, "slot": slot, "fact": fact},
  )


def _fallback_values(relation: str) -> list[str]:
  """Values to refute with when the world has a single value for ``relation``."""
  if relation == "occupation":
    return list(OCCUPATIONS)
  if relation == "instrument":
    return list(INSTRUMENTS)
  if relation == "birth_year":
    return [str(y) for y in range(1901, 2000)]
  if relation == "birthplace":
    return [s.capitalize() + "ton" for s in ("varn", "quel", "mirr")]
  return ["Zorvel Optics", "Quellin Press", "Dravos Mining"]
