"""The embedded default corpus: CPython's own documentation topics (`pydoc_data.topics`).

It ships with every CPython install (79 topics, ~465 KB of English prose and code), so the
tiny configs train on real text with no download.
"""

from __future__ import annotations


def default_documents() -> list[str]:
  """The pydoc topic texts, one document per topic, sorted by topic key so the order (and
  with it every split and shuffle derived from it) is the same on every machine."""
  try:
    from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # stripped-down Pythons may omit pydoc_data
    raise ValueError("This Python has no pydoc_data module, which holds the embedded "
                     "default corpus; set --config.data.source to a text or JSONL path.") from e
  return [topics[key] for key in sorted(topics) if topics[key].strip()]
