"""Training on 8 simulated CPU devices: meshes data=8, fsdp=8 and data=2 x expert=2 x tensor=2
give the 1-device losses, and parameters, Adam moments and batches are sharded as the rules
say. The work runs once, in a subprocess (_multi_device_worker.py): the forced device count
must be set before jax starts, and this process's jax already has its devices."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_multi_device_worker.py")
ROOT = Path(__file__).resolve().parents[2]
MESHES = {  # name -> mesh sizes; must match the worker's MESHES
    "data8": {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1},
    "data2_expert2_tensor2": {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2},
}
EP_TP = "data2_expert2_tensor2"
BATCH_AXES = ["data", "fsdp", "expert"]
# Weights with a heads dim: name suffix -> index of that dim without the `layers` dim.
HEADS_DIM = {"attn/wq_b": 1, "attn/wkv_b": 1, "attn/wo": 0}
# Where the attention and MoE weights live: the scanned stacks (leading `layers` dim) and the
# MTP module (no layers dim).
STACKS = {"dense_layers/blocks/": 1, "moe_layers/blocks/": 1, "mtp/0/block/": 0}
MOE_STACKS = {k: v for k, v in STACKS.items() if k != "dense_layers/blocks/"}


def _worker_env() -> dict[str, str]:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append("--xla_force_host_platform_device_count=8")
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append("--xla_backend_optimization_level=0")  # as tests/conftest.py: faster compiles
  # CPU only: on a GPU machine the forced host devices would not be jax.devices().
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def report():
  proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                        cwd=ROOT, env=_worker_env(), timeout=900)
  assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _ep_tp_state(report) -> dict:
  return report["runs"][EP_TP]["state"]


def _expected_shard(layout: dict, mesh: dict[str, int]) -> list[int]:
  """The shard shape that `layout`'s spec implies: each dim divided by its mesh axes' sizes."""
  out = []
  for size, axes in zip(layout["shape"], layout["spec"] + [None] * len(layout["shape"])):
    names = [] if axes is None else [axes] if isinstance(axes, str) else axes
    ways = math.prod(mesh[a] for a in names)
    assert size % ways == 0, f"{layout}: dim {size} split {ways} ways"
    out.append(size // ways)
  return out


def test_meshes_are_the_requested_ones(report):
  assert report["runs"]["single"]["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  for name, sizes in MESHES.items():
    assert report["runs"][name]["mesh"] == sizes


@pytest.mark.parametrize("name", list(MESHES))
def test_losses_equal_single_device(report, name):
  single, sharded = report["runs"]["single"]["metrics"], report["runs"][name]["metrics"]
  assert len(sharded) == len(single) == 3
  for step, (a, b) in enumerate(zip(sharded, single)):
    # Sharded matmuls and reductions sum in a different order: float32 rounding, ~1e-7.
    for key in ("loss", "mtp_loss", "z_loss", "balance_loss", "total_loss", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"step {step} {key}")
    # Load imbalance comes from integer expert counts: equal iff every token picked the same
    # experts (top-k would flip on a near-tie if the meshes' router scores drifted apart).
    assert a["expert_imbalance"] == b["expert_imbalance"], f"step {step}"
    assert a["lr"] == b["lr"]
  assert single[0]["loss"] != single[-1]["loss"]  # the steps really changed the params


@pytest.mark.parametrize("name", ["single", *MESHES])
def test_batch_is_split_over_the_batch_axes(report, name):
  run = report["runs"][name]
  ways = math.prod(run["mesh"][a] for a in BATCH_AXES)
  batch = run["batch"]
  assert batch["spec"][0] == BATCH_AXES
  assert batch["num_shards"] == math.prod(run["mesh"].values())
  assert batch["shard_shapes"] == [[batch["shape"][0] // ways, batch["shape"][1]]]


@pytest.mark.parametrize("name", ["fsdp8", EP_TP])
def test_every_shard_has_the_shape_its_spec_says(report, name):
  run = report["runs"][name]
  for key, layout in run["state"]["params"].items():
    assert layout["num_shards"] == 8, key
    assert layout["shard_shapes"] == [_expected_shard(layout, run["mesh"])], key


@pytest.mark.parametrize("stack", list(MOE_STACKS))
def test_routed_experts_are_on_expert_and_their_hidden_dim_on_tensor(report, stack):
  params, lead = _ep_tp_state(report)["params"], MOE_STACKS[stack]
  experts = report["model"]["moe"]["n_routed_experts"]
  hidden = report["model"]["moe"]["moe_intermediate_size"]
  for weight, hidden_dim in (("w1", 2), ("w3", 2), ("w2", 1)):  # [E,D,F], [E,D,F], [E,F,D]
    layout = params[f"{stack}ffn/{weight}"]
    assert layout["spec"][lead] == "expert", layout
    assert layout["spec"][lead + hidden_dim] == "tensor", layout
    shard = layout["shard_shapes"][0]
    assert shard[lead] == experts // 2 and shard[lead + hidden_dim] == hidden // 2, layout


@pytest.mark.parametrize("stack", list(STACKS))
def test_attention_heads_are_on_tensor(report, stack):
  params, lead = _ep_tp_state(report)["params"], STACKS[stack]
  heads = report["model"]["num_attention_heads"]
  for weight, dim in HEADS_DIM.items():
    layout = params[f"{stack}{weight}"]
    assert layout["spec"][lead + dim] == "tensor", layout
    assert layout["shard_shapes"] == [[*layout["shape"][:lead + dim], heads // 2,
                                       *layout["shape"][lead + dim + 1:]]], layout


def test_fsdp_shards_the_model_dim(report):
  params = report["runs"]["fsdp8"]["state"]["params"]
  d = report["model"]["hidden_size"]
  assert d % 8 == 0  # so no dim here falls back to replication
  embed_dim = {"embed": 1, "head": 0, "norm/weight": 0, "moe_layers/blocks/ffn/w1": 2,
               "moe_layers/blocks/ffn/w2": 3, "moe_layers/blocks/attn/wo": 3,
               "dense_layers/blocks/ffn/w1": 1, "moe_layers/blocks/attn_norm/weight": 1}
  for key, dim in embed_dim.items():
    layout = params[key]
    assert layout["spec"][dim] == "fsdp", (key, layout)
    assert layout["shard_shapes"][0][dim] == d // 8, (key, layout)
  # Weights without a model dim are FSDP-sharded on their low-rank dim.
  for key in ("moe_layers/blocks/attn/wq_b", "moe_layers/blocks/attn/wkv_b"):
    assert params[key]["spec"][1] == "fsdp", (key, params[key])
  # The experts dim's axis (expert) has size 1 here: every device holds all experts.
  w1 = params["moe_layers/blocks/ffn/w1"]
  assert w1["shard_shapes"][0][1] == report["model"]["moe"]["n_routed_experts"]


@pytest.mark.parametrize("name", ["fsdp8", EP_TP])
def test_adam_moments_are_sharded_like_their_params(report, name):
  state = report["runs"][name]["state"]
  assert set(state["mu"]) == set(state["nu"]) == set(state["params"])
  for key, layout in state["params"].items():
    assert state["mu"][key] == layout, key
    assert state["nu"][key] == layout, key


def test_a_dim_its_axis_does_not_divide_is_replicated(report):
  # tensor=8 and 4 heads: the heads dims replicate, while vocab (256) still splits 8 ways.
  specs, heads = report["tensor8_specs"], report["model"]["num_attention_heads"]
  assert heads % 8
  for stack, lead in STACKS.items():
    for weight, dim in HEADS_DIM.items():
      assert specs[f"{stack}{weight}"][lead + dim] is None, (stack, weight)
  assert specs["embed"][0] == "tensor" and specs["head"][1] == "tensor"
