"""The evaluation's report: the normalised score against the oracle, the markdown
table and the plots. Also re-renders a finished run's table and plots from its
results.json, e.g. with an average over chosen families beside the paper's AVG:

  python -m lag_jax.eval.report --workdir=$HOME/lag_n1000/tune --avg_families=QA,Slot
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from lag_jax.eval import injection, metrics
from lag_jax.eval.prompts import TOKEN_TYPES
from lag_jax.eval.runner import PRIMARY_METRIC, MethodResult, routing_accuracy
from lag_jax.files import write_json_atomic


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


def family_average(normalized: dict, families: Sequence[str]) -> float | None:
  """The mean of the normalised scores of ``families`` only (the paper's AVG takes
  every family): None where one is missing or undefined (NaN)."""
  vals = [normalized.get(f) for f in families]
  if not families or any(v is None or math.isnan(v) for v in vals):
    return None
  return float(np.mean(vals))


def avg_label(families: Sequence[str]) -> str:
  return f"AVG ({', '.join(families)})"


def markdown_table(report: dict) -> str:
  """The paper-shaped table: normalised score per family and AVG, raw metric per
  dataset, and routing accuracy on the gold entity's tokens and per request (the
  adapter chosen most over the question's tokens). With ``report["avg_families"]``, a
  column beside AVG averages those families only (for a family that says nothing in a
  setting, e.g. one where the oracle scores below a constant answer)."""
  methods = report["methods"]
  first = next(iter(methods.values()))
  families = [f for f in first.get("normalized", {}) if f != "AVG"]
  subset = list(report.get("avg_families") or [])
  datasets = sorted(first["raw"])
  head = (
    ["Method"]
    + [f"{f} (% of oracle)" for f in families]
    + ["AVG"]
    + ([avg_label(subset)] if subset else [])
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
    cells += [pct(family_average(norm, subset))] if subset else []
    cells += [pct(row["raw"].get(d)) for d in datasets]
    cells += [pct(row.get("routing_entity_acc")), pct(row.get("routing_request_acc"))]
    cells += [f"{row['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  if report.get("k_sweep"):
    lines += [
      "",
      "k sweep (LAG):",
      "",
      "| k | AVG (% of oracle) | "
      + (f"{avg_label(subset)} | " if subset else "")
      + "routing acc. (entity) |",
      "|---|---|" + ("---|" if subset else "") + "---|",
    ]
    for k, row in report["k_sweep"].items():
      if row:
        norm = row.get("normalized", {})
        lines.append(
          f"| {k} | {pct(norm.get('AVG'))} | "
          + (f"{pct(family_average(norm, subset))} | " if subset else "")
          + f"{pct(row.get('routing_entity_acc'))} |"
        )
  return "\n".join(lines) + "\n"


def results_markdown(report: dict) -> str:
  """results.md: the table, and the knowledge-injection table when there is one."""
  markdown = markdown_table(report)
  if report.get("knowledge_injection"):
    markdown += (
      "\nKnowledge injection (per question; floor = Task only, ceiling = the gold page in "
      "the prompt with the task adapter):\n\n" + injection.markdown(report["knowledge_injection"])
    )
  return markdown


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
  subset = list(report.get("avg_families") or [])

  def score(r):  # the average the table leads with: over avg_families where given
    norm = r.get("normalized", {})
    return family_average(norm, subset) if subset else norm.get("AVG")

  # Every method scored against an oracle; a score that is undefined (an oracle at 0,
  # as with a random tiny model) is an empty bar.
  names = [m for m, r in rows.items() if r.get("normalized")]
  if not names:
    return
  x = np.arange(len(names))
  avg = [100 * (score(rows[m]) if score(rows[m]) is not None else math.nan) for m in names]
  req = [100 * (rows[m].get("routing_request_acc") or float("nan")) for m in names]
  # Horizontal bars, methods top to bottom: long method names (router settings) stay
  # readable without squeezing the plot.
  fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(names)))
  ax.barh(x - 0.2, avg, 0.4, label=f"{avg_label(subset) if subset else 'AVG'} score (% of oracle)")
  ax.barh(x + 0.2, req, 0.4, label="requests routed to the gold adapter (%)")
  ax.axvline(100, color="gray", lw=0.8, ls=":")
  top = max([v for v in avg + req if v == v] + [100.0])
  ax.set_xlim(0, 1.05 * top)
  ax.set_yticks(x, names, fontsize=7)
  ax.invert_yaxis()
  ax.set_title(
    f"{report['benchmark']}: {report['num_examples']} examples, "
    f"{report['num_knowledge_adapters']} knowledge adapters",
    fontsize=9,
  )
  ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.04), ncol=2, frameon=False)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def rerender(workdir: str, avg_families: Sequence[str] | None = None) -> str:
  """Rewrites a finished evaluate run's results.md and plots from its results.json;
  with ``avg_families``, records them in results.json first (written to a temporary
  file, then renamed). Returns the markdown."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no results.json (is {workdir} an evaluate workdir?)")
  with open(path) as f:
    report = json.load(f)
  if avg_families is not None:
    check_avg_families(report, avg_families, where=path)
    report["avg_families"] = list(avg_families)
    write_json_atomic(path, report)
  markdown = results_markdown(report)
  tmp = os.path.join(workdir, ".results.md.tmp")
  with open(tmp, "w") as f:
    f.write(markdown)
  os.replace(tmp, os.path.join(workdir, "results.md"))
  plot(report, workdir)
  return markdown


def check_avg_families(report: dict, avg_families: Sequence[str], where: str) -> None:
  """Raises ValueError naming ``where`` when a family is not one of the report's."""
  have = {f for r in report["methods"].values() for f in r.get("normalized", {}) if f != "AVG"}
  bad = [f for f in avg_families if f not in have]
  if bad:
    raise ValueError(f"{where}: avg_families {bad} are not among the families {sorted(have)}")


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description="Re-render an evaluate run's results.md and plots.")
  p.add_argument("--workdir", required=True, help="the evaluate run's workdir (its results.json)")
  p.add_argument(
    "--avg_families", default=None, help="e.g. QA,Slot: a column averaging these families only"
  )
  args = p.parse_args(argv)
  fams = None if args.avg_families is None else [f for f in args.avg_families.split(",") if f]
  markdown = rerender(os.path.expanduser(args.workdir), fams)
  print(markdown)
  return markdown


if __name__ == "__main__":
  main()
