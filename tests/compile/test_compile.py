"""dsjax.compile: real ahead-of-time compilation for TPU topologies (libtpu's compiler, no TPU
needed) of the train and serving steps, the per-device report, and the CLI's exit codes."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.compile import hlo
from dsjax.compile.report import compile_program
from dsjax.compile.steps import build_program
from dsjax.compile.topology import TopologyError, chips_in, get_topology
from dsjax.experiment import load_experiment
from dsjax.infer.cache import latent_values_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _tiny(**overrides):
  return load_experiment(TINY, overrides)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, expert=2, tensor=1),
                                  dict(data=1, fsdp=2, expert=2, tensor=2)],
                         ids=["data-fsdp-expert", "fsdp-expert-tensor"])
def test_tiny_train_step_compiles_for_8_tpu_chips(mesh):
  """The real train step (AdamW, MTP, balancing) compiles for v5p:2x2x2 within HBM; the
  parameters are split over the model axes and gradients are reduced across devices."""
  topology = get_topology("v5p:2x2x2")
  cfg = _tiny(**{f"mesh.{axis}": size for axis, size in mesh.items()})
  program = build_program(cfg, topology.devices, "train")
  report = compile_program(program, topology)
  assert report.fits and report.error is None
  assert report.devices == 8 and report.mesh == mesh
  assert 0 < report.bytes_per_device < report.hbm_bytes_per_device
  assert report.memory["temporaries"] > 0
  whole = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(program.args[0].params))
  assert report.memory["parameters"] < whole / 2  # fsdp (x tensor) sharded, not replicated
  assert report.collectives["all-reduce"]["count"] > 0 or "reduce-scatter" in report.collectives
  assert report.largest_allocations and report.largest_allocations[0]["bytes"] > 0
  # Under the step's mesh, attention runs the Mosaic flash kernels (forward, dq, dk/dv).
  assert {"flash_attention_fwd"} <= set(report.kernels), report.kernels


def test_batch_per_shard_scales_the_global_batch_with_the_mesh():
  topology = get_topology("v5p:2x2x2")
  for mesh, batch in ((dict(data=-1), 16), (dict(data=1, fsdp=2, tensor=4), 4)):
    cfg = _tiny(**{"train.batch_per_shard": 2}, **{f"mesh.{a}": n for a, n in mesh.items()})
    program = build_program(cfg, topology.devices, "train")
    assert program.batch == batch == cfg.train.batch_size
    assert program.args[1]["inputs"].shape == (batch, cfg.train.seq_len)


def test_serving_steps_compile_with_the_latent_cache_sharded_by_rows():
  """Prefill and one decode step of the tiny model compile for 4 chips; the decode cache per
  device is exactly (kv_lora_rank + rope dim) values per token and layer for its rows."""
  topology = get_topology("v5p:2x2x1")
  cfg = _tiny(**{"mesh.data": 4})
  decode = build_program(cfg, topology.devices, "decode", batch=8, context=256)
  report = compile_program(decode, topology)
  assert report.fits
  model = cfg.model
  layers = model.num_hidden_layers
  per_row = layers * 256 * latent_values_per_token(
      type("C", (), {"mla": type("M", (), dict(model.mla))})) * 4
  assert report.memory["cache"] == per_row * 8 // 4
  prefill = compile_program(build_program(cfg, topology.devices, "prefill", batch=4,
                                          context=128), topology)
  assert prefill.fits and prefill.tokens_per_step == 4 * 128


def test_collectives_in_a_loop_count_once_per_iteration():
  """A psum inside a 7-step scan runs 7 times per call: the report multiplies loop bodies by
  their trip counts."""
  topology = get_topology("v5p:2x2x1")
  mesh = Mesh(np.array(topology.devices), ("x",))

  def body(carry, _):
    return carry * 0.5 + jax.lax.psum(carry, "x"), None

  @jax.jit
  def f(x):
    step = jax.shard_map(lambda c: jax.lax.scan(body, c, None, length=7)[0], mesh=mesh,
                         in_specs=P("x"), out_specs=P("x"))
    return step(x)

  arg = jax.ShapeDtypeStruct((4 * 8, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  found = hlo.collectives(f.lower(arg).compile().as_text())
  assert found.exact
  assert found.count == {"all-reduce": 7}
  assert found.bytes["all-reduce"] == 7 * 8 * 128 * 4


def test_topology_names():
  assert chips_in("v5p:8x8x8") == 512 and chips_in("h100:8x4") == 32
  assert get_topology("v6e:2x2").num_devices == 4
  assert get_topology("v5p:1x1x1").num_devices == 1  # a single chip: smaller than a host
  for bad in ("v9:2x2", "h100", "v5p:3"):
    with pytest.raises(TopologyError):
      get_topology(bad)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "dsjax.compile", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_fits_and_writes_the_json_report(tmp_path):
  out = tmp_path / "report.json"
  result = _cli(f"--config={TINY}", "--topology=v5p:2x2x1", f"--json={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["fits"] is True and report["devices"] == 4 and report["topology"] == "v5p:2x2x1"
  assert 0 < report["bytes_per_device"] < report["hbm_bytes_per_device"]
  assert report["compile_seconds"] > 0 and report["flops_per_step"] > 0
  assert "fits" in result.stdout and not _error_lines(result.stderr)


def test_cli_reports_a_step_that_does_not_fit_in_one_line():
  """DeepSeek-V2-Lite's parameters and AdamW state (47.6 GB) on four 16 GB v5e chips."""
  result = _cli(f"--config={os.path.join(ROOT, 'configs', 'deepseek_v2_lite.py')}",
                "--topology=v5e:2x2", "--config.train.batch_size=4")
  assert result.returncode == 1
  (line,) = _error_lines(result.stderr)
  assert "needs" in line and "15.75 GiB available" in line
  assert "largest allocation" in line and "mesh.fsdp" in line


@pytest.mark.parametrize("args, words", [
    (["--topology=v9:2x2"], "Unknown TPU generation"),
    (["--topology=v5p:2x2x1", "--config.mesh.data=3"], "devices"),
])
def test_cli_bad_topology_or_mesh_is_one_error_line(args, words):
  result = _cli(f"--config={TINY}", *args)
  assert result.returncode == 1
  (line,) = _error_lines(result.stderr)
  assert words in line


def test_multi_slice_mesh_puts_data_across_slices():
  from dsjax.parallel.mesh import make_mesh
  topology = get_topology("v5p:2x2x1", num_slices=2)
  cfg = _tiny(**{"mesh.data": 2, "mesh.fsdp": 4})
  mesh = make_mesh(cfg.mesh, topology.devices)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()  # data index = slice
  with pytest.raises(ValueError, match="multiple of 2"):
    make_mesh(_tiny(**{"mesh.data": 1, "mesh.fsdp": -1}).mesh, topology.devices)


def test_auto_implementations_follow_the_compile_target():
  """Compiling for TPU from a CPU host picks the TPU paths (ragged MoE dispatch, the NSA and
  flash kernels), not the CPU ones."""
  from dsjax.compile.topology import device_context
  from dsjax.config import MoEConfig
  from dsjax.model.moe import resolve_impl
  from dsjax.model.nsa import resolve_select_impl
  from dsjax.ops.platform import target_platform
  moe = MoEConfig()
  assert (target_platform(), resolve_impl("auto", moe), resolve_select_impl("auto")) == (
      "cpu", "blocked", "gather")
  with device_context(get_topology("v5p:2x2x1").devices):
    assert (target_platform(), resolve_impl("auto", moe), resolve_select_impl("auto")) == (
        "tpu", "ragged", "pallas")
  with device_context(get_topology("h100:8").devices):
    assert target_platform() == "gpu" and resolve_impl("auto", moe) == "ragged"


def test_tiny_train_step_compiles_for_h100():
  """The deviceless CUDA compiler builds the same step for 8 H100s (XLA's dots on cuBLAS:
  dsjax.compile turns Triton GEMMs off, which cannot be autotuned without a GPU)."""
  topology = get_topology("h100:8")
  report = compile_program(build_program(_tiny(**{"mesh.data": 2, "mesh.fsdp": 4}),
                                         topology.devices, "train"), topology)
  assert report.fits and report.devices == 8 and report.device_kind.startswith("NVIDIA H100")
  assert 0 < report.bytes_per_device < report.hbm_bytes_per_device


def test_ragged_all_to_all_counts_the_rows_it_sends_not_its_buffer():
  text = """ENTRY %main (p: bf16[16,128]) -> bf16[64,128] {
  %p = bf16[16,128]{1,0} parameter(0)
  %z = bf16[64,128]{1,0} broadcast(bf16[] constant(0))
  %o = s32[4]{0} parameter(1)
  ROOT %r = bf16[64,128]{1,0} ragged-all-to-all(%p, %z, %o, %o, %o, %o), channel_id=1
}
"""
  found = hlo.collectives(text)
  assert found.count == {"ragged-all-to-all": 1}
  assert found.bytes["ragged-all-to-all"] == 16 * 128 * 2  # the operand, not the 64-row buffer
