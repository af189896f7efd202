"""Training metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

On resume the log is cut back to the restored step, so every step appears once and a resumed
run's log reads exactly like an uninterrupted one. In a multi-process run only process 0 writes
(`enabled=False` elsewhere: the records are still built, nothing is written).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
  """JSON-ready scalars and lists (NaN/inf become None; JSON has no such numbers)."""
  value = np.asarray(value)
  if value.ndim:
    return [to_python(v) for v in value]
  item = value.item()
  if isinstance(item, float) and not math.isfinite(item):
    return None
  return item


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl` (empty when there is none)."""
  path = Path(workdir) / METRICS_FILE
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
  """Appends metric records to metrics.jsonl and TensorBoard (tensorboardX when installed);
  with `enabled=False` it only builds the records."""

  def __init__(self, workdir: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
    self.path = Path(workdir) / METRICS_FILE
    self._file = self._tb = None
    if enabled:
      self._truncate_after(resume_step)
      self._file = open(self.path, "a", encoding="utf-8")
      self._tb = self._tensorboard(Path(workdir) / "tensorboard")

  def _truncate_after(self, step: int) -> None:
    """Drops records past `step`: they belong to steps that the resumed run will redo."""
    if not self.path.is_file():
      return
    kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, self.path)

  @staticmethod
  def _tensorboard(directory: Path):
    try:
      from tensorboardX import SummaryWriter
    except ImportError:
      return None
    return SummaryWriter(str(directory))

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Records `metrics` at `step`; array metrics (per layer) go to TensorBoard per index."""
    record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    if self._file is None:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
          if isinstance(v, (int, float)) and not isinstance(v, bool) and key != "step":
            self._tb.add_scalar(key if len(values) == 1 else f"{key}/{i}", v, step)
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
