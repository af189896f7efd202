"""Document readers: embedded corpus, text files / directories / globs, JSONL, ArrayRecord,
and their error messages."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from dsjax.data import default_documents, load_documents


def write_array_record(path, records: list[bytes]) -> str:
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  return str(path)


def write_jsonl(path, objects) -> str:
  path.write_text("".join(json.dumps(o) + "\n" for o in objects))
  return str(path)


def test_default_corpus_is_the_sorted_pydoc_topics():
  from pydoc_data.topics import topics
  docs = default_documents()
  assert docs == [topics[k] for k in sorted(topics)]
  assert len(docs) >= 70 and sum(map(len, docs)) > 300_000
  loaded = load_documents("default")
  assert [d.text for d in loaded] == docs and loaded[0].where.startswith("default")


def test_text_file_directory_and_glob(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("second\n\nstill the second document")
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "sub" / "c.txt").write_text("third")
  (tmp_path / "empty.txt").write_text("  \n")  # skipped inside a directory
  (tmp_path / "notes.md").write_text("not a .txt file")
  single = load_documents(str(tmp_path / "b.txt"))
  assert [d.text for d in single] == ["second\n\nstill the second document"]
  assert [d.text for d in load_documents(str(tmp_path))] == [
      "first", "second\n\nstill the second document", "third"]
  assert [d.text for d in load_documents(str(tmp_path / "*.txt"))] == [
      "first", "second\n\nstill the second document"]


def test_jsonl_text_and_tokens(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [
      {"body": "alpha", "id": 1}, {"tokens": [5, 6, 7]}, {"body": ""}, {"body": "beta"}])
  docs = load_documents(path, text_field="body")
  assert [d.text for d in docs] == ["alpha", None, "beta"]
  assert docs[1].tokens.tolist() == [5, 6, 7] and docs[1].where == f"{path}:2"


def test_array_record_json_and_plain_text(tmp_path):
  path = write_array_record(tmp_path / "d.array_record", [
      json.dumps({"text": "json doc"}).encode(), "plain ünïcode text".encode(),
      json.dumps({"tokens": [1, 2]}).encode(), b"{not json, but text"])
  docs = load_documents(path)
  assert [d.text for d in docs] == ["json doc", "plain ünïcode text", None,
                                    "{not json, but text"]
  assert docs[2].tokens.tolist() == [1, 2] and docs[2].where == f"{path} record 2"


@pytest.mark.parametrize("source", ["missing.txt", "missing_dir/*.jsonl"])
def test_missing_source(tmp_path, source):
  path = str(tmp_path / source)
  with pytest.raises(FileNotFoundError, match=r"missing.*--config\.data\.source"):
    load_documents(path)


@pytest.mark.parametrize("name,content", [("e.txt", ""), ("e.jsonl", "\n\n"),
                                          ("e.jsonl", '{"text": "  "}\n')])
def test_empty_sources(tmp_path, name, content):
  (tmp_path / name).write_text(content)
  with pytest.raises(ValueError, match=rf"{name}.*empty.*--config\.data\.source"):
    load_documents(str(tmp_path / name))


def test_empty_array_record_and_directory(tmp_path):
  path = write_array_record(tmp_path / "e.array_record", [b"", b"   "])
  with pytest.raises(ValueError, match=r"e\.array_record.*empty"):
    load_documents(path)
  (tmp_path / "d").mkdir()
  with pytest.raises(ValueError, match=r"no \.txt files"):
    load_documents(str(tmp_path / "d"))


@pytest.mark.parametrize("line,pattern", [
    ("{broken", r"b\.jsonl:2: not valid JSON"),
    ('["a list"]', r"b\.jsonl:2: a JSON list, not an object"),
    ('{"content": "x"}', r"b\.jsonl:2: no \"text\" or \"tokens\" field.*text_field"),
    ('{"text": 3}', r"b\.jsonl:2: field \"text\" is a int"),
    ('{"tokens": [1, 2.5]}', r"b\.jsonl:2: \"tokens\" must be a flat list of integer"),
])
def test_bad_jsonl_line(tmp_path, line, pattern):
  (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
  with pytest.raises(ValueError, match=pattern):
    load_documents(str(tmp_path / "b.jsonl"))


def test_bad_array_record_json_and_utf8(tmp_path):
  path = write_array_record(tmp_path / "b.array_record", [b'{"txt": "x"}'])
  with pytest.raises(ValueError, match=r"b\.array_record record 0: no \"text\""):
    load_documents(path)
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1\.txt: byte 3 is not valid UTF-8"):
    load_documents(str(tmp_path / "latin1.txt"))


def test_token_arrays_are_int64(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", [{"tokens": [2**40, 0]}])
  assert load_documents(path)[0].tokens.dtype == np.int64
