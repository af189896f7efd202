"""mHC's cost: one dsjax train step of configs/tiny.py (plain residual) vs configs/tiny_mhc.py
(DeepSeek-V4's 4 residual streams), same overrides, same batch, same machine, one run; the two
alternate step by step. Prints each step's median time, XLA's FLOP and bytes-accessed counts
of the compiled steps, and the ratios; nothing here is asserted.

  python benchmarks/mhc.py [--hidden 128 --layers 4 --batch 8 --seq 128 --steps 20]

mHC adds per sublayer a [(2+n)n, nD] projection of the n streams, a 20-round Sinkhorn on
[n, n] per token, and n-times wider residual reads and writes; unfused (as here, in XLA) the
streams' [B,T,n,D] traffic dominates at small D.
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from dsjax.experiment import load_experiment
from dsjax.train.setup import build_run
from dsjax.train.state import init_train_state

CONFIGS = {"plain": "configs/tiny.py", "mhc": "configs/tiny_mhc.py"}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for name, default in (("hidden", 128), ("layers", 4), ("batch", 8), ("seq", 128),
                        ("steps", 20), ("warmup", 3)):
    parser.add_argument(f"--{name}", type=int, default=default)
  return parser.parse_args()


def setup(path: str, args):
  overrides = {"model.hidden_size": args.hidden, "model.num_hidden_layers": args.layers,
               "train.batch_size": args.batch, "train.seq_len": args.seq}
  cfg = load_experiment(path, overrides)
  run = build_run(cfg)
  state = init_train_state(run.model_cfg, run.optimizer, cfg.seed, run.state_shardings)
  iterator = run.data.train_iterator()
  batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
  iterator.close()
  cost = run.train_step.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return run, state, batch, cost


def main():
  args = parse_args()
  runs = {name: setup(path, args) for name, path in CONFIGS.items()}
  states = {name: r[1] for name, r in runs.items()}
  times = {name: [] for name in runs}
  for step in range(args.warmup + args.steps):
    for name, (run, _, batch, _) in runs.items():
      start = time.perf_counter()
      states[name], metrics = run.train_step(states[name], batch)
      jax.block_until_ready(metrics["loss"])
      if step >= args.warmup:
        times[name].append(time.perf_counter() - start)
  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); hidden {args.hidden}, {args.layers} layers, "
        f"batch {args.batch} x {args.seq}")
  median = {name: statistics.median(t) for name, t in times.items()}
  for name, (_, _, _, cost) in runs.items():
    print(f"{name:>6}: {median[name] * 1e3:8.1f} ms/step  "
          f"{args.batch * args.seq / median[name]:8.0f} tok/s  "
          f"{cost.get('flops', float('nan')) / 1e9:7.2f} GFLOP  "
          f"{cost.get('bytes accessed', float('nan')) / 2**20:8.1f} MiB accessed")
  plain, mhc = runs["plain"][3], runs["mhc"][3]
  print(f"mhc / plain: time {median['mhc'] / median['plain']:.2f}x, "
        f"FLOPs {mhc.get('flops', 0) / plain.get('flops', 1):.2f}x, "
        f"bytes {mhc.get('bytes accessed', 0) / plain.get('bytes accessed', 1):.2f}x")


if __name__ == "__main__":
  main()
