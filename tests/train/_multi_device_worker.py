"""Subprocess side of tests/train/test_multi_device.py (run as a script, not collected).

  python _multi_device_worker.py
      with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the test sets it: the flag must
      be in place before jax starts), trains the same small experiment for STEPS steps on the
      same batches on 1 device and on each mesh of MESHES, and prints one JSON object (last
      line): per mesh the step metrics, the batch's sharding, and the sharding of every
      parameter and Adam moment after the steps; plus the specs that a mesh whose `tensor`
      axis does not divide the heads dim gives (computed abstractly, nothing compiled).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from dsjax.parallel.mesh import make_mesh, tree_shardings  # noqa: E402
from dsjax.train.loop import _device_batch  # noqa: E402
from dsjax.train.setup import build_run  # noqa: E402
from dsjax.train.state import init_train_state  # noqa: E402
from tests.train.experiments import small_experiment  # noqa: E402

STEPS = 3
NUM_DEVICES = 8
AXES = ("data", "fsdp", "expert", "tensor")
# name -> (mesh sizes, number of devices); every axis not named is 1.
MESHES = {
    "single": ({"data": 1}, 1),
    "data8": ({"data": 8}, NUM_DEVICES),
    "fsdp8": ({"fsdp": 8}, NUM_DEVICES),
    "data2_expert2_tensor2": ({"data": 2, "expert": 2, "tensor": 2}, NUM_DEVICES),
}
# Meshes whose state shardings are reported (the 1-device and pure data ones replicate all).
SHARDED = ("fsdp8", "data2_expert2_tensor2")
METRICS = ("loss", "mtp_loss", "z_loss", "balance_loss", "total_loss", "grad_norm", "lr",
           "expert_imbalance")
# One dense and one MoE layer (+ the MTP module's MoE block): every kind of weight is there,
# and the train step compiles in about half the time of SMALL's 3 layers. Router bias updates
# stay on ("auto" = on for this sigmoid router): step n+1's routing then depends on step n's
# expert loads, integer counts that must agree exactly across meshes.
OVERRIDES = {"train.steps": 8, "model.num_hidden_layers": 2}


def _experiment(sizes: dict[str, int]):
  mesh = {f"mesh.{axis}": sizes.get(axis, 1) for axis in AXES}
  return small_experiment(**OVERRIDES, **mesh)


def _numpy_batches(run, n: int) -> list[dict[str, np.ndarray]]:
  iterator = run.data.train_iterator()
  out = [dict(next(iterator)) for _ in range(n)]
  iterator.close()
  return out


def _name(path) -> str:
  """'moe_layers/blocks/ffn/w1' style name of a state leaf (the nnx `.value` suffix dropped)."""
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  return name.removesuffix("/value")


def _layout(x: jax.Array) -> dict:
  return {"shape": list(x.shape), "spec": [_axis(a) for a in x.sharding.spec],
          "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
          "num_shards": len(x.addressable_shards)}


def _axis(entry):
  """A PartitionSpec entry as JSON: None, an axis name, or a list of axis names."""
  return list(entry) if isinstance(entry, tuple) else entry


def _adam_moments(opt_state) -> dict[str, dict]:
  """{'mu'|'nu': {param name: array}} from the optimizer state (the ScaleByAdamState)."""
  out = {"mu": {}, "nu": {}}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    name = _name(path)
    for moment in out:
      marker = f"/{moment}/"
      if marker in name:
        out[moment][name.split(marker, 1)[1]] = leaf
  return out


def _state_layouts(state) -> dict:
  params = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  moments = _adam_moments(state.opt_state)
  return {"params": {k: _layout(v) for k, v in params.items()},
          **{m: {k: _layout(v) for k, v in arrays.items()} for m, arrays in moments.items()}}


def _train(name: str, batches) -> dict:
  sizes, count = MESHES[name]
  began = time.perf_counter()
  run = build_run(_experiment(sizes), devices=jax.devices()[:count])
  state = init_train_state(run.model_cfg, run.optimizer, run.cfg.seed, run.state_shardings)
  metrics, device_batch = [], None
  for batch in batches:
    device_batch = _device_batch(run, batch)
    state, step_metrics = run.train_step(state, device_batch)
    metrics.append({k: np.asarray(step_metrics[k]).tolist() for k in METRICS})
  out = {"mesh": dict(run.mesh.shape), "metrics": metrics,
         "batch": _layout(device_batch["inputs"]),
         "seconds": round(time.perf_counter() - began, 1)}
  if name in SHARDED:
    out["state"] = _state_layouts(state)
  return out


def _abstract_specs(run, sizes: dict[str, int]) -> dict[str, list]:
  """Param specs that `tree_shardings` gives on mesh `sizes` (no arrays, no compilation)."""
  mesh = make_mesh(_experiment(sizes).mesh, jax.devices())
  shardings = tree_shardings(run.abstract_state.params, mesh)
  return {_name(p): [_axis(a) for a in s.spec]
          for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def main() -> None:
  devices = jax.devices()
  assert len(devices) == NUM_DEVICES, f"expected {NUM_DEVICES} forced CPU devices: {devices}"
  reference = build_run(_experiment(MESHES["single"][0]), devices=devices[:1])
  batches = _numpy_batches(reference, STEPS)  # the same numpy batches go to every mesh
  report = {"runs": {name: _train(name, batches) for name in MESHES}}
  # heads=4 on tensor=8 does not divide: that dim must fall back to replication.
  report["tensor8_specs"] = _abstract_specs(reference, {"tensor": 8})
  report["model"] = reference.model_cfg.to_dict()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
