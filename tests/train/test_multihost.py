"""train.py as a multi-host job on localhost: 2 processes x 4 CPU devices (jax.distributed,
gloo collectives), mesh data=2 x expert=4, against the same experiment in one process on 8
devices. The losses agree; a run SIGKILLed mid-way (both processes) and started again with
the same commands redoes the steps after its checkpoint bit for bit; there is one checkpoint
per saved step holding both processes' shards and data positions, and one metrics.jsonl
written by process 0. Bad settings stop every process with the same single `error:` line
within a bounded time, never a hang."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dsjax.train.workdir_lock import LOCK_FILE
from tests.train.experiments import ROOT, SMALL, TINY, cli_args, losses

STEPS, KILL_AFTER, RESUME_AT = 20, 13, 10
# Two layers compile in half the time of SMALL's three; every kind of layer is still there.
OVERRIDES = {**SMALL, "model.num_hidden_layers": 2, "train.steps": STEPS,
             "train.checkpoint_every": 5, "train.eval_every": 10, "train.sample_tokens": 8,
             "train.async_checkpoint": False,  # step 10's checkpoint is whole at the kill
             "mesh.data": 2, "mesh.expert": 4}
PROCESSES, DEVICES = 2, 4
INIT_TIMEOUT = 120  # --initialization_timeout of the runs; "too few processes" uses less


def _env(devices: int, **extra) -> dict[str, str]:
  flags = [f"--xla_force_host_platform_device_count={devices}",
           "--xla_backend_optimization_level=0"]  # as tests/conftest.py: faster compiles
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu",
          "PYTHONUNBUFFERED": "1", **extra}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, overrides: dict, flags: list[str]) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), f"--config={TINY}", f"--workdir={workdir}",
          *cli_args(overrides), *flags]


def _start(workdir, port: int, overrides=None, per_process=None, env_extra=None, **flags):
  """Starts PROCESSES train.py processes; per_process[i] adds flags to process i."""
  procs = []
  for i in range(PROCESSES):
    args = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={PROCESSES}",
            f"--process_id={i}", f"--initialization_timeout={INIT_TIMEOUT}",
            *[f"--{k}={v}" for k, v in flags.items()], *(per_process or {}).get(i, [])]
    procs.append(subprocess.Popen(_train_cmd(workdir, {**OVERRIDES, **(overrides or {})}, args),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT, env=_env(DEVICES, **(env_extra or {}))))
  return procs


def _finish(procs, timeout: float) -> list[tuple[int, str, str]]:
  """[(exit code, stdout, stderr)] per process; kills them all past `timeout` seconds."""
  deadline, out = time.monotonic() + timeout, []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      out.append((proc.returncode, stdout, stderr))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return out


def _ours(stdout: str) -> list[str]:
  """stdout without gloo's connection messages (printed by its C++ threads, at times cut
  into pieces by each other)."""
  return [l for l in stdout.splitlines() if l.strip() and "[Gloo]" not in l
          and "peer ranks" not in l and not l.strip().isdigit()]


def _error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error:")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The experiment in one process on 8 devices, started here and left running: it overlaps
  the multi-process runs, which spend much of their time waiting on each other."""
  workdir = tmp_path_factory.mktemp("single")
  cmd = _train_cmd(workdir, {**OVERRIDES, "train.sample_tokens": 0}, [])
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, env=_env(PROCESSES * DEVICES))
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def reference(reference_run):
  """{step: record} of the one-process run."""
  workdir, proc = reference_run
  _, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-3000:]
  return _records(workdir)


def _records(workdir) -> dict[int, dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def multihost(reference_run, tmp_path_factory):  # pylint: disable=unused-argument
  """Two processes SIGKILLed after step KILL_AFTER, then the same commands again: (workdir,
  {step: loss} logged before the kill, [(code, stdout, stderr)] of the resumed processes)."""
  workdir = tmp_path_factory.mktemp("multihost")
  # Both runs share compiled programs (the second skips most compilation; same executables).
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  procs = _start(workdir, _free_port(), env_extra=cache)
  seen = []
  try:
    for line in procs[0].stdout:
      seen.append(line)
      if f"step {KILL_AFTER}/{STEPS} " in line:
        break
  finally:
    for proc in procs:
      proc.send_signal(signal.SIGKILL)
    for proc in procs:
      proc.communicate(timeout=60)
  assert all(p.returncode == -signal.SIGKILL for p in procs), "".join(seen)[-3000:]
  before = losses(workdir)
  assert max(before) >= KILL_AFTER, "".join(seen)[-3000:]
  resumed = _finish(_start(workdir, _free_port(), env_extra=cache), timeout=900)
  for code, _, stderr in resumed:
    assert code == 0, stderr[-3000:]
  return workdir, before, resumed


def test_losses_equal_the_single_process_run(multihost, reference):
  workdir, _, _ = multihost
  records = _records(workdir)
  assert sorted(records) == sorted(reference) == list(range(1, STEPS + 1))
  for step, expected in reference.items():
    got = records[step]
    # Same global batches; the rows sit on other devices (each process holds a strided share
    # of them) and gloo sums in its own order: float32 rounding (measured: <= 1.2e-6).
    for key in ("loss", "mtp_loss", "grad_norm", "eval_loss"):
      if key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=f"{step} {key}")
    # Integer expert counts: equal iff every token picked the same experts at every step.
    assert got["expert_imbalance"] == expected["expert_imbalance"], step
    assert got["lr"] == expected["lr"]
  assert reference[1]["loss"] - reference[STEPS]["loss"] > 0.5  # it trained


def test_resume_after_sigkill_redoes_the_same_steps(multihost):
  workdir, before, resumed = multihost
  assert "Resumed from step 10" in resumed[0][1]
  after = losses(workdir)
  redone = [s for s in before if s > RESUME_AT]
  assert redone and max(redone) >= KILL_AFTER
  assert {s: after[s] for s in before} == before  # bit for bit, before and after the kill
  assert "Took over" in resumed[0][1]  # the killed run's lock did not block


def test_one_checkpoint_per_step_holds_every_process_share(multihost):
  workdir, _, _ = multihost
  checkpoints = workdir / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir()) == [10, 15, 20]
  for step in (10, 15, 20):
    data = checkpoints / str(step) / "data"
    for i in range(PROCESSES):
      state = json.loads((data / f"process_{i}_of_{PROCESSES}.json").read_text())
      assert state["next_batch"] == step and state["process_index"] == i
    shards = sorted(p.name for p in (checkpoints / str(step) / "state").glob("ocdbt.process_*"))
    assert shards == [f"ocdbt.process_{i}" for i in range(PROCESSES)]


def test_process_0_alone_writes_metrics_logs_and_the_sample(multihost):
  workdir, _, resumed = multihost
  assert sorted(p.name for p in workdir.glob("*.jsonl")) == ["metrics.jsonl"]
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, STEPS + 1))
  assert len(list((workdir / "tensorboard").iterdir())) == 2  # one per run (process 0's)
  assert json.loads((workdir / "experiment.json").read_text())["mesh"]["expert"] == 4
  out0, out1 = _ours(resumed[0][1]), _ours(resumed[1][1])
  assert any(l.startswith("dsjax:") and "2 processes" in l for l in out0)
  assert "Sample:" in out0 and f"step {STEPS}/{STEPS} " in resumed[0][1]
  ours = ("dsjax:", "data:", "step ", "Resumed", "Took over", "First step", "Sample:")
  assert not [l for l in out1 if any(m in l for m in ours)], out1[:5]
  assert not (workdir / LOCK_FILE).exists()


def _error_cases(tmp) -> dict:
  """{case: (start kwargs, text every process's error line must contain, timeout)}."""
  locked = tmp / "locked"
  locked.mkdir()
  (locked / LOCK_FILE).write_text(json.dumps(  # held by this (running) test process
      {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
       "since": time.time()}))
  return {
      "num_processes differs": (
          {"per_process": {1: ["--num_processes=3"]}}, "--num_processes=3", 120),
      "too few processes": (
          {"num_processes": 3, "initialization_timeout": 5}, "did not all connect", 120),
      "mesh does not match the devices": (
          {"overrides": {"mesh.data": 3}}, "8 are available", 120),
      "batch not split over the processes": (
          {"overrides": {"mesh.data": 1, "mesh.expert": 1, "mesh.tensor": 8}}, "each process",
          120),
      "another config on one process": (
          {"per_process": {1: ["--config.train.steps=21"]}}, "another experiment config", 120),
      "workdir in use": ({"workdir": locked}, "in use by another train.py run", 120),
  }


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("errors")
  cases = _error_cases(tmp)

  def run(case):
    kwargs, _, timeout = cases[case]
    kwargs = dict(kwargs)
    workdir = kwargs.pop("workdir", tmp / case.replace(" ", "_"))
    began = time.monotonic()
    results = _finish(_start(workdir, _free_port(), **kwargs), timeout)
    return results, time.monotonic() - began

  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {case: pool.submit(run, case) for case in cases}
    return {case: (cases[case][1], *f.result()) for case, f in futures.items()}


@pytest.mark.parametrize("case", ["num_processes differs", "too few processes",
                                  "mesh does not match the devices",
                                  "batch not split over the processes",
                                  "another config on one process", "workdir in use"])
def test_bad_setting_stops_every_process_with_the_same_line(case, error_runs):
  needle, results, seconds = error_runs[case]
  lines = []
  for code, _, stderr in results:
    assert code == 1, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1 and needle in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines.append(errors[0])
  assert len(set(lines)) == 1, lines
  assert seconds < 100


def test_incomplete_flags_are_one_error_line(tmp_path):
  result = subprocess.run(
      _train_cmd(tmp_path, OVERRIDES, ["--coordinator_address=127.0.0.1:1234",
                                       "--num_processes=2"]),
      capture_output=True, text=True, cwd=ROOT, env=_env(DEVICES), timeout=120)
  assert result.returncode == 1
  errors = _error_lines(result.stderr)
  assert len(errors) == 1 and "also needs --process_id" in errors[0], result.stderr[-2000:]
