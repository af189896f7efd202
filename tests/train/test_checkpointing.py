"""TrainCheckpointer: exact round trips, retention, async saves, atomicity under SIGKILL,
sharded restores and the errors a wrong --workdir or config gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.train.checkpointing import TrainCheckpointer
from tests.train import _checkpoint_worker as worker

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(worker.__file__).resolve()


def _worker_env(**extra) -> dict:
  path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", **extra)


class _Tiny(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    self.proj = nnx.Linear(3, width, rngs=rngs)
    self.scale = nnx.Param(jnp.linspace(0.5, 1.5, width, dtype=jnp.bfloat16))


class _State(NamedTuple):
  step: Any
  params: nnx.State
  opt_state: Any
  rng: Any
  bad_steps: Any


def _train_state(width: int = 4, seed: int = 0, step: int = 7) -> _State:
  _, params = nnx.split(_Tiny(width, nnx.Rngs(seed)), nnx.Param)
  opt_state = optax.adamw(1e-3).init(params)
  # Non-trivial moments, so an optimizer state restored as zeros would be caught.
  opt_state = jax.tree.map(lambda x: x + 0.25 if x.ndim else x + 3, opt_state)
  return _State(step=jnp.int32(step), params=params, opt_state=opt_state,
                rng=jax.random.key(seed + 11), bad_steps=jnp.int32(2))


def _plain(x):
  return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x)


def _assert_same(got, want) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(_plain(g), _plain(w))


def test_round_trip_is_exact(tmp_path):
  state = _train_state()
  data_state = {"epoch": 1, "next_index": 1234, "nested": {"files": ["a", "b"]}}
  with TrainCheckpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(7, state, data_state, eval_loss=2.5)
    restored, restored_data = ckpt.restore(jax.eval_shape(lambda: state))
  _assert_same(restored, state)
  assert isinstance(restored.params, nnx.State)
  assert isinstance(restored.params["scale"], nnx.Param)
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert restored_data == data_state


def test_restore_into_concrete_target_and_chosen_step(tmp_path):
  with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _train_state(seed=1, step=1), {"i": 1})
    ckpt.save(2, _train_state(seed=2, step=2), {"i": 2})
    target = _train_state(seed=9, step=0)
    restored, data_state = ckpt.restore(target, step=1)
  _assert_same(restored, _train_state(seed=1, step=1))
  assert data_state == {"i": 1}


def test_latest_and_all_steps(tmp_path):
  ckpt = TrainCheckpointer(tmp_path, keep=10, async_save=False)
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  for step in (3, 10, 20):
    ckpt.save(step, _train_state(step=step), {})
  assert ckpt.latest_step() == 20 and ckpt.all_steps() == [3, 10, 20]
  ckpt.close()
  reopened = TrainCheckpointer(tmp_path, keep=10)
  assert reopened.latest_step() == 20 and reopened.all_steps() == [3, 10, 20]
  reopened.close()


def test_retention_keeps_latest_and_best(tmp_path):
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: float("nan"), 6: 1.5}
  ckpt = TrainCheckpointer(tmp_path, keep=2, async_save=True)
  for step, loss in losses.items():
    assert ckpt.save(step, _train_state(step=step), {"step": step}, eval_loss=loss)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 5, 6]
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 5, 6]
  ckpt.close()
  # A restarted run still knows step 2 is the best: the loss is stored with the checkpoint.
  ckpt = TrainCheckpointer(tmp_path, keep=2, async_save=False)
  ckpt.save(7, _train_state(step=7), {"step": 7})
  ckpt.save(8, _train_state(step=8), {"step": 8}, eval_loss=1.2)
  assert ckpt.all_steps() == [2, 7, 8]
  restored, data_state = ckpt.restore(jax.eval_shape(_train_state), step=2)
  _assert_same(restored, _train_state(step=2))
  assert data_state == {"step": 2}
  ckpt.close()


def test_async_save_survives_donated_buffers(tmp_path):
  state = _train_state(width=64, seed=5)
  expected = jax.tree.map(_plain, state)
  abstract = jax.eval_shape(lambda: state)
  with TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.save(1, state, {"pos": 5})
    # A jitted train step donates the state right after save(); the save must not need it.
    for leaf in jax.tree.leaves(state):
      leaf.delete()
    ckpt.wait()
    restored, _ = ckpt.restore(abstract)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(_plain(got), want)


def test_same_step_twice_is_a_no_op(tmp_path):
  with TrainCheckpointer(tmp_path, keep=5) as ckpt:
    assert ckpt.save(5, _train_state(step=5), {"v": 1})
    assert not ckpt.save(5, _train_state(step=99), {"v": 2})
    assert not ckpt.save(5, _train_state(step=99), {"v": 2}, force=True)
    # Older than the latest: skipped unless forced.
    assert not ckpt.save(3, _train_state(step=3), {"v": 3})
    assert ckpt.save(3, _train_state(step=3), {"v": 3}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 5]
    restored, data_state = ckpt.restore(jax.eval_shape(_train_state), step=5)
  assert int(restored.step) == 5 and data_state == {"v": 1}


def test_restore_with_requested_sharding(tmp_path):
  mesh = Mesh(np.asarray(jax.devices()).reshape(-1), ("fsdp",))
  state = _train_state(width=8)
  with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, {})
    specs = {1: P("fsdp"), 2: P(None, "fsdp")}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=NamedSharding(mesh, specs.get(x.ndim, P()))),
        jax.eval_shape(lambda: state))
    restored, _ = ckpt.restore(abstract)
  _assert_same(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding


def test_restore_reshards_across_devices(tmp_path):
  """Saved over a 2x2 mesh one way, restored another way (4 forced CPU devices)."""
  env = _worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, str(WORKER), "reshard", str(tmp_path / "c")],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def _kill_mid_save(directory: Path, log: Path) -> None:
  """Runs the worker's kill mode and SIGKILLs it right after it starts saving step 2."""
  env = _worker_env()
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, "-u", str(WORKER), "kill", str(directory)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
      line = proc.stdout.readline()  # blocks until "saving" (or EOF if the worker died)
      assert line.strip() == "saving", f"worker failed:\n{log.read_text()[-3000:]}"
      os.kill(proc.pid, signal.SIGKILL)
      assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_during_save_leaves_last_complete_checkpoint(tmp_path):
  directory = tmp_path / "ckpt"
  _kill_mid_save(directory, tmp_path / "worker.log")
  leftovers = [p.name for p in directory.iterdir() if "tmp" in p.name]
  ckpt = TrainCheckpointer(directory, keep=3, async_save=False)
  # Opening the directory removes the dead run's unfinished step.
  assert not [p.name for p in directory.iterdir() if "tmp" in p.name]
  if leftovers:  # the expected case: killed while step 2 was being written
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    expected_step = 1
  else:  # the write beat the kill; the latest checkpoint must still be whole
    assert ckpt.latest_step() == 2
    expected_step = 2
  abstract = jax.eval_shape(lambda: worker.kill_state(expected_step))
  restored, data_state = ckpt.restore(abstract)
  _assert_same(restored, worker.kill_state(expected_step))
  assert data_state == worker.kill_data_state(expected_step)
  assert ckpt.save(3, restored, data_state)  # training resumes
  ckpt.close()
  if not leftovers:
    pytest.skip("step 2 was committed before the SIGKILL landed, so only the complete-latest "
                "half was checked; make the worker's step 2 bigger")


def test_restore_without_checkpoint_names_directory(tmp_path):
  ckpt = TrainCheckpointer(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
    ckpt.restore(jax.eval_shape(_train_state))
  ckpt.save(1, _train_state(), {})
  with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[1\]"):
    ckpt.restore(jax.eval_shape(_train_state), step=4)
  ckpt.close()


@pytest.mark.parametrize("other", [
    lambda: _train_state(width=6),  # same names, other shapes
    lambda: {"step": jnp.int32(0), "params": {"w": jnp.zeros(3)}},  # other structure
], ids=["shapes", "structure"])
def test_restore_with_other_config_says_what_to_do(tmp_path, other):
  with TrainCheckpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _train_state(width=4), {})
    with pytest.raises(ValueError, match="different config") as info:
      ckpt.restore(jax.eval_shape(other))
  message = str(info.value)
  assert str(tmp_path) in message and "--workdir" in message


def test_save_rejects_non_json_data_state(tmp_path):
  with TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(1, _train_state(), {"bad": object()})
    assert ckpt.all_steps() == []
