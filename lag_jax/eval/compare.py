"""Several evaluate runs (results.json) side by side in one plot and table.

  python -m lag_jax.eval.compare --out=results/synthetic_methods.png \
      /tmp/synth3/results.json "/tmp/synth3_shared4/results.json:[shared top:4]"

A run may carry a label after ':' that is appended to its method names (runs of the
same methods under another setting, e.g. shared-direction removal); methods that an
earlier run already has are kept from that run. The runs must share the benchmark and
its examples (checked by count). Writes the PNG and prints the merged markdown table.
"""

from __future__ import annotations

import argparse
import json

from lag_jax.eval import harness


def merge(runs: list[tuple[dict, str]]) -> dict:
  """One report with every run's methods; ``runs``: (report, label suffix)."""
  first = runs[0][0]
  out = dict(first, methods={}, k_sweep={})
  for report, label in runs:
    if (report["benchmark"], report["num_examples"]) != (first["benchmark"], first["num_examples"]):
      raise ValueError(
        f"runs differ: {report['benchmark']} with {report['num_examples']} examples vs "
        f"{first['benchmark']} with {first['num_examples']}"
      )
    for name, row in report["methods"].items():
      key = f"{name} {label}".strip()
      out["methods"].setdefault(key, row)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("runs", nargs="+", help="results.json[:label] of each run")
  args = p.parse_args(argv)
  runs = []
  for spec in args.runs:
    path, _, label = spec.partition(".json:")
    path = path if path.endswith(".json") else path + ".json"
    with open(path) as f:
      runs.append((json.load(f), label))
  report = merge(runs)
  harness.plot_methods(report, args.out)
  print(harness.markdown_table(report))


if __name__ == "__main__":
  main()
