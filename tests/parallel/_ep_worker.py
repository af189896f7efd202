"""Subprocess side of tests/parallel/test_expert_parallel.py (run as a script, not collected).

  python _ep_worker.py
      with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the test before jax
      starts). Prints one JSON object (last line):
      - "ops": dsjax.parallel.expert_parallel against the dense dispatch on 8 devices: a skewed
        routing (every row to one device's experts) dropless, and a capacity factor's output
        and dropped fraction against an independent numpy model of the receive buffers;
      - "models": for two MoE variants and three meshes, the train step's loss, gradients,
        expert loads and router-bias update against one device (relative errors), and what
        the compiled EP step communicates and how it holds the expert weights.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from dsjax.compile import hlo  # noqa: E402
from dsjax.model.pattern import routed_rows  # noqa: E402
from dsjax.ops import moe_dispatch  # noqa: E402
from dsjax.parallel.activations import under_mesh  # noqa: E402
from dsjax.parallel.expert_parallel import expert_parallel_moe  # noqa: E402
from dsjax.train.balance import update_router_biases  # noqa: E402
from dsjax.train.setup import build_run, step_settings  # noqa: E402
from dsjax.train.state import init_train_state  # noqa: E402
from dsjax.train.step import _loss_and_grads  # noqa: E402
from tests.train.experiments import small_experiment  # noqa: E402

AXES = ("data", "fsdp", "expert", "tensor")
MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2)}
VARIANTS = {
    # configs/tiny.py's router: 8 experts, top-2, sigmoid + noaux_tc over 2 groups.
    "tiny": {},
    # 16 experts, top-4, group-limited to 2 of 4 groups.
    "e16_top4_grouped": {"model.moe.n_routed_experts": 16, "model.moe.num_experts_per_tok": 4,
                         "model.moe.n_group": 4, "model.moe.topk_group": 2},
}
BASE = {"model.num_hidden_layers": 2, "train.batch_size": 8, "train.seq_len": 32}


def _mesh(sizes: dict[str, int]) -> Mesh:
  shape = tuple(sizes.get(a, 1) for a in AXES)
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), AXES)


def _rel(a, b) -> float:
  """max |a - b| relative to the scale of b."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ---- operation level ----

def _operands(seed, m, d, f, e, k, skew_to=None, experts_per_device=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, d)).astype(np.float32)
  if skew_to is None:
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
  else:  # every row to the experts of device `skew_to`
    own = np.arange(skew_to * experts_per_device, (skew_to + 1) * experts_per_device)
    ids = np.stack([rng.choice(own, k, replace=False) for _ in range(m)])
  w = rng.random(size=(m, k)).astype(np.float32)
  ws = [(rng.normal(size=s) / np.sqrt(s[1])).astype(np.float32)
        for s in ((e, d, f), (e, d, f), (e, f, d))]
  return x, ids.astype(np.int32), w, ws


def _dense(x, ids, w, ws):
  return np.asarray(moe_dispatch.experts_dense(jnp.asarray(x), jnp.asarray(ids),
                                               jnp.asarray(w), *map(jnp.asarray, ws)))


def _capacity_model(ids, devices: int, ep: int, capacity: int, local: int):
  """Which (token, slot) pairs a capacity-limited exchange drops, modelled directly: tokens
  are split evenly over the devices (the expert axis is the minor batch axis); each
  receiver's buffer is filled by local expert, then source device, then the source's rows in
  token order, and positions past `capacity` are dropped."""
  m, k = ids.shape
  per = m // devices
  dropped = np.zeros(ids.shape, bool)
  for device in range(devices):
    group, receiver = divmod(device, ep)
    position = 0
    for e in range(local):
      expert = receiver * local + e
      for source in range(ep):
        first = (group * ep + source) * per
        for t in range(first, first + per):
          for slot in np.flatnonzero(ids[t] == expert):
            dropped[t, slot] = position >= capacity
            position += 1
  return dropped


def _op_checks() -> dict:
  m, d, f, e, k = 64, 16, 8, 16, 4
  out = {}
  mesh = _mesh(MESHES["expert8"])
  run = jax.jit(lambda *a: expert_parallel_moe(*a))
  # Top-2 over the 2 experts of device 3: each device gets nothing or everything.
  x, ids, w, ws = _operands(0, m, d, f, e, 2, skew_to=3, experts_per_device=e // 8)
  with jax.set_mesh(mesh):
    y, dropped = run(x, ids, w, *ws)
  out["skew_rel"], out["skew_dropped"] = _rel(y, _dense(x, ids, w, ws)), float(dropped)
  for mesh_name, factor in (("expert8", 1.0), ("data2_expert4", 0.75)):
    mesh = _mesh(MESHES[mesh_name])
    ep = mesh.shape["expert"]
    x, ids, w, ws = _operands(1, m, d, f, e, k)
    with jax.set_mesh(mesh):
      y, dropped = jax.jit(lambda *a: expert_parallel_moe(*a, capacity_factor=factor))(
          x, ids, w, *ws)
    rows = (m // 8) * k
    capacity = max(8, -(-int(np.ceil(factor * rows)) // 8) * 8)
    model = _capacity_model(ids, 8, ep, capacity, e // ep)
    out[f"capacity_{mesh_name}"] = {
        "dropped": float(dropped), "model_dropped": float(model.mean()),
        "rel": _rel(y, _dense(x, ids, np.where(model, 0, w), ws))}
  return out


# ---- model level ----

def _grads_step(run):
  depths = len(nnx.merge(run.graphdef, run.abstract_state.params,
                         run.abstract_state.router_bias).mtp)
  settings = step_settings(run.cfg, run.model_cfg)

  def fn(state, batch):
    total, aux, loads, grads = _loss_and_grads(state, run.graphdef, batch, settings, depths)
    mtp = [loads[f"mtp{i}"] for i in range(depths) if f"mtp{i}" in loads]
    bias = update_router_biases(state.router_bias, loads["main"], mtp, settings.bias_rate,
                                routed_rows(run.model_cfg))
    return total, aux["loss"], loads["main"], grads, bias
  return jax.jit(under_mesh(fn, run.mesh), in_shardings=(run.state_shardings,
                                                         run.batch_sharding))


def _batch(run):
  iterator = run.data.train_iterator()
  batch = dict(next(iterator))
  iterator.close()
  return batch


def _put(run, batch):
  return {k: jax.device_put(np.asarray(v), run.batch_sharding) for k, v in batch.items()}


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in leaves}


def _communication(text: str, run) -> dict:
  """The all-to-alls in the compiled step, and any all-gather of a whole expert's weights."""
  moe = run.model_cfg.moe
  d, f = run.model_cfg.hidden_size, moe.moe_intermediate_size
  gathers = [line for line in text.splitlines() if re.search(r"all-gather(-start)?\(", line)]
  weight_gathers = [g for g in gathers
                    if re.search(rf"\[[^\]]*\b{d},{f}\b[^\]]*\]|\[[^\]]*\b{f},{d}\b[^\]]*\]",
                                 g.split("all-gather")[0])]
  return {"all_to_all": hlo.collectives(text).count.get("all-to-all", 0),
          "expert_weight_gathers": len(weight_gathers)}


def _weight_layout(state, run) -> dict:
  w1 = state.params["moe_layers"]["blocks"]["ffn"]["w1"].get_value()
  return {"shape": list(w1.shape), "shard_shape": list(w1.addressable_shards[0].data.shape),
          "spec": [list(a) if isinstance(a, tuple) else a for a in w1.sharding.spec]}


def _model_checks() -> dict:
  out = {}
  for variant, overrides in VARIANTS.items():
    single = build_run(small_experiment(**BASE, **overrides, **{"mesh.data": 1}),
                       devices=jax.devices()[:1])
    batch = _batch(single)
    state = init_train_state(single.model_cfg, single.optimizer, 0, single.state_shardings)
    want = _grads_step(single)(state, _put(single, batch))
    want_grads, want_bias = _flat(want[3]), _flat(want[4])
    for name, sizes in MESHES.items():
      mesh_cfg = {f"mesh.{a}": sizes.get(a, 1) for a in AXES}
      run = build_run(small_experiment(**BASE, **overrides, **mesh_cfg))
      state = init_train_state(run.model_cfg, run.optimizer, 0, run.state_shardings)
      step = _grads_step(run)
      args = (state, _put(run, batch))
      got = step(*args)
      grads, bias = _flat(got[3]), _flat(got[4])
      out[f"{variant}/{name}"] = {
          "total_rel": _rel(got[0], want[0]), "loss_rel": _rel(got[1], want[1]),
          "loads_equal": bool(np.array_equal(np.asarray(got[2]), np.asarray(want[2]))),
          "grad_rel": max(_rel(grads[k], want_grads[k]) for k in want_grads),
          "grad_names": len(grads) == len(want_grads),
          "bias_rel": max(_rel(bias[k], want_bias[k]) for k in want_bias),
          **_communication(step.lower(*args).compile().as_text(), run),
          "w1": _weight_layout(state, run)}
  return out


def main() -> None:
  assert len(jax.devices()) == 8, f"expected 8 forced CPU devices: {jax.devices()}"
  print(json.dumps({"ops": _op_checks(), "models": _model_checks()}))


if __name__ == "__main__":
  main()
