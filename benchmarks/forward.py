"""Forward-pass (prefill) time of dsjax vs transformers' PyTorch DeepseekV3, same weights,
same machine, one run. Prints the ratio; nothing here is asserted.

  python benchmarks/forward.py [--batch 4 --seq 512 --hidden 512 --layers 6 --repeats 5]
"""

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import DeepseekV3ForCausalLM

import dsjax
from dsjax.model.moe import resolve_impl
from v3_shape import v3_config


def torch_model(args) -> DeepseekV3ForCausalLM:
  config = v3_config(args, num_mtp_layers=0)
  torch.manual_seed(0)
  return DeepseekV3ForCausalLM(config).eval()


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  for name, default in (("batch", 4), ("seq", 512), ("hidden", 512), ("layers", 6),
                        ("vocab", 32000), ("experts", 16), ("topk", 4), ("repeats", 5)):
    parser.add_argument(f"--{name}", type=int, default=default)
  args = parser.parse_args()
  reference = torch_model(args)
  with tempfile.TemporaryDirectory() as tmp:
    reference.save_pretrained(tmp)
    model = dsjax.load_hf_checkpoint(tmp)
  ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))

  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  start = time.perf_counter()
  ours = forward(state, jnp.asarray(ids)).block_until_ready()
  compile_s = time.perf_counter() - start
  jax_s = best_of(lambda: forward(state, jnp.asarray(ids)).block_until_ready(), args.repeats)
  with torch.no_grad():
    ref = reference(torch.tensor(ids)).logits.numpy()
    torch_s = best_of(lambda: reference(torch.tensor(ids)), args.repeats)

  tokens = args.batch * args.seq
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
  print(f"model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-"
        f"{args.topk}, vocab {args.vocab}; batch {args.batch} x {args.seq} tokens, fp32")
  print(f"max |logits diff| = {np.abs(np.asarray(ours) - ref).max():.2e}")
  print(f"dsjax (jit, moe={resolve_impl(model.config.moe.impl, model.config.moe)}): "
        f"{jax_s * 1e3:.0f} ms = {tokens / jax_s:,.0f} tok/s (compile {compile_s:.1f} s)")
  print(f"transformers (eager): {torch_s * 1e3:.0f} ms = {tokens / torch_s:,.0f} tok/s")
  print(f"speed ratio dsjax / transformers: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  main()
