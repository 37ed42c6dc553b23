"""Score and routing accuracy against library size: evaluate runs at several N, as one.

  python -m lag_jax.eval.curve --run=16:$HOME/lag_n1000/n16 --run=64:$HOME/lag_n1000/n64 \\
      --run=250:$HOME/lag_n1000/n250 --run=1000:$HOME/lag_n1000/test --out=results/n1000/curve

Each run is an ``evaluate`` workdir (its results.json) of the same library at another
size (configs/n1000.py with ``--config.synthetic.library_size=N``). Writes curve.json,
curve.md (per method: AVG % of oracle and per-request routing accuracy at each N) and
curve.png (both against N, log scale) into --out. The score is the paper's AVG, or the
average of ``--avg_families`` only (e.g. QA,Slot; by default the runs' own
``avg_families``, the evaluate config field, where they have one).
"""

from __future__ import annotations

import argparse
import json
import os

from lag_jax.eval.report import avg_label, check_avg_families, family_average
from lag_jax.files import write_json_atomic


def collect(runs: dict[int, dict], avg_families=None) -> dict:
  """{method: {N: {"avg", "request_acc", "entity_acc"}}} from results.json dicts by N;
  "avg" is the mean of ``avg_families``' normalised scores where given, else AVG."""
  out: dict[str, dict] = {}
  for n, report in sorted(runs.items()):
    got = report.get("num_knowledge_adapters")
    if got is not None and got != n:
      raise ValueError(f"the run given for N = {n} evaluated {got} knowledge adapters")
    if avg_families:
      check_avg_families(report, avg_families, where=f"the run given for N = {n}")
    for method, row in report["methods"].items():
      norm = row.get("normalized", {})
      out.setdefault(method, {})[n] = {
        "avg": family_average(norm, avg_families) if avg_families else norm.get("AVG"),
        "request_acc": row.get("routing_request_acc"),
        "entity_acc": row.get("routing_entity_acc"),
      }
  return out


def markdown(curve: dict, sizes: list[int], score: str = "AVG") -> str:
  def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"

  head = "| Method | " + " | ".join(f"{score} N={n}" for n in sizes)
  head += " | " + " | ".join(f"requests N={n}" for n in sizes) + " |"
  lines = [head, "|---" * (1 + 2 * len(sizes)) + "|"]
  for method, by_n in curve.items():
    cells = [pct(by_n.get(n, {}).get("avg")) for n in sizes]
    cells += [pct(by_n.get(n, {}).get("request_acc")) for n in sizes]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(
  curve: dict, sizes: list[int], path: str, score: str = "AVG", methods: list[str] | None = None
) -> None:
  """Score, requests routed to gold and entity tokens routed to gold against N, one line
  per method (``methods`` only, where given: two dozen lines do not read)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  panels = (
    ("avg", f"{score} score (% of oracle)"),
    ("request_acc", "requests routed to the gold adapter (%)"),
    ("entity_acc", "entity tokens routed to the gold adapter (%)"),
  )
  for i, method in enumerate(methods or list(curve)):
    by_n = curve[method]
    style = dict(color=f"C{i % 10}", ls="-" if i < 10 else "--", marker="o", label=method)
    for ax, (key, _) in zip(axes, panels, strict=True):  # one colour per method throughout
      ns = [n for n in sizes if by_n.get(n, {}).get(key) is not None]
      if ns and not (key == "avg" and method == "Oracle"):
        ax.plot(ns, [100 * by_n[n][key] for n in ns], **style)
  for ax, (_, label) in zip(axes, panels, strict=True):
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("N (knowledge adapters)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=6)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", action="append", required=True, help="N:workdir (repeat)")
  p.add_argument("--out", required=True)
  p.add_argument(
    "--avg_families",
    default=None,
    help="e.g. QA,Slot: score by these families' mean (default: the runs' avg_families, else AVG)",
  )
  p.add_argument(
    "--plot_methods",
    default="",
    help="methods drawn in curve.png, separated by ',' (default: every method; the table "
    "always has every method)",
  )
  args = p.parse_args(argv)
  runs = {}
  for spec in args.run:
    n, _, folder = spec.partition(":")
    path = os.path.join(os.path.expanduser(folder), "results.json")
    if not n.isdigit() or not os.path.exists(path):
      raise SystemExit(f"--run {spec!r}: want N:workdir with a results.json ({path})")
    with open(path) as f:
      runs[int(n)] = json.load(f)
  sizes = sorted(runs)
  if args.avg_families is not None:
    fams = [f for f in args.avg_families.split(",") if f]
  else:  # the runs' own, where every run names the same
    named = {tuple(r.get("avg_families") or ()) for r in runs.values()}
    fams = list(named.pop()) if len(named) == 1 else []
  score = avg_label(fams) if fams else "AVG"
  curve = collect(runs, fams)
  drawn = [m for m in args.plot_methods.split(",") if m]
  if missing := [m for m in drawn if m not in curve]:
    raise SystemExit(f"--plot_methods: {missing} are in none of the runs (have: {list(curve)})")
  os.makedirs(args.out, exist_ok=True)
  write_json_atomic(
    os.path.join(args.out, "curve.json"),
    {"sizes": sizes, "runs": args.run, "score": score, "methods": curve},
  )
  md = markdown(curve, sizes, score)
  with open(os.path.join(args.out, ".curve.md.tmp"), "w") as f:
    f.write(md)
  os.replace(os.path.join(args.out, ".curve.md.tmp"), os.path.join(args.out, "curve.md"))
  plot(curve, sizes, os.path.join(args.out, "curve.png"), score, drawn or None)
  print(md)
  return curve


if __name__ == "__main__":
  main()
