"""Expert parallelism (dsjax.parallel.expert_parallel) on 8 simulated CPU devices: exact
against one device for the whole train step, dropless under skew, a capacity factor's drops
equal to an independent count; the step moves rows by all-to-all and never gathers the
expert weights. The TPU path (ragged_all_to_all) compiles for a v5p slice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.compile import hlo
from dsjax.compile.topology import device_context, get_topology
from dsjax.parallel.activations import under_mesh
from dsjax.parallel.expert_parallel import expert_parallel_moe

WORKER = Path(__file__).with_name("_ep_worker.py")
REL = 1e-5


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          env=env, timeout=1500)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_dropless_under_skew(report):
  """Every row goes to one device's experts: that device receives all of them, exactly."""
  ops = report["ops"]
  assert ops["skew_rel"] < REL and ops["skew_dropped"] == 0.0


@pytest.mark.parametrize("mesh", ["expert8", "data2_expert4"])
def test_capacity_factor_drops_what_an_independent_count_drops(report, mesh):
  case = report["ops"][f"capacity_{mesh}"]
  assert case["model_dropped"] > 0  # the capacity binds in this case
  assert case["dropped"] == pytest.approx(case["model_dropped"], abs=1e-7)
  assert case["rel"] < REL  # and the output is the dense one without the dropped rows


MODEL_CASES = [f"{v}/{m}" for v in ("tiny", "e16_top4_grouped")
               for m in ("expert8", "data2_expert4", "fsdp2_expert2_tensor2")]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_train_step_equals_one_device(report, case):
  got = report["models"][case]
  assert got["loads_equal"] and got["grad_names"]
  for key in ("total_rel", "loss_rel", "grad_rel", "bias_rel"):
    assert got[key] < REL, (key, got[key])


@pytest.mark.parametrize("case", MODEL_CASES)
def test_rows_move_by_all_to_all_and_weights_stay_split(report, case):
  got = report["models"][case]
  assert got["all_to_all"] >= 4  # dispatch and combine, forward and backward
  assert got["expert_weight_gathers"] == 0 or "fsdp" in case  # FSDP gathers along D only
  w1 = got["w1"]  # [layers, E, D, F]
  ep = {"expert8": 8, "data2_expert4": 4, "fsdp2_expert2_tensor2": 2}[case.split("/")[1]]
  assert w1["spec"][1] == "expert" and w1["shard_shape"][1] == w1["shape"][1] // ep


def test_ragged_exchange_compiles_for_tpu():
  """The TPU path: ragged_all_to_all for dispatch and combine (forward and backward), the
  local experts on XLA's ragged dot, no all-reduce of the receive buffer."""
  topology = get_topology("v5p:2x2x2")
  mesh = Mesh(np.array(topology.devices).reshape(1, 1, 8, 1), ("data", "fsdp", "expert",
                                                              "tensor"))
  e, d, f, k, m = 64, 512, 256, 8, 8 * 512
  rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), None))
  experts = NamedSharding(mesh, P("expert", None, None))
  spec = jax.ShapeDtypeStruct
  args = (spec((m, d), jnp.bfloat16, sharding=rows), spec((m, k), jnp.int32, sharding=rows),
          spec((m, k), jnp.float32, sharding=rows),
          *(spec(s, jnp.bfloat16, sharding=experts) for s in ((e, d, f), (e, d, f), (e, f, d))))

  def loss(x, ids, w, w1, w3, w2):
    y, dropped = expert_parallel_moe(x, ids, w, w1, w3, w2)
    return jnp.sum(y.astype(jnp.float32)) + dropped

  step = jax.jit(under_mesh(jax.value_and_grad(loss, argnums=(0, 3, 4, 5)), mesh))
  with device_context(topology.devices):
    text = step.lower(*args).compile().as_text()
  found = hlo.collectives(text)
  assert found.count.get("ragged-all-to-all", 0) == 4
  # only the dropped-row counts (scalars); not the [rows, D] buffer's cotangent
  assert found.bytes.get("all-reduce", 0) < 65536
  assert any(name.startswith("ragged-dot") for name, _ in hlo.kernel_calls(text))
