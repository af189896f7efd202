"""Bad settings and data stop train.py with one `error:` line and exit code 1, before anything
in an existing workdir changes; a diverging run stops with its last good checkpoint intact."""

import hashlib
import json
import shutil

import jax.numpy as jnp
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from dsjax.train import loop
from dsjax.train.checkpointing import TrainCheckpointer
from tests.train.experiments import run_train_cli, small_experiment


def _snapshot(directory):
  """{relative path: (size, mtime, sha1)} of every file under `directory`."""
  out = {}
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    out[str(path.relative_to(directory))] = (path.stat().st_size, path.stat().st_mtime_ns,
                                             hashlib.sha1(path.read_bytes()).hexdigest())
  return out


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir holding a finished 4-step run with checkpoints."""
  workdir = tmp_path_factory.mktemp("trained")
  result = run_train_cli(workdir, {"train.steps": 4, "train.checkpoint_every": 2,
                                   "train.sample_tokens": 0})
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _write_tokenizer(path, size):
  vocab = {f"w{i}": i for i in range(size)}
  Tokenizer(WordLevel(vocab, unk_token="w0")).save(str(path))
  return path


def _bad_cases(tmp):
  (tmp / "empty.txt").write_text("")
  (tmp / "ids.jsonl").write_text(json.dumps({"tokens": [5, 6, 999, 7]}) + "\n")
  big_tokenizer = _write_tokenizer(tmp / "tokenizer.json", 300)
  two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return {
      "missing data path": ({"data.source": str(tmp / "nope.txt")}, None, "nope.txt"),
      "empty file": ({"data.source": str(tmp / "empty.txt")}, None, "empty.txt"),
      "tokenizer vocab too large": ({"data.tokenizer": str(big_tokenizer)}, None, "300"),
      "token id out of range": ({"data.source": str(tmp / "ids.jsonl")}, None, "999"),
      "mesh does not match devices": ({"mesh.data": 2}, None, "mesh"),
      "batch not divisible by data axes": ({"train.batch_size": 7}, two_devices, "batch_size"),
  }


CASES = ["missing data path", "empty file", "tokenizer vocab too large", "token id out of range",
         "mesh does not match devices", "batch not divisible by data axes"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_keeps_the_workdir(case, trained_workdir, tmp_path):
  overrides, env, needle = _bad_cases(tmp_path)[case]
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  before = _snapshot(workdir)
  result = run_train_cli(workdir, overrides, env_extra=env)
  assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert _snapshot(workdir) == before


def test_divergence_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
  """Batches after the 4th carry a NaN loss weight: the steps are skipped and counted, the run
  stops after max_bad_steps of them, and the step-4 checkpoint is intact."""
  calls = {"n": 0}
  device_batch = loop._device_batch

  def poisoned(run, batch):
    calls["n"] += 1
    out = device_batch(run, batch)
    if calls["n"] > 4:
      out["loss_mask"] = out["loss_mask"] * jnp.nan
    return out

  monkeypatch.setattr(loop, "_device_batch", poisoned)
  cfg = small_experiment(**{"train.max_bad_steps": 3, "train.eval_every": 100})
  with pytest.raises(loop.TrainingDiverged, match=r"3 consecutive steps.*step 4"):
    loop.train(cfg, tmp_path, log=lambda *_: None)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["skipped_steps"] for r in records] == [0, 0, 0, 0, 1, 1]
  assert all(r["loss"] is not None for r in records[:4])
  checkpointer = TrainCheckpointer(tmp_path / "checkpoints")
  assert checkpointer.all_steps() == [4]
  run = loop.build_run(cfg)
  state, _ = checkpointer.restore(run.abstract_state)
  assert int(state.step) == 4 and int(state.bad_steps) == 0
