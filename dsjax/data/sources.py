"""Document readers: the embedded corpus, text files, JSONL and ArrayRecord.

`load_documents(source, text_field)` returns `Document`s, each carrying either text (to be
tokenized) or pre-tokenized ids (used as they are, no bos/eos added), plus a `where` label
("file.jsonl:12", "data.array_record record 7") that error messages name.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from dsjax.data.corpus import default_documents

_SOURCE_ADVICE = ("set --config.data.source to 'default' or to a .txt file, a directory of "
                  ".txt files, a glob, a .jsonl file or an .array_record file")
_READ_BLOCK = 1024  # ArrayRecord records fetched per call


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: exactly one of `text` / `tokens` (1-D int64 ids) is set."""
  where: str
  text: str | None = None
  tokens: np.ndarray | None = None


def _token_array(value: Any, where: str) -> np.ndarray:
  arr = np.asarray(value) if isinstance(value, list) else None
  if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
    raise ValueError(f"{where}: \"tokens\" must be a flat list of integer token ids; fix the "
                     "record or give the text in the text field instead.")
  return arr.astype(np.int64)


def _from_record(obj: dict, text_field: str, where: str) -> Document | None:
  """The document of one JSON object, or None when it holds no text."""
  if text_field in obj:
    text = obj[text_field]
    if not isinstance(text, str):
      raise ValueError(f"{where}: field \"{text_field}\" is a {type(text).__name__}, not a "
                       "string; store the text as a JSON string.")
    return Document(where, text=text) if text.strip() else None
  if "tokens" in obj:
    tokens = _token_array(obj["tokens"], where)
    return Document(where, tokens=tokens) if tokens.size else None
  raise ValueError(f"{where}: no \"{text_field}\" or \"tokens\" field (keys: "
                   f"{sorted(obj)[:8]}); set --config.data.text_field to the field holding "
                   "the text.")


def _decode_utf8(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: byte {e.start} is not valid UTF-8; convert the data to "
                     "UTF-8.") from None


def _read_text(path: str) -> list[Document]:
  with open(path, "rb") as f:
    text = _decode_utf8(f.read(), path)
  return [Document(path, text=text)] if text.strip() else []


def _read_jsonl(path: str, text_field: str) -> list[Document]:
  docs = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      line = _decode_utf8(raw, where).strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON "
                         f"object such as {{\"{text_field}\": \"...\"}}.") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSON {type(obj).__name__}, not an object; each line "
                         f"must be one JSON object such as {{\"{text_field}\": \"...\"}}.")
      doc = _from_record(obj, text_field, where)
      if doc is not None:
        docs.append(doc)
  return docs


def _read_array_record(path: str, text_field: str) -> list[Document]:
  import grain  # pylint: disable=import-outside-toplevel
  try:
    source = grain.sources.ArrayRecordDataSource(path)
    num_records = len(source)
  except Exception as e:  # the C++ reader raises bare RuntimeErrors with internal detail
    raise ValueError(f"Could not read {path!r} as an ArrayRecord file ({e}); check the file "
                     f"or {_SOURCE_ADVICE}.") from e
  docs = []
  for first in range(0, num_records, _READ_BLOCK):
    indices = list(range(first, min(first + _READ_BLOCK, num_records)))
    for index, raw in zip(indices, source.__getitems__(indices)):
      where = f"{path} record {index}"
      text = _decode_utf8(raw, where)
      obj = None
      if text.lstrip().startswith("{"):
        try:
          obj = json.loads(text)
        except json.JSONDecodeError:
          pass  # text that merely starts with a brace
      if isinstance(obj, dict):
        doc = _from_record(obj, text_field, where)
      else:
        doc = Document(where, text=text) if text.strip() else None
      if doc is not None:
        docs.append(doc)
  return docs


def _read_file(path: str, text_field: str) -> list[Document]:
  if path.endswith(".jsonl"):
    return _read_jsonl(path, text_field)
  if path.endswith(".array_record") or ".array_record-" in os.path.basename(path):
    return _read_array_record(path, text_field)
  return _read_text(path)  # .txt, and any other extension, is plain UTF-8 text


def _source_files(source: str) -> list[str]:
  if any(c in source for c in "*?["):
    files = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f"No files match the data source glob {source!r}; "
                              f"{_SOURCE_ADVICE}.")
    return files
  if os.path.isdir(source):
    files = sorted(glob.glob(os.path.join(source, "**", "*.txt"), recursive=True))
    if not files:
      raise ValueError(f"Data source directory {source!r} holds no .txt files; add some or "
                       f"{_SOURCE_ADVICE}.")
    return files
  if not os.path.exists(source):
    raise FileNotFoundError(f"Data source {source!r} does not exist; {_SOURCE_ADVICE}.")
  return [source]


def load_documents(source: str, text_field: str = "text") -> list[Document]:
  """The non-empty documents of `source` ("default" or a path, see module docstring), in a
  deterministic order (files sorted, records in file order). Empty files within a directory
  or glob are skipped; a source with no text at all is an error."""
  source = os.fspath(source)
  if source == "default":
    return [Document(f"default corpus document {i}", text=text)
            for i, text in enumerate(default_documents())]
  files = _source_files(source)
  docs = [doc for path in files for doc in _read_file(path, text_field)]
  if not docs:
    what = f"{files[0]!r} is empty" if len(files) == 1 else (
        f"the {len(files)} files of {source!r} are empty")
    raise ValueError(f"Data source has no text: {what}; {_SOURCE_ADVICE}.")
  return docs
