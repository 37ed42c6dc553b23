"""The vote taken apart (lag_jax/eval/routing_analysis.py) on hand-made choices whose
answers are known, and against a brute-force recount of the vote."""

import numpy as np

from lag_jax.eval import routing_analysis as ra

# Token types: 0 entity, 1 question, 2 template.
TYPES = np.array([2, 0, 0, 1, 1, 2], np.int8)


def _rec(gate, up):
  return {"types": TYPES, "ids": {"gate_proj": np.array(gate), "up_proj": np.array(up)}}


def test_known_answers():
  # Request 0 (gold 1): entity tokens pick 1, question tokens pick 2 in both layers of
  # gate; up picks 1 everywhere on the question: tally 1: 4 + 8 = 12, 2: 4 -> rank 1.
  r0 = _rec([[9, 1, 1, 2, 2, 9], [9, 1, 1, 2, 2, 9]], [[9, 1, 1, 1, 1, 9], [9, 1, 1, 1, 1, 9]])
  # Request 1 (gold 0): everything picks 3 except the entity tokens of layer 1 in gate.
  r1 = _rec([[3, 3, 3, 3, 3, 3], [3, 0, 0, 3, 3, 3]], [[3, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3]])
  names = ["a", "b", "c", "d"]
  attrs = {n: {"first name": "x" if n in ("a", "d") else "y"} for n in names}
  a = ra.analyse([r0, r1, r0], [1, 0, -1], names, attrs)
  assert a["requests"] == 2 and a["vote_acc"] == 0.5
  assert a["gold_rank"]["1"] == 1 and a["gold_rank"]["2"] == 1
  # r1: tally 3: 14, 0: 2 -> margin (2 - 14) / 16.
  assert np.isclose(a["median_margin"], np.median([(12 - 4) / 16, (2 - 14) / 16]))
  gate = a["by_module_layer"]["gate_proj"]
  assert gate["entity"] == [0.5, 1.0] and gate["question"] == [0.0, 0.0]
  assert a["by_module_layer"]["up_proj"]["question"] == [0.5, 0.5]
  v = a["votes_restricted"]
  assert v["entity tokens only"] == 0.5  # r1's entity tokens: 3 x6, 0 x2
  assert v["module up_proj only"] == 0.5
  assert a["confusions"]["wrong"] == 1 and a["confusions"]["same first name"] == 1.0
  assert a["by_entity_position"] == {"0": 5 / 8, "1": 5 / 8}
  assert "rank" in ra.markdown(a, "t")


def test_the_vote_matches_a_recount():
  rng = np.random.default_rng(0)
  N, L, T = 7, 4, 6
  recs, gold = [], []
  for _ in range(40):
    recs.append(
      {
        "types": rng.integers(0, 3, T).astype(np.int8),
        "ids": {m: rng.integers(0, N, (L, T)) for m in ("gate_proj", "down_proj")},
      }
    )
    gold.append(int(rng.integers(0, N)))
  a = ra.analyse(recs, gold, [str(i) for i in range(N)])
  right = 0
  for r, g in zip(recs, gold):
    q = r["types"] <= 1
    if not q.any():
      q[:] = True
    counts = np.zeros(N, int)
    for ids in r["ids"].values():
      np.add.at(counts, ids[:, q].ravel(), 1)
    right += int(np.argmax(counts)) == g
  assert a["vote_acc"] == right / 40
  assert a["votes_restricted"]["question tokens, all layers and modules (the vote)"] == right / 40
