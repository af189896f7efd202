"""train.py resumes exactly: a run SIGKILLed mid-training, or while a checkpoint is being
written, and then re-run with the same command logs the same loss at every step as a run that
was never interrupted; and two runs of one config log identical losses."""

import os
import signal
import subprocess
import sys

import pytest

from tests.train.experiments import ROOT, SMALL, TINY, cli_args, losses, run_train_cli

STEPS = SMALL["train.steps"]          # 8 steps, checkpoints at 4 and 8
ENV = {"PYTHONUNBUFFERED": "1"}


def _complete(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: (workdir, {step: loss}, stdout)."""
  workdir = tmp_path_factory.mktemp("straight")
  result = _complete(run_train_cli(workdir, env_extra=ENV))
  return workdir, losses(workdir), result.stdout


def test_straight_run_logs_every_step_and_samples(straight):
  _, logged, stdout = straight
  assert sorted(logged) == list(range(1, STEPS + 1))
  assert "Sample:" in stdout


def _kill_after_line(workdir, marker: str, overrides: dict) -> str:
  """Starts train.py and SIGKILLs it once `marker` appears on its stdout."""
  args = [sys.executable, str(ROOT / "train.py"), f"--config={TINY}", f"--workdir={workdir}"]
  args += cli_args({**SMALL, **overrides})
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=ROOT, env={**os.environ, **ENV})
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if marker in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
  return "".join(seen)


def test_sigkill_mid_run_then_resume_is_exact(straight, tmp_path):
  _, expected, _ = straight
  # Synchronous saves here, so that step 4's checkpoint is surely complete at the kill (the
  # next test kills during an asynchronous write).
  _kill_after_line(tmp_path, f"step 6/{STEPS} ", {"train.async_checkpoint": False})
  before = losses(tmp_path)
  assert max(before) == 6
  # Same seed and config in a fresh process: identical losses (determinism).
  assert before == {s: expected[s] for s in before}
  result = _complete(run_train_cli(tmp_path, env_extra=ENV))
  assert "Resumed from step 4" in result.stdout
  assert losses(tmp_path) == expected  # steps 5..8 redone, bit for bit


def test_sigkill_during_checkpoint_write_then_resume_is_exact(straight, tmp_path):
  _, expected, _ = straight
  killer = [sys.executable, str(ROOT / "tests" / "train" / "_train_killed_in_save.py"),
            f"--config={TINY}", f"--workdir={tmp_path}", *cli_args(SMALL)]
  result = subprocess.run(killer, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **ENV, "DSJAX_KILL_AT_SAVE": str(STEPS)})
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert f"killing during the save of step {STEPS}" in result.stdout
  assert not (tmp_path / "checkpoints" / str(STEPS) / "state").exists()
  result = _complete(run_train_cli(tmp_path, env_extra=ENV))
  assert "Resumed from step 4" in result.stdout  # the interrupted save never counts
  assert losses(tmp_path) == expected
