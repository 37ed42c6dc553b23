"""Why a request-level vote picks the wrong adapter: where the per-token choices go.

Input: a per-token router's choices over each request's prompt (``run_method(...,
keep_routing=True).routing_ids``): for every knowledge module, the adapter each layer
chose at each prompt token ([L, T]), with the tokens' types (entity / question /
template). The vote of ``Vote`` counts exactly these choices over the question's
tokens, every layer and module; this module takes that vote apart:

- ``gold_rank``: where the gold adapter ranks in each request's tally (1 = the vote is
  right), and the margin between the winner's count and the gold adapter's;
- ``by_module_layer``: the share of entity-token and question-token decisions that pick
  the gold adapter, per module and layer (which layers mislead the vote);
- ``by_entity_position``: the same by the token's place in the entity's name (the
  first name is shared by several people of the synthetic world, the last is not);
- ``votes_restricted``: request accuracy of the vote when only some tokens or layers
  count (entity tokens only: an upper bound for locating the name data-free; each
  third of the layers; each module);
- ``confusions``: for the requests the vote gets wrong, what the winner shares with the
  gold person (first name, birthplace, employer, occupation, instrument).

Shapes: L layers, T prompt tokens, N adapters.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np

ENTITY, QUESTION = 0, 1


def _tally(rec: dict, tokens: Callable[[np.ndarray], np.ndarray], layers=None, modules=None):
  """Counts per adapter over the selected tokens, layers and modules: Counter."""
  sel = tokens(rec["types"])
  counts = collections.Counter()
  for m, ids in rec["ids"].items():
    if modules is not None and m not in modules:
      continue
    chosen = ids[:, sel] if layers is None else ids[layers][:, sel]
    chosen = chosen[chosen >= 0]
    counts.update(chosen.tolist())
  return counts


def _winner(counts: collections.Counter) -> int:
  """The most chosen adapter, ties to the lower id (as the vote); -1 when empty."""
  if not counts:
    return -1
  best = max(counts.values())
  return min(a for a, c in counts.items() if c == best)


def _question(types: np.ndarray) -> np.ndarray:
  sel = types <= QUESTION
  return sel if sel.any() else np.ones_like(sel)


def _entity(types: np.ndarray) -> np.ndarray:
  sel = types == ENTITY
  return sel if sel.any() else _question(types)


def analyse(
  records: Sequence[dict],
  gold: Sequence[int],
  names: Sequence[str],
  attributes: dict[str, dict[str, str]] | None = None,
) -> dict:
  """Takes the question-token vote apart (see the module docstring).

  Args:
    records: per request, {"types": [T] int8, "ids": module -> [L, T] int}.
    gold: per request, the gold adapter id (-1: skipped).
    names: adapter names (for the confusion examples).
    attributes: optional name -> {attribute: value} (e.g. the synthetic world's
      first_name, birthplace, ...), compared between winner and gold.
  Returns:
    A JSON-ready dict.
  """
  rows = [(r, g) for r, g in zip(records, gold, strict=True) if g >= 0]
  if not rows:
    raise ValueError("routing analysis: no request with a gold adapter")
  modules = sorted(rows[0][0]["ids"])
  L = rows[0][0]["ids"][modules[0]].shape[0]

  ranks, margins, wrong = [], [], []
  for rec, g in rows:
    counts = _tally(rec, _question)
    order = sorted(counts, key=lambda a: (-counts[a], a))
    rank = order.index(g) + 1 if g in counts else None
    ranks.append(rank)
    total = max(sum(counts.values()), 1)
    best_other = max((c for a, c in counts.items() if a != g), default=0)
    margins.append((counts.get(g, 0) - best_other) / total)
    win = _winner(counts)
    if win != g:
      wrong.append((g, win))
  n = len(rows)
  bins = {"1": 0, "2": 0, "3-5": 0, "6-20": 0, ">20": 0, "absent": 0}
  for r in ranks:
    key = (
      "absent"
      if r is None
      else "1"
      if r == 1
      else "2"
      if r == 2
      else "3-5"
      if r <= 5
      else "6-20"
      if r <= 20
      else ">20"
    )
    bins[key] += 1

  by_ml = {}
  for m in modules:
    ent_c, ent_t = np.zeros(L), np.zeros(L)
    q_c, q_t = np.zeros(L), np.zeros(L)
    for rec, g in rows:
      ids, ty = rec["ids"][m], rec["types"]
      ent, q = ty == ENTITY, ty == QUESTION
      ent_c += (ids[:, ent] == g).sum(1)
      ent_t += ent.sum()
      q_c += (ids[:, q] == g).sum(1)
      q_t += q.sum()
    by_ml[m] = {
      "entity": (ent_c / np.maximum(ent_t, 1)).tolist(),
      "question": (q_c / np.maximum(q_t, 1)).tolist(),
    }

  pos_c, pos_t = collections.Counter(), collections.Counter()
  for rec, g in rows:
    where = np.flatnonzero(rec["types"] == ENTITY)
    for p, t in enumerate(where):
      key = str(min(p, 4)) if p < 4 else "4+"
      for ids in rec["ids"].values():
        pos_c[key] += int((ids[:, t] == g).sum())
        pos_t[key] += ids.shape[0]
  by_pos = {k: pos_c[k] / pos_t[k] for k in sorted(pos_t)}

  thirds = np.array_split(np.arange(L), 3)
  restricted = {
    "question tokens, all layers and modules (the vote)": _acc(rows, _question),
    "entity tokens only": _acc(rows, _entity),
  }
  for name, layers in zip(("first", "middle", "last"), thirds, strict=True):
    if not len(layers):
      continue
    restricted[f"{name} third of layers ({layers[0]}-{layers[-1]})"] = _acc(
      rows, _question, layers=layers
    )
    restricted[f"entity tokens, {name} third"] = _acc(rows, _entity, layers=layers)
  for m in modules:
    restricted[f"module {m} only"] = _acc(rows, _question, modules={m})

  confusions = {"wrong": len(wrong)}
  if attributes and wrong:
    keys = sorted(next(iter(attributes.values())))
    for key in keys:
      same = sum(
        1
        for g, w in wrong
        if w >= 0 and attributes[names[g]].get(key) == attributes[names[w]].get(key)
      )
      confusions[f"same {key}"] = same / len(wrong)
  confusions["examples"] = [
    {"gold": names[g], "winner": names[w] if w >= 0 else None} for g, w in wrong[:10]
  ]
  return {
    "requests": n,
    "vote_acc": bins["1"] / n,
    "gold_rank": bins,
    "median_margin": float(np.median(margins)),
    "by_module_layer": by_ml,
    "by_entity_position": by_pos,
    "votes_restricted": restricted,
    "confusions": confusions,
  }


def _acc(rows, tokens, layers=None, modules=None) -> float:
  return sum(_winner(_tally(r, tokens, layers, modules)) == g for r, g in rows) / len(rows)


def markdown(a: dict, title: str) -> str:
  """The analysis as markdown: rank histogram, restricted votes, confusions."""
  n = a["requests"]
  lines = [
    f"### {title}",
    "",
    f"{n} requests; the question-token vote picks the gold adapter for "
    f"{100 * a['vote_acc']:.1f}%; median margin (gold - best other, share of votes) "
    f"{a['median_margin']:+.3f}.",
    "",
    "| gold adapter's rank in the tally | " + " | ".join(a["gold_rank"]) + " |",
    "|---" * (1 + len(a["gold_rank"])) + "|",
    "| requests (%) | " + " | ".join(f"{100 * v / n:.1f}" for v in a["gold_rank"].values()) + " |",
    "",
    "| the vote counts | request accuracy (%) |",
    "|---|---|",
  ]
  lines += [f"| {k} | {100 * v:.1f} |" for k, v in a["votes_restricted"].items()]
  lines += ["", "Entity-token decisions that pick the gold adapter, by place in the name: "]
  lines[-1] += ", ".join(f"token {k}: {100 * v:.1f}%" for k, v in a["by_entity_position"].items())
  c = a["confusions"]
  same = {k: v for k, v in c.items() if k.startswith("same ")}
  if same:
    lines += [
      "",
      f"Of the {c['wrong']} wrong requests, the winner shares with the gold person: "
      + ", ".join(f"{k[5:]} {100 * v:.0f}%" for k, v in same.items())
      + ".",
    ]
  return "\n".join(lines) + "\n"


def plot(a: dict, path: str, title: str) -> None:
  """Entity-token accuracy per layer for each module, and the gold rank histogram."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
  for m, v in a["by_module_layer"].items():
    ax1.plot(np.asarray(v["entity"]) * 100, label=f"{m} (entity)")
    ax1.plot(np.asarray(v["question"]) * 100, "--", alpha=0.6, label=f"{m} (question)")
  ax1.set_xlabel("layer")
  ax1.set_ylabel("decisions picking the gold adapter (%)")
  ax1.legend(fontsize=7)
  ax1.set_title(title, fontsize=9)
  n = a["requests"]
  ax2.bar(list(a["gold_rank"]), [100 * v / n for v in a["gold_rank"].values()])
  ax2.set_xlabel("gold adapter's rank in the question-token vote")
  ax2.set_ylabel("requests (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
