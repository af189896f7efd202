"""Quiet failed Orbax reads: when a restore fails (a truncated or missing file), the reads still
in flight end in Orbax's closed asyncio loop, and tensorstore's threads print a traceback for
each (a callback into the closed loop, a future's exception never retrieved). The failure is
reported once, as one line, by the caller; this drops that noise.

  with quiet_failed_reads():
    restored = manager.restore(...)

Inside the block, and for a minute after one raised, closed-loop errors from background threads,
unraisable exceptions and asyncio's "exception was never retrieved" records are dropped. A
restore that succeeds right after a failed one (the fallback to an older step) keeps the failed
one's minute: its abandoned futures are often collected, and logged, only then.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time

# How long after a failed restore its reads may still be finishing.
_AFTER_FAILURE_S = 60.0
_state = {"reads_open": 0, "failure_until": 0.0}


def _quiet() -> bool:
  return _state["reads_open"] > 0 or time.monotonic() < _state["failure_until"]


def _closed_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _filter_excepthook(hook):
  def filtered(kind, value, traceback):
    if not (_quiet() and _closed_loop(value)):
      hook(kind, value, traceback)
  return filtered


def _filter_thread_hook(hook):
  def filtered(args):
    if not (_quiet() and _closed_loop(args.exc_value)):
      hook(args)
  return filtered


def _filter_unraisable(hook):
  def filtered(unraisable):
    if not _quiet():
      hook(unraisable)
  return filtered


class _NeverRetrieved(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (_quiet() and "exception was never retrieved" in record.getMessage())


# Callbacks from tensorstore's C++ threads report through sys.excepthook, Python threads
# through threading.excepthook, garbage-collected coroutines through sys.unraisablehook.
sys.excepthook = _filter_excepthook(sys.excepthook)
threading.excepthook = _filter_thread_hook(threading.excepthook)
sys.unraisablehook = _filter_unraisable(sys.unraisablehook)
logging.getLogger("asyncio").addFilter(_NeverRetrieved())


@contextlib.contextmanager
def quiet_failed_reads():
  """Runs an Orbax read; if it raises, its reads still in flight finish without tracebacks."""
  _state["reads_open"] += 1
  try:
    yield
  except BaseException:
    _state["failure_until"] = time.monotonic() + _AFTER_FAILURE_S
    # Abandoned futures in reference cycles log "never retrieved" when collected: do it now,
    # inside the window, rather than at some later allocation.
    gc.collect()
    raise
  finally:
    _state["reads_open"] -= 1
