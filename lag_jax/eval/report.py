"""The evaluation's report: the normalised score against the oracle, the markdown
table and the plots."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lag_jax.eval import metrics
from lag_jax.eval.prompts import TOKEN_TYPES
from lag_jax.eval.runner import PRIMARY_METRIC, MethodResult, routing_accuracy


def summarize(results: Sequence[MethodResult], families: dict[str, str]) -> dict:
  """Raw metric per dataset and method, and the normalised score against the oracle."""
  oracle = next((r for r in results if r.method == "Oracle"), None)
  table = {}

  def primary(by_dataset):
    return {d: v[PRIMARY_METRIC[families[d]]] for d, v in by_dataset.items()}

  for r in results:
    raw = primary(r.by_dataset)
    row = {"raw": raw, "by_dataset": r.by_dataset, "seconds": r.seconds}
    if oracle is not None:
      o_raw = primary(oracle.by_dataset)
      sizes = {d: v["n"] for d, v in r.by_dataset.items()}
      row["normalized"] = metrics.normalized_scores(
        raw, o_raw, sizes, {d: families[d] for d in raw}
      )
    if r.timing is not None:
      row["timing"] = dict(r.timing)
      steps = r.timing["decode_steps"]
      row["decode_ms_per_step"] = 1000 * r.timing["decode_s"] / steps if steps else None
    if r.request_routing is not None:
      row["routing_request_acc"] = r.request_routing["correct"] / max(r.request_routing["total"], 1)
    if r.routing is not None:
      acc, per_layer = routing_accuracy(r.routing, "entity")
      row["routing_entity_acc"] = acc
      row["routing_entity_acc_by_layer"] = per_layer
      row["routing_acc_by_type"] = {t: routing_accuracy(r.routing, t)[0] for t in TOKEN_TYPES}
      row["routing_entity_acc_by_module"] = {
        m: routing_accuracy({m: v}, "entity")[0] for m, v in r.routing.items()
      }
    table[r.method] = row
  return table


def markdown_table(report: dict) -> str:
  """The paper-shaped table: normalised score per family and AVG, raw metric per
  dataset, and routing accuracy on the gold entity's tokens and per request (the
  adapter chosen most over the question's tokens)."""
  methods = report["methods"]
  first = next(iter(methods.values()))
  families = [f for f in first.get("normalized", {}) if f != "AVG"]
  datasets = sorted(first["raw"])
  head = (
    ["Method"]
    + [f"{f} (% of oracle)" for f in families]
    + ["AVG"]
    + [f"{d} raw" for d in datasets]
    + ["routing acc. (entity tokens)", "routing acc. (requests)", "seconds"]
  )
  lines = [
    f"### {report['benchmark']}: {report['num_examples']} examples, "
    f"{report['num_knowledge_adapters']} knowledge + {report['num_task_adapters']} "
    "task adapters",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]

  def pct(v):
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"

  for name, row in methods.items():
    norm = row.get("normalized", {})
    cells = [name] + [pct(norm.get(f)) for f in families] + [pct(norm.get("AVG"))]
    cells += [pct(row["raw"].get(d)) for d in datasets]
    cells += [pct(row.get("routing_entity_acc")), pct(row.get("routing_request_acc"))]
    cells += [f"{row['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if report.get("k_sweep"):
    lines += [
      "",
      "k sweep (LAG):",
      "",
      "| k | AVG (% of oracle) | routing acc. (entity) |",
      "|---|---|---|",
    ]
    for k, row in report["k_sweep"].items():
      if row:
        lines.append(
          f"| {k} | {pct(row.get('normalized', {}).get('AVG'))} | "
          f"{pct(row.get('routing_entity_acc'))} |"
        )
  return "\n".join(lines) + "\n"


def plot(report: dict, workdir: str) -> None:
  """score_vs_k.png, routing_by_layer.png and methods.png next to the JSON and
  markdown."""

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sweep = {int(k): v for k, v in report.get("k_sweep", {}).items() if v}
  if sweep:
    ks = sorted(sweep)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(
      ks,
      [100 * sweep[k].get("normalized", {}).get("AVG", float("nan")) for k in ks],
      "o-",
      label="AVG score (% of oracle)",
    )
    ax.plot(
      ks,
      [100 * (sweep[k].get("routing_entity_acc") or float("nan")) for k in ks],
      "s--",
      label="routing acc., entity tokens (%)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("k (Arrow-filter candidates)")
    ax.legend()
    ax.set_title(f"LAG k sweep ({report['benchmark']})")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "score_vs_k.png"), dpi=120)
    plt.close(fig)
  routed_rows = {
    m: r
    for m, r in report["methods"].items()
    if r.get("routing_acc_by_layer") or r.get("routing_entity_acc_by_layer")
  }
  if routed_rows:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, r in routed_rows.items():
      ax.plot(100 * np.asarray(r["routing_entity_acc_by_layer"]), label=m)
    ax.set_xlabel("layer")
    ax.set_ylabel("gold adapter chosen (%)")
    ax.set_title("Routing accuracy on the gold entity's tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "routing_by_layer.png"), dpi=120)
    plt.close(fig)
  plot_methods(report, os.path.join(workdir, "methods.png"))


def plot_methods(report: dict, path: str) -> None:
  """Every method side by side: AVG score as % of the oracle, and the share of requests
  routed to their gold knowledge adapter (methods that route)."""

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["methods"]
  names = [m for m, r in rows.items() if r.get("normalized", {}).get("AVG") is not None]
  if not names:
    return
  x = np.arange(len(names))
  avg = [100 * rows[m]["normalized"]["AVG"] for m in names]
  req = [100 * (rows[m].get("routing_request_acc") or float("nan")) for m in names]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
  ax.bar(x - 0.2, avg, 0.4, label="AVG score (% of oracle)")
  ax.bar(x + 0.2, req, 0.4, label="requests routed to the gold adapter (%)")
  ax.axhline(100, color="gray", lw=0.8, ls=":")
  top = max([v for v in avg + req if v == v] + [100.0])
  ax.set_ylim(0, 1.3 * top)
  ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
  ax.set_title(
    f"{report['benchmark']}: {report['num_examples']} examples, "
    f"{report['num_knowledge_adapters']} knowledge adapters"
  )
  ax.legend(fontsize=7, loc="upper left", ncol=2)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
