"""Expert parallelism vs XLA's own (GSPMD) layout of the MoE dispatch, side by side.

  python benchmarks/moe_parallel.py                 # 8 simulated CPU devices + TPU compiles
  python benchmarks/moe_parallel.py --steps 20 --skip_tpu

Part 1, 8 CPU devices (forced with --xla_force_host_platform_device_count): the tiny model's
train step on the same mesh with moe.impl "ep" (dsjax.parallel.expert_parallel) and "blocked"
(the globally sorted dispatch, sharded by XLA's propagation): median step time over the same
batches and the bytes its collectives move per step per device (from the compiled HLO).

Part 2, TPU v5p (compile-only, libtpu): one DeepSeek-V3 MoE layer's routed experts, forward
and backward, at V3's shapes (E=256, K=8, D=7168, F=2048; 4096 tokens per chip) on 64 chips
with the experts split 64 ways: "ep" vs "ragged" (XLA's layout of the sorted ragged-dot
dispatch): collective bytes and temporaries per chip, or the compiler's out-of-memory figure
for a layout that does not fit (then also at fewer tokens per chip, where both compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsjax.compile import environment  # noqa: E402

environment.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from dsjax.compile import hlo  # noqa: E402
from dsjax.experiment import load_experiment  # noqa: E402
from dsjax.parallel.activations import under_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AXES = ("data", "fsdp", "expert", "tensor")


def _gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _cpu_row(impl: str, mesh: dict, steps: int) -> dict:
  from dsjax.train.loop import _device_batch
  from dsjax.train.setup import build_run
  from dsjax.train.state import init_train_state
  overrides = {"model.moe.impl": impl, "train.batch_size": 16, "train.seq_len": 128,
               **{f"mesh.{a}": mesh.get(a, 1) for a in AXES}}
  run = build_run(load_experiment(str(ROOT / "configs" / "tiny.py"), overrides))
  state = init_train_state(run.model_cfg, run.optimizer, 0, run.state_shardings)
  iterator = run.data.train_iterator()
  batches = [_device_batch(run, next(iterator)) for _ in range(steps + 2)]
  iterator.close()
  text = run.train_step.lower(state, batches[0]).compile().as_text()
  times = []
  for i, batch in enumerate(batches):
    began = time.perf_counter()
    state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    if i >= 2:  # the first calls compile and warm up
      times.append(time.perf_counter() - began)
  found = hlo.collectives(text)
  return {"impl": impl, "ms": 1e3 * float(np.median(times)), "bytes": found.total_bytes,
          "kinds": found.to_dict(), "loss": float(metrics["loss"])}


def part_cpu(steps: int) -> None:
  print(f"# Part 1: tiny model train step, 16 x 128 tokens, 8 CPU devices "
        f"({os.cpu_count()} cores), median of {steps} steps")
  for mesh in (dict(expert=8), dict(data=2, expert=4)):
    rows = [_cpu_row(impl, mesh, steps) for impl in ("ep", "blocked")]
    ep, gspmd = rows
    print(f"mesh {mesh}:")
    for r in rows:
      print(f"  {r['impl']:8s} {r['ms']:8.1f} ms/step  collectives {_gib(r['bytes']):>12} "
            f"per device  loss {r['loss']:.6f}")
    print(f"  ep / gspmd: time {ep['ms'] / gspmd['ms']:.2f}x, collective bytes "
          f"{ep['bytes'] / max(gspmd['bytes'], 1):.3f}x")


def _v3_layer(impl: str, mesh: Mesh):
  from dsjax.ops import moe_dispatch
  from dsjax.parallel.expert_parallel import expert_parallel_moe

  def loss(x, ids, w, w1, w3, w2):
    if impl == "ep":
      y = expert_parallel_moe(x, ids, w, w1, w3, w2)[0]
    else:
      y = moe_dispatch.experts_sorted(x, ids, w, w1, w3, w2)
    return jnp.sum(y.astype(jnp.float32))
  return jax.jit(under_mesh(jax.value_and_grad(loss, argnums=(0, 3, 4, 5)), mesh))


def _compile_row(impl: str, mesh, args, devices):
  """(compiled, None) or (None, the compiler's out-of-memory line)."""
  from dsjax.compile.topology import device_context
  try:
    with device_context(devices):
      return _v3_layer(impl, mesh).lower(*args).compile(), None
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    return None, str(error).split("RESOURCE_EXHAUSTED: ")[-1].strip()


def part_tpu(topology_name: str, tokens_per_chip: int) -> None:
  from dsjax.compile.topology import get_topology
  topology = get_topology(topology_name)
  n = topology.num_devices
  mesh = Mesh(np.array(topology.devices).reshape(1, 1, n, 1), AXES)
  e, d, f, k, tokens = 256, 7168, 2048, 8, tokens_per_chip * n
  rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), None))
  experts = NamedSharding(mesh, P("expert", None, None))
  spec = jax.ShapeDtypeStruct
  args = (spec((tokens, d), jnp.bfloat16, sharding=rows),
          spec((tokens, k), jnp.int32, sharding=rows), spec((tokens, k), jnp.float32,
                                                              sharding=rows),
          *(spec(s, jnp.bfloat16, sharding=experts) for s in ((e, d, f), (e, d, f), (e, f, d))))
  print(f"\n# Part 2: one DeepSeek-V3 MoE layer's routed experts, forward + backward, "
        f"{tokens_per_chip} tokens per chip, {topology_name} ({n} chips), experts split {n} ways")
  found = {}
  for impl in ("ep", "ragged"):
    began = time.perf_counter()
    compiled, out_of_memory = _compile_row(impl, mesh, args, topology.devices)
    if compiled is None:
      print(f"  {impl:8s} does not fit: {out_of_memory}")
      continue
    stats = compiled.memory_analysis()
    found[impl] = hlo.collectives(compiled.as_text())
    print(f"  {impl:8s} collectives {_gib(found[impl].total_bytes):>12} per chip, temporaries "
          f"{_gib(stats.temp_size_in_bytes):>12}, compiled in "
          f"{time.perf_counter() - began:.0f} s: "
          + ", ".join(f"{kind} {c['count']} x {_gib(c['bytes_per_device'])}"
                      for kind, c in found[impl].to_dict().items()))
  if len(found) == 2:
    print(f"  ep / ragged collective bytes: "
          f"{found['ep'].total_bytes / max(found['ragged'].total_bytes, 1):.4f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--topology", default="v5p:4x4x4")
  parser.add_argument("--tpu_tokens", default="4096,1024",
                      help="comma-separated tokens per chip of the TPU part's rows")
  parser.add_argument("--skip_tpu", action="store_true")
  parser.add_argument("--skip_cpu", action="store_true")
  args = parser.parse_args()
  if not args.skip_cpu:
    part_cpu(args.steps)
  if not args.skip_tpu:
    for tokens in map(int, args.tpu_tokens.split(",")):
      part_tpu(args.topology, tokens)


if __name__ == "__main__":
  main()
