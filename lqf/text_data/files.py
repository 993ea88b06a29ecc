"""The user's own labelled texts: CSV, TSV or JSON-lines files, one example per row.

* ``.csv`` / ``.tsv``: a header row naming the columns, then one row per example (RFC-4180
  quoting, so a text may hold the delimiter, quotes or newlines inside double quotes).
* ``.jsonl``: one JSON object per line, e.g. ``{"text": "turn on the lights", "label": "on"}``.

The text and label columns are ``data.text_field`` and ``data.label_field`` (default ``text`` and
``label``); other columns are ignored. Labels may be strings or integers; the classes are the
distinct labels of the training file, sorted (numerically when all are integers). A malformed file
is rejected with one line naming the file and line: a row with the wrong number of fields, an
empty text or label, a line that is not a JSON object, or a label the training file never uses.
"""

from __future__ import annotations

import csv
import json
import os

import ml_collections

from lqf.text_data.dataset import TextDataset, TextSplit

NAME = "files"
FORMATS = (".csv", ".tsv", ".jsonl")


def _rows_delimited(path: str, delimiter: str, text_field: str, label_field: str):
  """(line number, text, label) of a CSV/TSV file with a header row (texts of any length: the csv
  module's field limit, 131,072 characters by default, is lifted while reading)."""
  limit = csv.field_size_limit()
  csv.field_size_limit(2**31 - 1)
  try:
    yield from _read_delimited(path, delimiter, text_field, label_field)
  finally:
    csv.field_size_limit(limit)


def _read_delimited(path: str, delimiter: str, text_field: str, label_field: str):
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    try:
      header = next(reader)
    except StopIteration:
      raise ValueError(f"{path}: the file is empty; it needs a header row naming the "
                       f"{text_field!r} and {label_field!r} columns.") from None
    missing = [c for c in (text_field, label_field) if c not in header]
    if missing:
      raise ValueError(f"{path} line 1: the header {header} has no column {missing[0]!r}: name "
                       "the columns in the header or set data.text_field / data.label_field.")
    text_col, label_col = header.index(text_field), header.index(label_field)
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: {e}; quote texts holding the delimiter "
                         "or quotes with double quotes.") from None
      if not row:
        continue
      if len(row) != len(header):
        raise ValueError(f"{path} line {reader.line_num}: {len(row)} fields where the header has "
                         f"{len(header)}; quote texts holding the delimiter with double quotes.")
      yield reader.line_num, row[text_col], row[label_col]


def _rows_jsonl(path: str, text_field: str, label_field: str):
  """(line number, text, label) of a JSON-lines file."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                         "write one JSON object per line.") from None
      if not isinstance(record, dict) or text_field not in record or label_field not in record:
        raise ValueError(f"{path} line {number}: expected a JSON object with keys {text_field!r} "
                         f"and {label_field!r}; set data.text_field / data.label_field to yours.")
      text, label = record[text_field], record[label_field]
      if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"{path} line {number}: {text_field!r} must be a string and "
                         f"{label_field!r} a string or integer.")
      yield number, text, str(label)


def read_examples(path: str, *, text_field: str = "text",
                  label_field: str = "label") -> list[tuple[int, str, str]]:
  """The (line, text, label) rows of one file; labels as strings.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: an unknown extension or a malformed row (one line naming the row).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (set data.train_file / data.test_file).")
  extension = os.path.splitext(path)[1].lower()
  if extension not in FORMATS:
    raise ValueError(f"{path}: unknown extension {extension!r}: use one of {FORMATS}.")
  if extension == ".jsonl":
    rows = _rows_jsonl(path, text_field, label_field)
  else:
    rows = _rows_delimited(path, "," if extension == ".csv" else "\t", text_field, label_field)
  out = []
  for number, text, label in rows:
    if not text.strip() or not label.strip():
      field = text_field if not text.strip() else label_field
      raise ValueError(f"{path} line {number}: the {field!r} field is empty.")
    out.append((number, text, label.strip()))
  if not out:
    raise ValueError(f"{path}: the file holds no example.")
  return out


def _sorted_classes(labels: set[str]) -> tuple[str, ...]:
  if all(label.lstrip("-").isdigit() for label in labels):
    return tuple(sorted(labels, key=int))
  return tuple(sorted(labels))


def _split(path: str, rows: list[tuple[int, str, str]], classes: tuple[str, ...]) -> TextSplit:
  index = {name: k for k, name in enumerate(classes)}
  for number, _, label in rows:
    if label not in index:
      raise ValueError(f"{path} line {number}: label {label!r} is not among the classes of "
                       f"data.train_file {list(classes)[:20]}.")
  return TextSplit(tuple(t for _, t, _ in rows), [index[label] for _, _, label in rows])


def load(data: ml_collections.ConfigDict) -> TextDataset:
  """Reads ``data.train_file``, ``data.test_file`` and the optional ``data.heldout_file``."""
  fields = dict(text_field=data.get("text_field", "text"),
                label_field=data.get("label_field", "label"))
  paths = {"train": data.get("train_file"), "test": data.get("test_file"),
           "heldout": data.get("heldout_file")}
  for part in ("train", "test"):
    if not paths[part]:
      raise ValueError(f"data.name='files' needs data.{part}_file: the path of a "
                       f"{'/'.join(FORMATS)} file.")
  rows = {part: read_examples(path, **fields) for part, path in paths.items() if path}
  classes = _sorted_classes({label for _, _, label in rows["train"]})
  splits = {part: _split(paths[part], r, classes) for part, r in rows.items()}
  return TextDataset(NAME, classes, splits["train"], splits["test"], splits.get("heldout"),
                     {"source": {part: os.path.abspath(p) for part, p in paths.items() if p}})
