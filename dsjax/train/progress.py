"""A one-line console progress bar: step, loss, lr, tokens/s and ETA. On a terminal it redraws
in place; in a log file (no tty) it prints one line per update. `enabled=False` (the processes
other than 0 of a multi-process run) prints nothing."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
  """`update(step, loss=..., lr=..., tokens_per_sec=...)` after steps; `close()` at the end."""

  def __init__(self, total_steps: int, start_step: int = 0, width: int = 24, stream=None,
               enabled: bool = True):
    self.total, self.start, self.width = total_steps, start_step, width
    self.stream = (stream or sys.stdout) if enabled else None
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.perf_counter()

  def line(self, step: int, **values: float) -> str:
    done = step / max(self.total, 1)
    filled = int(round(done * self.width))
    bar = "#" * filled + "." * (self.width - filled)
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 and step > self.start else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    parts = [f"step {step}/{self.total} [{bar}]"]
    parts += [f"{k} {v:.4g}" if k != "tokens_per_sec" else f"{v:,.0f} tok/s"
              for k, v in values.items() if v is not None]
    parts.append(f"ETA {_duration(eta)}" if eta == eta else "ETA ?")
    return "  ".join(parts)

  def update(self, step: int, **values: float) -> None:
    if self.stream is None:
      return
    text = self.line(step, **values)
    if self.tty:
      self.stream.write("\r" + text + "\x1b[K")
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """Prints `text` on its own line without breaking the bar."""
    if self.stream is None:
      return
    self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
