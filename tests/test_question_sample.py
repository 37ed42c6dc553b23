"""The evaluate job's question draw on the synthetic world: the library's people only,
per-task counts, and disjoint tuning / test halves that together are the draw."""

import pytest

from lag_jax.data.synthetic import make_world
from lag_jax.errors import ConfigError
from lag_jax.jobs.evaluate import sample_questions


@pytest.fixture(scope="module")
def world():
  return make_world(40, seed=3)


def _ids(exs):
  return [ex.id for ex in exs]


def test_halves_are_disjoint_and_make_the_draw(world):
  people = [p.title for p in world.people[:25]]
  tasks = {t: world.tasks[t] for t in ("qa", "slot", "fact")}
  full = sample_questions(tasks, people, 10, "all", seed=0)
  tune = sample_questions(tasks, people, 10, "tune", seed=0)
  test = sample_questions(tasks, people, 10, "test", seed=0)
  assert len(full) == 30 and len(tune) == len(test) == 15
  assert not set(_ids(tune)) & set(_ids(test))
  assert set(_ids(tune)) | set(_ids(test)) == set(_ids(full))
  for task in tasks:
    assert sum(ex.task == task for ex in tune) == 5
  assert {ex.provenance[0] for ex in full} <= set(people)
  # Seeded: the same draw twice, another one with another seed.
  assert _ids(full) == _ids(sample_questions(tasks, people, 10, "all", seed=0))
  assert _ids(full) != _ids(sample_questions(tasks, people, 10, "all", seed=1))


def test_zero_means_every_question_on_the_people(world):
  people = [p.title for p in world.people[:7]]
  got = sample_questions({"qa": world.tasks["qa"]}, people, 0, "all", seed=0)
  assert _ids(got) == [ex.id for ex in world.tasks["qa"] if ex.provenance[0] in people]


def test_bad_split_names_the_field(world):
  with pytest.raises(ConfigError, match="synthetic.split"):
    sample_questions({"qa": world.tasks["qa"]}, [], 0, "dev", seed=0)


def test_routing_scale_requests_come_from_one_half():
  """routing_scale with synthetic.split draws its requests from that half of the evaluate
  job's questions only: routers chosen on the tuning half never see a test question."""
  from lag_jax.data.synthetic import make_world
  from lag_jax.jobs.evaluate import sample_questions
  from lag_jax.jobs.routing_scale import pick_requests

  world = make_world(20, seed=0)
  examples = [ex for t in ("qa", "slot", "fact") for ex in world.tasks[t]]
  names = [ex.provenance[0] for ex in world.tasks["qa"]][:10]
  tune = pick_requests(examples, names, 0, 0, (200, "tune"))
  test = pick_requests(examples, names, 0, 0, (200, "test"))
  assert tune and test and not {ex.id for ex in tune} & {ex.id for ex in test}
  want = sample_questions(world.tasks, names, 200, "tune", 0)
  assert sorted(ex.id for ex in tune) == sorted(ex.id for ex in want)
  assert len(pick_requests(examples, names, 0, 0)) == len(tune) + len(test)
  assert len(pick_requests(examples, names, 5, 0, (200, "tune"))) == 5
