"""Runs a pod can trust: train.py started from another directory finds its default config; a
second run on a workdir in use stops with one line while the first finishes untouched; a
truncated latest checkpoint is skipped with one warning line (resuming exactly from the one
before, nothing deleted) and infer.py names it and --step; the workdir lock of a killed run
does not block the next one."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dsjax.train.workdir_lock import LOCK_FILE, WorkdirLock
from tests.train.experiments import ROOT, SMALL, cli_args, losses

STEPS = SMALL["train.steps"]          # 8 steps, checkpoints at 4 and 8
OVERRIDES = {**SMALL, "train.sample_tokens": 0, "train.async_checkpoint": False}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


def _train_args(workdir) -> list[str]:
  """train.py without --config: the default (configs/tiny.py) must be found from anywhere."""
  return [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *cli_args(OVERRIDES)]


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def _snapshot(directory) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
  """Run A from a directory outside the repository (default config); once it holds the
  workdir, run B with the same command. Returns (workdir, (A's exit code, stdout, stderr, its
  lock file's text), B's CompletedProcess)."""
  elsewhere = tmp_path_factory.mktemp("elsewhere")
  workdir = elsewhere / "run"
  first = subprocess.Popen(_train_args(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=elsewhere, env=ENV)
  seen = []
  for line in first.stdout:  # the lock is held from before the "dsjax:" line on
    seen.append(line)
    if line.startswith("dsjax:"):
      break
  lock_text = (workdir / LOCK_FILE).read_text() if (workdir / LOCK_FILE).exists() else ""
  first.send_signal(signal.SIGSTOP)  # A holds the lock (alive) for as long as B needs
  try:
    second = subprocess.run(_train_args(workdir), capture_output=True, text=True,
                            cwd=elsewhere, env=ENV, timeout=300)
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=600)
  return workdir, (first.returncode, "".join(seen) + out, err, lock_text), second


def test_train_py_runs_from_any_directory_with_its_default_config(concurrent):
  workdir, (code, out, err, _), _ = concurrent
  assert code == 0, err[-3000:]
  assert "OSError" not in err and "Traceback" not in err
  assert json.loads((workdir / "experiment.json").read_text())["model"]["vocab_size"] == 256
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))


def test_second_run_on_a_workdir_in_use_stops_with_one_line(concurrent):
  workdir, (code, _, _, lock_text), second = concurrent
  assert json.loads(lock_text)["host"] == socket.gethostname()
  assert second.returncode == 1, second.stderr[-3000:]
  errors = _error_lines(second.stderr)
  assert len(errors) == 1 and "in use by another train.py run" in errors[0], second.stderr
  assert f"pid {json.loads(lock_text)['pid']}" in errors[0]
  assert "Traceback" not in second.stderr and second.stdout == ""
  # The first run was not disturbed: every step logged once, both checkpoints, lock released.
  assert code == 0
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
  assert not (workdir / LOCK_FILE).exists()


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_truncated_latest_checkpoint_is_skipped_and_kept(concurrent, tmp_path):
  finished, _, _ = concurrent
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-a", str(finished), str(workdir)], check=True)
  expected = losses(workdir)
  # Cut every data file of step 8's state in half (which file holds which arrays varies from
  # save to save, and infer.py reads only the parameters).
  data_files = [p for p in (workdir / "checkpoints" / "8" / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    os.truncate(path, path.stat().st_size // 2)
  bad_before = _snapshot(workdir / "checkpoints" / "8")
  # A SIGKILLed run's lock (a pid that no longer runs) must not block the resume.
  (workdir / LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": _dead_pid(), "pid_start": None,
       "since": time.time()}))
  result = subprocess.run(_train_args(workdir), capture_output=True, text=True, cwd=tmp_path,
                          env=ENV, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stdout.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1, result.stdout
  assert "checkpoint step 8" in warnings[0] and "resuming from step 4" in warnings[0]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "Resumed from step 4" in result.stdout and "Took over" in result.stdout
  assert losses(workdir) == expected  # steps 5..8 redone from step 4, bit for bit
  assert _snapshot(workdir / "checkpoints" / "8") == bad_before  # nothing deleted or rewritten
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
  # infer.py stops with one line naming the bad checkpoint and the flag to pick another.
  infer = subprocess.run([sys.executable, str(ROOT / "infer.py"), f"--checkpoint={workdir}",
                          "--prompt=The ", "--max_new_tokens=2"], capture_output=True,
                         text=True, cwd=tmp_path, env=ENV, timeout=300)
  assert infer.returncode == 1
  errors = _error_lines(infer.stderr)
  assert len(errors) == 1 and "checkpoints/8" in errors[0] and "--step=4" in errors[0], \
      infer.stderr[-3000:]
  assert "Traceback" not in infer.stderr


def test_workdir_lock_detects_abandoned_locks(tmp_path):
  lock = WorkdirLock(tmp_path)
  assert lock.acquire() is None
  with pytest.raises(FileExistsError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
    WorkdirLock(tmp_path).acquire()  # held (this process runs)
  lock.release()
  assert not lock.path.exists()
  # The lock of a run on another host: fresh it blocks, untouched for 10 minutes it does not.
  other = {"host": "other-host", "pid": 1, "pid_start": None, "since": time.time()}
  lock.path.write_text(json.dumps(other))
  with pytest.raises(FileExistsError, match="other-host"):
    WorkdirLock(tmp_path).acquire()
  old = time.time() - 11 * 60
  os.utime(lock.path, (old, old))
  taker = WorkdirLock(tmp_path)
  assert "has not refreshed it" in taker.acquire()
  assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  taker.release()
  # A pid of this host that no longer runs: abandoned.
  lock.path.write_text(json.dumps({**other, "host": socket.gethostname(), "pid": _dead_pid()}))
  taker = WorkdirLock(tmp_path)
  assert "is gone" in taker.acquire()
  taker.release()
  assert not lock.path.exists()


def test_killed_run_leaves_no_stuck_lock(tmp_path):
  """A process holding the lock is SIGKILLed: the next acquire takes it over."""
  code = ("import sys, time; sys.path.insert(0, sys.argv[2]);"
          "from dsjax.train.workdir_lock import WorkdirLock;"
          "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(ROOT)],
                            stdout=subprocess.PIPE, text=True, env=ENV)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(FileExistsError, match=f"pid {holder.pid}"):
    WorkdirLock(tmp_path).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=60)
  lock = WorkdirLock(tmp_path)
  assert f"pid {holder.pid}" in lock.acquire()
  lock.release()
