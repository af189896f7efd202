"""Grouped-matmul throughput at DeepSeek-V3 expert shapes: the Pallas gmm/tgmm kernels vs
jax.lax.ragged_dot vs a dense matmul of the same FLOPs, same machine, one run. Prints TFLOP/s
and ratios; nothing here is asserted.

  python benchmarks/gmm.py [--rows 65536 --groups 256 --dtype bfloat16 --repeats 20]

Shapes: w1/w3 (gate/up) K=7168 -> N=2048 and w2 (down) K=2048 -> N=7168, 256 experts, rows =
tokens x top-k sorted by expert, group sizes uniform or skewed (Zipf-like: a few hot experts).
The kernels need a TPU or GPU (on CPU they only run interpreted, for tests), and ragged_dot
is a dense emulation on CPU (at 256 rows it asks for 60 GB), so on CPU only the dense matmul
is timed.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gmm import gmm, tgmm

SHAPES = {"gate_up": (7168, 2048), "down": (2048, 7168)}


def group_sizes(rows: int, groups: int, kind: str, seed: int = 0) -> np.ndarray:
  """Rows per group summing to `rows`: equal, or Zipf-like (weight 1/rank^1.2, shuffled)."""
  if kind == "uniform":
    weights = np.ones(groups)
  else:
    weights = 1.0 / np.arange(1, groups + 1) ** 1.2
    np.random.default_rng(seed).shuffle(weights)
  sizes = np.floor(weights / weights.sum() * rows).astype(np.int64)
  sizes[np.argmax(weights)] += rows - sizes.sum()
  return sizes.astype(np.int32)


def seconds(fn, args, repeats: int) -> float:
  """Median wall time of a compiled call (compile and one warm-up excluded)."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def methods(on_accelerator: bool, interpret: bool, dtype):
  """name -> (function of (lhs, rhs, sizes), rhs layout 'grouped' | 'dense' | 'tgmm')."""
  out = {"dense matmul (same FLOPs)": (
      lambda x, w, s: jnp.dot(x, w, preferred_element_type=dtype), "dense")}
  if on_accelerator or interpret:
    out["lax.ragged_dot"] = (
        lambda x, w, s: jax.lax.ragged_dot(x, w, s, preferred_element_type=dtype), "grouped")
    # ragged_dot's weight gradient is the tgmm of XLA's own lowering.
    out["lax.ragged_dot weight grad"] = (
        lambda x, dy, s: jax.vjp(lambda w: jax.lax.ragged_dot(x, w, s),
                                 jnp.zeros((s.shape[0], x.shape[1], dy.shape[1]), x.dtype)
                                 )[1](dy)[0], "tgmm")
    out["pallas gmm"] = (lambda x, w, s: gmm(x, w, s, dtype, interpret=interpret), "grouped")
    out["pallas tgmm (weight grad)"] = (
        lambda x, dy, s: tgmm(x.T, dy, s, dtype, interpret=interpret), "tgmm")
  return out


def operands(layout, rows, k, n, groups, dtype, key):
  k1, k2 = jax.random.split(key)
  lhs = jax.random.normal(k1, (rows, k), dtype)
  if layout == "grouped":
    return lhs, jax.random.normal(k2, (groups, k, n), dtype) / np.sqrt(k)
  if layout == "dense":
    return lhs, jax.random.normal(k2, (k, n), dtype) / np.sqrt(k)
  return lhs, jax.random.normal(k2, (rows, n), dtype)  # tgmm: lhs [M,K], dy [M,N]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=None,
                      help="tokens x top-k (default 65536 on TPU/GPU, 512 on CPU)")
  parser.add_argument("--groups", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--interpret", action="store_true",
                      help="CPU smoke test of this script: kernels interpreted, use tiny "
                           "--rows/--groups; the timings mean nothing")
  args = parser.parse_args()
  device = jax.devices()[0]
  on_accelerator = device.platform in ("tpu", "gpu")
  rows = args.rows or (65536 if on_accelerator else 512)
  dtype = jnp.dtype(args.dtype)
  host = platform.processor() or platform.machine()
  print(f"machine: {device.device_kind} ({device.platform}), host {host}; jax "
        f"{jax.__version__}; {dtype.name}, rows={rows}, groups={args.groups}")
  if not on_accelerator:
    print("no TPU/GPU: only the dense matmul is timed (the kernels run on CPU only interpreted;"
          " ragged_dot is a dense emulation there).")
  key = jax.random.key(0)
  for shape_name, (k, n) in SHAPES.items():
    for kind in ("uniform", "skewed"):
      sizes = jnp.asarray(group_sizes(rows, args.groups, kind))
      print(f"\n{shape_name}: K={k} N={n}, {kind} groups (largest {int(sizes.max())} rows)")
      times = {}
      for name, (fn, layout) in methods(on_accelerator, args.interpret, dtype).items():
        x, w = operands(layout, rows, k, n, args.groups, dtype, key)
        times[name] = seconds(fn, (x, w, sizes), args.repeats)
        print(f"  {name:30s} {times[name] * 1e3:9.3f} ms  "
              f"{2 * rows * k * n / times[name] / 1e12:9.3f} TFLOP/s")
      for ours, theirs in (("pallas gmm", "lax.ragged_dot"),
                           ("pallas tgmm (weight grad)", "lax.ragged_dot weight grad")):
        if ours in times and theirs in times:
          print(f"  {ours} speed / {theirs}: {times[theirs] / times[ours]:.2f}x")


if __name__ == "__main__":
  main()
