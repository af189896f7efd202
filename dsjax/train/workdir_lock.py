"""One training run per workdir: `<workdir>/train.lock` names the run that holds it and is
refreshed while it runs; the lock of a run that is gone (SIGKILLed, or on another host and no
longer refreshed) does not block the next one.

  lock = WorkdirLock(workdir)
  note = lock.acquire()   # FileExistsError naming the holder, or a note when it took over
  ...
  lock.release()
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_FILE = "train.lock"
_LOCK_REFRESH_S = 60      # the owner touches the lock this often...
_LOCK_STALE_S = 600       # ...so a lock from another host untouched this long is abandoned


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` (Linux /proc; None elsewhere or when it does not run):
  with the pid it names one process, even after the pid is reused."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_runs(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """One training run per workdir: `<workdir>/train.lock` names the run that holds it (host,
  pid, start time) and is refreshed every minute while it runs. A lock whose run is gone does
  not block the next one: on the same host its pid no longer runs (a SIGKILLed run), on
  another host it has not been refreshed for 10 minutes."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / LOCK_FILE
    self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                   "pid_start": _process_start(os.getpid()), "since": time.time()}
    self._stop = threading.Event()
    self._held = False

  def acquire(self) -> str | None:
    """Takes the lock; returns a note when it replaced an abandoned one. Raises
    FileExistsError naming the run that holds it."""
    text = json.dumps(self._owner)
    for _ in range(5):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        note = self._take_over_if_abandoned(text)
        if note is None:
          continue  # the lock changed hands while we looked: look again
      else:
        with os.fdopen(fd, "w") as f:
          f.write(text)
        note = ""
      self._held = True
      threading.Thread(target=self._refresh, daemon=True).start()
      return note or None
    raise FileExistsError(f"Could not take {self.path}: other runs keep replacing it.")

  def _take_over_if_abandoned(self, text: str) -> str | None:
    """Replaces an abandoned lock with ours (under flock, so that of two runs finding it
    abandoned one wins); "" if it vanished meanwhile, None to retry."""
    try:
      f = open(self.path, "r+", encoding="utf-8")
    except FileNotFoundError:
      return None
    with f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX)
      except OSError:  # a filesystem without flock: the check below still holds mostly
        pass
      current = f.read()
      reason = self._abandoned(current)
      if reason is None:
        raise FileExistsError(self._busy_message(current))
      f.seek(0)
      f.truncate()
      f.write(text)
      f.flush()
    return f"Took over {self.path}: {reason}."

  def _abandoned(self, text: str) -> str | None:
    """Why the lock holding `text` is abandoned, or None when its run may be alive."""
    age = time.time() - self.path.stat().st_mtime
    try:
      owner = json.loads(text)
      host, pid = owner["host"], int(owner["pid"])
    except (ValueError, KeyError, TypeError):
      # Being written by a run that just created it, or garbage: judge by age.
      return f"its content was unreadable for {age:.0f} s" if age > _LOCK_REFRESH_S else None
    if host == self._owner["host"]:
      started = owner.get("pid_start")
      if not _pid_runs(pid):
        return f"its run (pid {pid}) is gone"
      if started is None and pid == os.getpid():  # e.g. a restarted container's same pid
        return f"its run (pid {pid}) is gone; this process has that pid now"
      if started is not None and _process_start(pid) not in (None, started):
        return f"its run (pid {pid}) is gone; that pid is another process now"
      return None
    if age > _LOCK_STALE_S:
      return f"its run on {host} has not refreshed it for {age / 60:.0f} minutes"
    return None

  def _busy_message(self, text: str) -> str:
    try:
      owner = json.loads(text)
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["since"])))
      who = f"pid {owner['pid']} on {owner['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
      who = "a run that is starting"
    return (f"{self.path.parent} is in use by another train.py run ({who}); wait for it to "
            f"end or pick another --workdir (if that run is gone, delete {self.path}).")

  def _refresh(self) -> None:
    while not self._stop.wait(_LOCK_REFRESH_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    """Removes the lock if this run still holds it."""
    if not self._held:
      return
    self._stop.set()
    self._held = False
    try:
      if self.path.read_text(encoding="utf-8") == json.dumps(self._owner):
        self.path.unlink()
    except OSError:
      pass
