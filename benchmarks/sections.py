"""Rewriting one marked section of a markdown file, shared by the benchmark scripts."""

from __future__ import annotations

import os
import pathlib


def write_section(path: str, section: str, begin: str, end: str, header: str = "") -> None:
  """Replaces the text from ``begin`` to ``end`` (both included) in the file at ``path``
  with ``section`` (which carries the markers), or appends it when they are absent; a
  missing file starts as ``header``. Written to a temporary file, then renamed."""
  p = pathlib.Path(path)
  text = p.read_text() if p.exists() else header
  body = section.rstrip("\n")
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + body + tail
  else:
    text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + body + "\n"
  tmp = p.with_name(f".{p.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, p)


def publish(name: str, result: dict, section: str, begin: str, end: str) -> None:
  """A benchmark's results: benchmarks/results/<name>.json and its BENCHMARKS.md section."""
  import json

  here = pathlib.Path(__file__).resolve().parent
  (here / "results").mkdir(exist_ok=True)
  (here / "results" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
  write_section(str(here.parent / "BENCHMARKS.md"), section, begin, end)
