"""Subprocess side of tests/train/test_checkpointing.py (run as a script, not collected).

  python _checkpoint_worker.py kill DIR
      Saves step 1 and waits for the commit, starts an async save of a large step 2, prints
      "saving" and sleeps until the test SIGKILLs it mid-write.
  python _checkpoint_worker.py reshard DIR
      (with 4 forced CPU devices) saves a state sharded one way over a 2x2 mesh and restores
      it sharded another way; prints "ok" when values and shardings are right.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.train.checkpointing import TrainCheckpointer

# Step 2 of the kill test: 400 MB of incompressible data (Orbax compresses), so the write takes
# seconds and the SIGKILL lands while it is in flight.
BIG_ARRAYS, BIG_SIZE = 200, 512 * 1024
SMALL_SIZE = 8


def kill_state(step: int) -> dict:
  """The state saved as `step`: same leaf names for both steps, step 2's arrays are large."""
  if step == 1:
    arrays = [np.arange(SMALL_SIZE, dtype=np.uint32) + i for i in range(BIG_ARRAYS)]
  else:
    # One random block, varied per array (cheaper than drawing 400 MB of random numbers).
    base = np.frombuffer(np.random.default_rng(step).bytes(4 * BIG_SIZE), np.uint32)
    arrays = [base ^ np.uint32(i * 2654435761 % 2**32) for i in range(BIG_ARRAYS)]
  return {"step": jnp.int32(step), "rng": jax.random.key(step), "w": jax.device_put(arrays)}


def kill_data_state(step: int) -> dict:
  return {"epoch": 0, "position": 10 * step}


def run_kill(directory: str) -> None:
  ckpt = TrainCheckpointer(directory, keep=3, async_save=True)
  ckpt.save(1, kill_state(1), kill_data_state(1), eval_loss=1.0)
  ckpt.wait()
  big = jax.block_until_ready(kill_state(2))
  ckpt.save(2, big, kill_data_state(2), eval_loss=0.5)
  print("saving", flush=True)
  time.sleep(120)  # the test kills us long before this ends


def run_reshard(directory: str) -> None:
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  assert len(devices) == 4, f"expected 4 forced CPU devices, got {len(devices)}"
  mesh = Mesh(np.asarray(devices).reshape(2, 2), ("x", "y"))
  saved_as = {"w": NamedSharding(mesh, P("x", "y")), "rng": NamedSharding(mesh, P())}
  wanted = {"w": NamedSharding(mesh, P(None, ("x", "y"))), "rng": NamedSharding(mesh, P())}
  w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
  state = {"w": jax.device_put(w, saved_as["w"]),
           "rng": jax.device_put(jax.random.key(3), saved_as["rng"])}
  with TrainCheckpointer(directory, async_save=True) as ckpt:
    ckpt.save(1, state, {"p": 1})
    ckpt.wait()
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, wanted)
    restored, data_state = ckpt.restore(abstract)
  assert data_state == {"p": 1}, data_state
  assert restored["w"].sharding == wanted["w"], restored["w"].sharding
  assert len(restored["w"].addressable_shards) == 4
  assert restored["w"].addressable_shards[0].data.shape == (8, 4)
  np.testing.assert_array_equal(np.asarray(restored["w"]), w)
  assert restored["rng"].sharding == wanted["rng"], restored["rng"].sharding
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(jax.random.key(3)))
  print("ok", flush=True)


if __name__ == "__main__":
  mode, path = sys.argv[1], sys.argv[2]
  {"kill": run_kill, "reshard": run_reshard}[mode](path)
