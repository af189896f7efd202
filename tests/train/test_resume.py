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


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """A run SIGKILLed after step 6: (workdir, {step: loss} logged before the kill)."""
  workdir = tmp_path_factory.mktemp("killed")
  # Synchronous saves here, so that step 4's checkpoint is surely complete at the kill (the
  # last test kills during an asynchronous write).
  _kill_after_line(workdir, f"step 6/{STEPS} ", {"train.async_checkpoint": False})
  return workdir, losses(workdir)


def test_same_seed_and_config_give_identical_losses(straight, killed):
  _, expected, _ = straight
  _, before = killed  # a second process, same command: the same losses bit for bit
  assert max(before) == 6
  assert before == {s: expected[s] for s in before}


def test_sigkill_mid_run_then_resume_is_exact(straight, killed):
  _, expected, _ = straight
  workdir, _ = killed
  result = _complete(run_train_cli(workdir, env_extra=ENV))
  assert "Resumed from step 4" in result.stdout
  assert losses(workdir) == expected  # steps 5..8 redone, bit for bit


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
