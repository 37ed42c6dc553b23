"""KILT-format tasks and knowledge sources: read, validate, write back atomically.

A KILT record (Petroni et al. 2021) is::

  {"id": str, "input": str,
   "output": [{"answer": str, "provenance": [{"title": str, ...}, ...]}, ...],
   "meta": {...}}            # optional

Several ``output`` entries are alternative answers; some carry only provenance.
We read every non-empty ``answer`` (order kept, duplicates dropped) and the union
of all provenance titles (first-seen order) into a ``KiltExample``. Its ``task`` is
the task family of the LAG paper (chat, fact, link, slot, qa) and ``meta["dataset"]``
the dataset (nq, fever, ...), both inferred from KILT's file names
(``nq-dev-kilt.jsonl``) unless given.

Malformed records never stop a read half-way. Each is either skipped and counted
in a ``ReadReport`` (default; one warning per file with the counts per kind and
the first ids), or, with ``strict=True``, the first one raises ``KiltFormatError``
naming the file, line, field and id. The kinds:

- ``invalid_json``: a JSONL line that does not parse (a ``.json`` file that does
  not parse as a whole is always an error: there is no record boundary to skip to);
- ``invalid_utf8``: a JSONL line that is not valid UTF-8 (likewise always an error
  in a ``.json`` file);
- ``not_an_object``: a record that is not a JSON object;
- ``missing_field``: ``id``, ``input``, ``output``, a provenance ``title``, or the
  task (no ``task`` argument, no ``task`` field, unknown file name) is absent or null;
- ``bad_field``: a field of the wrong type (e.g. a number as ``answer``) or an
  empty ``id`` / ``input``;
- ``empty_answers``: no output entry has a non-empty answer;
- ``missing_provenance``: no provenance title at all (only if ``require_provenance``);
- ``unknown_provenance``: a knowledge source is given and none of the record's
  titles is in it. Unknown titles next to known ones are dropped from the example
  and counted in ``ReadReport.dropped_titles``;
- ``duplicate_id``: an id seen before in the same read (the first one is kept).

Titles are compared exactly (KILT and the summaries both use Wikipedia's
spelling with spaces, e.g. "J. D. Drew").

Written records carry two extra top-level keys, ``task`` and ``meta`` (KILT's own
tools ignore keys they do not know), so that a round trip is exact.

Writing (``write_kilt``) validates every example first, then streams the records to
a temporary file next to the target and renames it into place: a failure leaves
the old file (or none) and never a truncated one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from lag_jax.data.records import KILT_DATASETS, Document, KiltExample
from lag_jax.errors import UserError

__all__ = [
  "KILT_DATASETS",
  "Document",
  "KiltExample",
  "KiltFormatError",
  "Problem",
  "ReadReport",
  "dataset_from_filename",
  "documents_by_title",
  "load_kilt_hf",
  "read_kilt",
  "read_kilt_wikipedia",
  "read_wiki_summaries",
  "write_kilt",
]

# How many example ids per problem kind a warning shows.
_IDS_SHOWN = 5


class KiltFormatError(UserError):
  """A malformed record (``strict=True``) or an unreadable file.

  Attributes:
    file, line, field, example_id: where the problem is (None where unknown).
    kind: the problem kind (see the module docstring).
  """

  def __init__(
    self,
    message: str,
    *,
    file: str | None = None,
    line: int | None = None,
    field: str | None = None,
    example_id: str | None = None,
    kind: str | None = None,
  ):
    super().__init__(message)
    self.file, self.line, self.field = file, line, field
    self.example_id, self.kind = example_id, kind


@dataclasses.dataclass(frozen=True)
class Problem:
  """One malformed record: what is wrong and where (line: 1-based line or row)."""

  kind: str
  file: str
  line: int | None
  field: str | None
  example_id: str | None
  message: str

  def __str__(self) -> str:
    where = f"{self.file}:{self.line}" if self.line is not None else self.file
    field = f" field {self.field!r}:" if self.field else ""
    ident = f" (id {self.example_id!r})" if self.example_id is not None else ""
    return f"{where}:{field} {self.message}{ident}"


@dataclasses.dataclass
class ReadReport:
  """What a read kept and skipped.

  Attributes:
    source: the file (or dataset) read.
    records: records seen (parsable or not).
    kept: examples returned.
    dropped_titles: unknown provenance titles removed from kept examples.
    problems: every skipped record, in file order.
  """

  source: str
  records: int = 0
  kept: int = 0
  dropped_titles: int = 0
  problems: list[Problem] = dataclasses.field(default_factory=list)

  @property
  def counts(self) -> dict[str, int]:
    """Problem kind -> number of skipped records."""
    out: dict[str, int] = {}
    for p in self.problems:
      out[p.kind] = out.get(p.kind, 0) + 1
    return out

  def ids(self, kind: str) -> list[str | None]:
    """Ids of the records skipped for ``kind`` (None where the id was unreadable)."""
    return [p.example_id for p in self.problems if p.kind == kind]

  @property
  def skipped(self) -> int:
    return len(self.problems)

  def summary(self) -> str:
    """One paragraph: totals, then per kind the count, first ids and first location."""
    lines = [
      f"{self.source}: {self.records} records, kept {self.kept}, skipped {self.skipped}"
      + (
        f", dropped {self.dropped_titles} unknown provenance titles" if self.dropped_titles else ""
      )
    ]
    for kind, n in sorted(self.counts.items()):
      ids = [i for i in self.ids(kind) if i is not None]
      more = " ..." if len(ids) > _IDS_SHOWN else ""
      first = next(p for p in self.problems if p.kind == kind)
      lines.append(f"  {kind}: {n} (ids {ids[:_IDS_SHOWN]}{more}; first: {first})")
    return "\n".join(lines)


class _RecordError(Exception):
  """Internal: one record is malformed."""

  def __init__(self, kind: str, field: str | None, message: str):
    super().__init__(message)
    self.kind, self.field, self.message = kind, field, message


def dataset_from_filename(path: str | os.PathLike[str]) -> str | None:
  """KILT's dataset name from a file name like ``nq-dev-kilt.jsonl``, or None if unknown."""
  stem = pathlib.Path(path).name.split("-")[0].split(".")[0].lower()
  return stem if stem in KILT_DATASETS else None


def _as_list_of_dicts(value: Any) -> Any:
  """``datasets`` may give a list of structs as a dict of lists; turn it back into a list."""
  if isinstance(value, Mapping) and value and all(isinstance(v, list) for v in value.values()):
    n = {len(v) for v in value.values()}
    if len(n) == 1:
      keys = list(value)
      return [{k: value[k][i] for k in keys} for i in range(n.pop())]
  return value


def _parse_record(
  record: Any,
  *,
  task: str | None,
  dataset: str | None,
  default_dataset: str | None,
  known: Collection[str] | None,
  require_provenance: bool,
) -> tuple[KiltExample, int]:
  """One record -> (example, number of unknown titles dropped); raises _RecordError."""
  if not isinstance(record, Mapping):
    raise _RecordError(
      "not_an_object", None, f"record is a {type(record).__name__}, not a JSON object"
    )
  for name in ("id", "input", "output"):
    if record.get(name) is None:
      raise _RecordError("missing_field", name, f"missing field {name!r}")
  ex_id = record["id"]
  if isinstance(ex_id, int) and not isinstance(ex_id, bool):
    ex_id = str(ex_id)  # some KILT-like files use numeric ids; they are still unique keys
  if not isinstance(ex_id, str) or not ex_id:
    raise _RecordError("bad_field", "id", f"id must be a non-empty string, got {ex_id!r}")
  if not isinstance(record["input"], str) or not record["input"].strip():
    raise _RecordError("bad_field", "input", "input must be a non-empty string")
  output = _as_list_of_dicts(record["output"])
  if not isinstance(output, list):
    raise _RecordError("bad_field", "output", f"output must be a list, got {type(output).__name__}")
  answers: list[str] = []
  titles: list[str] = []
  for i, entry in enumerate(output):
    if not isinstance(entry, Mapping):
      raise _RecordError("bad_field", f"output[{i}]", "output entry is not an object")
    answer = entry.get("answer")
    if answer is not None and not isinstance(answer, str):
      raise _RecordError(
        "bad_field", f"output[{i}].answer", f"answer must be a string, got {type(answer).__name__}"
      )
    if answer and answer.strip() and answer not in answers:
      answers.append(answer)
    prov = _as_list_of_dicts(entry.get("provenance"))
    if prov is None:
      continue
    if not isinstance(prov, list):
      raise _RecordError("bad_field", f"output[{i}].provenance", "provenance must be a list")
    for j, p in enumerate(prov):
      field = f"output[{i}].provenance[{j}].title"
      title = p.get("title") if isinstance(p, Mapping) else None
      if title is None:
        raise _RecordError("missing_field", field, "provenance entry without a title")
      if not isinstance(title, str) or not title:
        raise _RecordError("bad_field", field, f"title must be a non-empty string, got {title!r}")
      if title not in titles:
        titles.append(title)
  if not answers:
    raise _RecordError("empty_answers", "output", "no output entry has a non-empty answer")
  if require_provenance and not titles:
    raise _RecordError("missing_provenance", "output", "no provenance title")
  dropped = 0
  if known is not None and titles:
    kept = [t for t in titles if t in known]
    if not kept:
      raise _RecordError(
        "unknown_provenance",
        "output",
        f"no provenance title is in the knowledge source: {titles[:3]}",
      )
    dropped = len(titles) - len(kept)
    titles = kept
  meta = record.get("meta")
  if meta is not None and not isinstance(meta, Mapping):
    raise _RecordError("bad_field", "meta", "meta must be an object")
  meta = dict(meta or {})
  dataset = dataset or meta.get("dataset") or default_dataset
  if dataset is not None:
    meta["dataset"] = dataset
  task = task or record.get("task") or (KILT_DATASETS.get(dataset) if dataset else None)
  if not task:
    raise _RecordError(
      "missing_field",
      "task",
      "unknown task: pass task=, or add a 'task' "
      "field, or use KILT's file names (e.g. nq-dev-kilt.jsonl)",
    )
  if not isinstance(task, str):
    raise _RecordError("bad_field", "task", f"task must be a string, got {task!r}")
  ex = KiltExample(
    id=ex_id,
    input=record["input"],
    answers=tuple(answers),
    provenance=tuple(titles),
    task=task,
    meta=meta,
  )
  return ex, dropped


def _known_titles(knowledge: Iterable[Document] | Collection[str] | None) -> Collection[str] | None:
  if knowledge is None:
    return None
  if isinstance(knowledge, Mapping):
    return frozenset(knowledge)
  return frozenset(d.title if isinstance(d, Document) else d for d in knowledge)


def _utf8_error(data: bytes, e: UnicodeDecodeError) -> tuple[int, str]:
  """(1-based line, message) for a decoding error in ``data`` (a line or a whole file)."""
  line_start = data.rfind(b"\n", 0, e.start) + 1
  line = data.count(b"\n", 0, e.start) + 1
  return line, f"invalid UTF-8: byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}"


def _decode_jsonl_line(raw: bytes) -> tuple[str | None, Any, _RecordError | None]:
  """(text, record, problem) for one JSONL line; text None for a blank line."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    _, message = _utf8_error(raw, e)
    line = raw.decode("utf-8", errors="replace")
    try:  # the record as far as it reads, so that the report can show its id
      record = json.loads(line)
    except ValueError:
      record = None
    return line, record, _RecordError("invalid_utf8", None, message)
  if not line.strip():
    return None, None, None
  try:
    return line, json.loads(line), None
  except json.JSONDecodeError as e:
    return (
      line,
      None,
      _RecordError("invalid_json", None, f"invalid JSON: {e.msg} at column {e.colno}"),
    )


def _iter_jsonl(path: pathlib.Path) -> Iterator[tuple[int, Any, _RecordError | None]]:
  """(line, record or None, the line's problem or None) for every non-blank line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      text, record, problem = _decode_jsonl_line(raw)
      if text is not None:
        yield line_no, record, problem


def _read_utf8(path: pathlib.Path) -> str:
  """A whole file as text; KiltFormatError naming the line if it is not UTF-8."""
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line, message = _utf8_error(data, e)
    raise KiltFormatError(
      f"{path}:{line}: {message}", file=str(path), line=line, kind="invalid_utf8"
    ) from None


def _iter_json_array(path: pathlib.Path) -> Iterator[tuple[int, Any, _RecordError | None]]:
  """(line where the record starts, record, None) for each element of a top-level array."""
  text = _read_utf8(path)
  decoder = json.JSONDecoder()

  def skip_ws(pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
      pos += 1
    return pos

  def fail(msg: str, pos: int) -> KiltFormatError:
    line = text.count("\n", 0, pos) + 1
    return KiltFormatError(
      f"{path}:{line}: {msg} (a .json file must hold one JSON array of "
      "records; use .jsonl for one record per line)",
      file=str(path),
      line=line,
      kind="invalid_json",
    )

  pos = skip_ws(0)
  if pos >= len(text) or text[pos] != "[":
    raise fail("expected '['", pos)
  # The whole file is parsed before the first record is handed out, so that a
  # broken file is an error before anything is kept.
  items: list[tuple[int, Any]] = []
  pos = skip_ws(pos + 1)
  if pos < len(text) and text[pos] == "]":
    pos += 1
  else:
    while True:
      try:
        value, end = decoder.raw_decode(text, pos)
      except json.JSONDecodeError as e:
        raise fail(f"invalid JSON: {e.msg}", e.pos) from None
      items.append((text.count("\n", 0, pos) + 1, value))
      pos = skip_ws(end)
      if pos < len(text) and text[pos] == ",":
        pos = skip_ws(pos + 1)
        continue
      if pos < len(text) and text[pos] == "]":
        pos += 1
        break
      raise fail("expected ',' or ']'", pos)
  if skip_ws(pos) != len(text):
    raise fail("extra data after the array", skip_ws(pos))
  for line, value in items:
    yield line, value, None


def _read_records(
  rows: Iterable[tuple[int | None, Any, _RecordError | None]],
  source: str,
  *,
  task: str | None,
  dataset: str | None,
  default_dataset: str | None,
  knowledge: Iterable[Document] | Collection[str] | None,
  strict: bool,
  require_provenance: bool,
) -> tuple[list[KiltExample], ReadReport]:
  known = _known_titles(knowledge)
  report = ReadReport(source=source)
  examples: list[KiltExample] = []
  seen: set[str] = set()
  for line, record, line_problem in rows:
    report.records += 1
    raw_id = record.get("id") if isinstance(record, Mapping) else None
    raw_id = None if raw_id is None else str(raw_id)
    try:
      if line_problem is not None:  # undecodable: skipped whatever it holds
        raise line_problem
      ex, dropped = _parse_record(
        record,
        task=task,
        dataset=dataset,
        default_dataset=default_dataset,
        known=known,
        require_provenance=require_provenance,
      )
      if ex.id in seen:
        raise _RecordError("duplicate_id", "id", "id seen before in this read")
    except _RecordError as e:
      problem = Problem(e.kind, source, line, e.field, raw_id, e.message)
      if strict:
        raise KiltFormatError(
          str(problem), file=source, line=line, field=e.field, example_id=raw_id, kind=e.kind
        ) from None
      report.problems.append(problem)
      continue
    seen.add(ex.id)
    report.dropped_titles += dropped
    examples.append(ex)
  report.kept = len(examples)
  if report.problems:
    logging.warning("Skipped malformed KILT records:\n%s", report.summary())
  return examples, report


def read_kilt(
  path: str | os.PathLike[str],
  *,
  task: str | None = None,
  dataset: str | None = None,
  knowledge: Iterable[Document] | Collection[str] | None = None,
  strict: bool = False,
  require_provenance: bool = True,
) -> tuple[list[KiltExample], ReadReport]:
  """Reads KILT records from a ``.jsonl`` (one per line) or ``.json`` (an array) file.

  Args:
    path: the file.
    task: the task family for every record; else the record's ``task`` field, else
      inferred from the dataset.
    dataset: stored as ``meta["dataset"]``; else the record's, else from the file name.
    knowledge: the knowledge source (documents, titles, or a title-keyed mapping);
      if given, provenance titles outside it are dropped, and records left with
      none are skipped as ``unknown_provenance``.
    strict: raise ``KiltFormatError`` at the first malformed record instead of skipping.
    require_provenance: whether a record without any provenance title is malformed.
  Returns:
    (examples in file order, the report of what was skipped).
  Raises:
    KiltFormatError: in strict mode; or if a ``.json`` file does not parse as an array
      or is not UTF-8.
    FileNotFoundError: if the file does not exist.
  """
  path = pathlib.Path(path)
  rows = _iter_json_array(path) if path.suffix == ".json" else _iter_jsonl(path)
  return _read_records(
    rows,
    str(path),
    task=task,
    dataset=dataset,
    default_dataset=dataset_from_filename(path),
    knowledge=knowledge,
    strict=strict,
    require_provenance=require_provenance,
  )


def load_kilt_hf(
  path: str,
  name: str | None = None,
  *,
  split: str = "validation",
  task: str | None = None,
  dataset: str | None = None,
  knowledge: Iterable[Document] | Collection[str] | None = None,
  strict: bool = False,
  require_provenance: bool = True,
  **load_kwargs: Any,
) -> tuple[list[KiltExample], ReadReport]:
  """Reads KILT records through ``datasets.load_dataset``, validated like ``read_kilt``.

  Two uses: local files, ``load_kilt_hf("json", data_files="nq-dev-kilt.jsonl",
  split="train")`` (works offline with ``HF_DATASETS_OFFLINE=1``); or KILT on the hub
  when it is reachable, ``load_kilt_hf("facebook/kilt_tasks", "nq")``. Problems
  name the 1-based row in place of the line. ``datasets`` gives every record the
  union of all records' keys (absent ones as None), which shows in ``meta``; and it
  infers one schema for the whole file, so a file whose records disagree in types
  fails in ``datasets`` itself (a ``KiltFormatError`` here, before any record is
  kept); ``read_kilt`` reads such files record by record.

  Raises:
    KiltFormatError: in strict mode, or naming the source if ``datasets`` cannot load it.
  """
  import datasets  # imported here: heavy, and only this path needs it

  source = f"{path}" + (f"/{name}" if name else "")
  default_dataset = None
  if "data_files" in load_kwargs:
    files = load_kwargs["data_files"]
    source = str(files if isinstance(files, str) else list(files))
    if isinstance(files, str):
      default_dataset = dataset_from_filename(files)
  elif name is not None:
    default_dataset = name if name in KILT_DATASETS else None
  try:
    ds = datasets.load_dataset(path, name, split=split, **load_kwargs)
  except Exception as e:  # datasets raises many types (connection, schema, file errors)
    raise KiltFormatError(
      f"datasets could not load {source} (split {split!r}): {type(e).__name__}: {e}", file=source
    ) from e
  rows = ((i + 1, row, None) for i, row in enumerate(ds))
  return _read_records(
    rows,
    source,
    task=task,
    dataset=dataset,
    default_dataset=default_dataset,
    knowledge=knowledge,
    strict=strict,
    require_provenance=require_provenance,
  )


def _check_writable(examples: Sequence[KiltExample]) -> None:
  seen: set[str] = set()
  for i, ex in enumerate(examples):
    where = f"example {i} (id {getattr(ex, 'id', None)!r})"
    if not isinstance(ex, KiltExample):
      raise ValueError(f"{where}: not a KiltExample")
    if not isinstance(ex.id, str) or not ex.id:
      raise ValueError(f"{where}: id must be a non-empty string")
    if ex.id in seen:
      raise ValueError(f"{where}: duplicate id")
    seen.add(ex.id)
    if not isinstance(ex.input, str) or not ex.input.strip():
      raise ValueError(f"{where}: input must be a non-empty string")
    if not ex.answers or not all(isinstance(a, str) and a.strip() for a in ex.answers):
      raise ValueError(f"{where}: answers must be non-empty strings, got {ex.answers!r}")
    if not all(isinstance(t, str) and t for t in ex.provenance):
      raise ValueError(f"{where}: provenance titles must be non-empty strings")
    if not isinstance(ex.task, str) or not ex.task:
      raise ValueError(f"{where}: task must be a non-empty string")


def write_kilt(path: str | os.PathLike[str], examples: Sequence[KiltExample]) -> None:
  """Writes examples as KILT records, atomically; ``.json`` gives an array, else JSONL.

  Every example is checked first (non-empty unique ids, inputs, answers, task;
  string titles), so that a bad one raises before anything is written; the
  records then go to a temporary file renamed over ``path`` at the end.

  Raises:
    ValueError: naming the first bad example; TypeError if a meta value is not
      JSON-serialisable. The target is untouched in both cases.
  """
  path = pathlib.Path(path)
  examples = list(examples)
  _check_writable(examples)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      as_array = path.suffix == ".json"
      if as_array:
        f.write("[\n")
      for i, ex in enumerate(examples):
        line = json.dumps(ex.to_record(), ensure_ascii=False)
        if as_array:
          f.write(line + (",\n" if i + 1 < len(examples) else "\n"))
        else:
          f.write(line + "\n")
      if as_array:
        f.write("]\n")
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


# ---------------------------------------------------------------------------
# Knowledge sources.


def _kilt_page_text(paragraphs: Sequence[str], title: str) -> str:
  """KILT's paragraph list -> plain text.

  KILT's first paragraph repeats the title; "Section::::Name." lines are section
  headings and "BULLET::::- " marks list items. The title line and headings are
  dropped (the title is kept in ``Document.title``), bullets become "- ".
  """
  out = []
  for i, para in enumerate(paragraphs):
    para = para.strip()
    if not para or (i == 0 and para == title) or para.startswith("Section::::"):
      continue
    if para.startswith("BULLET::::"):
      para = "- " + para[len("BULLET::::") :].lstrip("- ").strip()
    out.append(para)
  return "\n".join(out)


def read_kilt_wikipedia(
  path: str | os.PathLike[str],
  titles: Collection[str] | None = None,
  *,
  limit: int | None = None,
  strict: bool = False,
) -> list[Document]:
  """Reads pages in KILT's Wikipedia format (JSONL of ``{wikipedia_title, text: [...]}``).

  Streams the file, so the full 5.9M-page KILT dump can be filtered to ``titles``.

  Args:
    titles: keep only these pages (None: all).
    limit: stop after this many pages are kept.
    strict: raise ``KiltFormatError`` naming the file and line on a malformed line (not
      UTF-8, not JSON, no title or text); else skip it and warn once with the count.
  Returns:
    Documents in file order; a title seen twice keeps its first page.
  """
  path = pathlib.Path(path)
  wanted = None if titles is None else frozenset(titles)
  docs: list[Document] = []
  seen: set[str] = set()
  bad: list[str] = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      text, page, problem = _decode_jsonl_line(raw)
      if text is None:
        continue
      try:
        if problem is not None:
          raise problem
        title, paragraphs = page.get("wikipedia_title"), page.get("text")
        if not isinstance(title, str) or not title:
          raise ValueError("missing or empty 'wikipedia_title'")
        if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
          raise ValueError("'text' must be a list of strings")
      except (_RecordError, AttributeError, ValueError) as e:
        msg = f"{path}:{line_no}: {e}"
        kind = e.kind if isinstance(e, _RecordError) else None
        if strict:
          raise KiltFormatError(msg, file=str(path), line=line_no, kind=kind) from None
        bad.append(msg)
        continue
      if (wanted is not None and title not in wanted) or title in seen:
        continue
      seen.add(title)
      docs.append(Document(title, _kilt_page_text(paragraphs, title)))
      if limit is not None and len(docs) >= limit:
        break
  if bad:
    logging.warning("%s: skipped %d malformed pages; first: %s", path, len(bad), bad[0])
  return docs


def read_wiki_summaries(
  path: str | os.PathLike[str] | None = None, titles: Collection[str] | None = None
) -> list[Document]:
  """The packaged Wikipedia summaries (title -> {title, extract, ...}) as Documents.

  Args:
    path: the JSON file; default: the packaged English summaries, fetched into the cache.
    titles: keep only these (None: all 10,033).
  Returns:
    Documents sorted by title (the file's order is a dict order; sorting makes
    every index built from them reproducible).
  Raises:
    KiltFormatError: naming the file (and the line where known) if it is not UTF-8, not
      JSON, or not an object of entries with a string 'extract'.
  """
  if path is None:
    from lag_jax.assets import WIKI_SUMMARIES_EN  # here: reading files needs no cache logic

    path = WIKI_SUMMARIES_EN.path()
  try:
    data = json.loads(_read_utf8(pathlib.Path(path)))
  except json.JSONDecodeError as e:
    raise KiltFormatError(
      f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}",
      file=str(path),
      line=e.lineno,
      kind="invalid_json",
    ) from None
  if not isinstance(data, Mapping):
    raise KiltFormatError(f"{path}: expected an object title -> summary", file=str(path))
  docs = []
  for title, entry in data.items():
    if titles is not None and title not in titles:
      continue
    text = entry.get("extract") if isinstance(entry, Mapping) else None
    if not isinstance(text, str):
      raise KiltFormatError(
        f"{path}: entry {title!r} has no string 'extract'",
        file=str(path),
        field="extract",
        example_id=title,
      )
    docs.append(Document(title, text.strip()))
  docs.sort(key=lambda d: d.title)
  return docs


def documents_by_title(documents: Iterable[Document]) -> dict[str, Document]:
  """Title -> document; raises ValueError on a duplicate title (adapters are keyed by it)."""
  out: dict[str, Document] = {}
  for d in documents:
    if d.title in out:
      raise ValueError(f"duplicate document title {d.title!r}")
    out[d.title] = d
  return out
