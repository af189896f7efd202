"""DSA (DeepSeek-V3.2's sparse attention) vs dense MLA: forward and forward+backward time of
one attention layer over sequence length, side by side in one run, next to the theoretical
FLOP ratio; then, compiled for a TPU chip, the two layers' memory at 64k and 128k tokens.
Nothing here is asserted.

  python benchmarks/dsa.py [--lengths 8192,16384,32768] [--tpu v5p:2x2x1 --tpu_lengths ...]

Part 1 (this machine): the same MLA layer (hidden 256, 8 heads, q_lora 128, kv_lora 128,
nope 64 + rope 32, v 64) once as dense MLA (mla.attention_impl "auto": XLA's blocked flash
attention at these lengths on CPU, the upper triangle skipped) and once with a lightning
indexer of 4 heads x 32 dims selecting index_topk = 2048 tokens (DeepSeek-V3.2's k), by
dsa.impl "auto" (the gather path on CPU, the Pallas kernels on TPU/GPU); float32, B=1. The
forward+backward is the gradient of a random projection of the output w.r.t. the input and
every weight. FLOPs (multiply-adds x 2) per layer, projections included:
  dense: causal (t+1) keys per query x 2N(Hq + Hv) + expanding every key and value
         (2 C N (Hn + Hv) per token);
  DSA:   min(t+1, k) keys x 2N(2C + R) (absorbed logits over C+R, values over C) + the
         indexer's (t+1) keys x 2 H_I D_I + absorbing q and expanding the output
         (2 N C (Hn + Hv) per token) + the indexer's projections.
Part 2 (--tpu): the same two layers at DeepSeek-V3.2's sizes (hidden 7168, 128 heads,
kv_lora 512, index 64 x 128), bf16, forward+backward compiled for one chip of the topology
(XLA:TPU, Mosaic kernels included); the compiler's temporaries per chip.
"""

import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.config import DSAConfig, MLAConfig, ModelConfig
from dsjax.model.dsa import DSAttention
from dsjax.model.kinds import TokenContext
from dsjax.model.mla import MLA
from dsjax.model.options import RunOptions
from nsa import seconds  # benchmarks/nsa.py: best of n compiled calls

SMALL = dict(hidden_size=256, num_attention_heads=8,
             mla=MLAConfig(q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                           qk_rope_head_dim=32, v_head_dim=64),
             dsa=DSAConfig(index_n_heads=4, index_head_dim=32, index_topk=2048))
V32 = dict(hidden_size=7168, num_attention_heads=128,
           mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128),
           dsa=DSAConfig(index_n_heads=64, index_head_dim=128, index_topk=2048))


def config(sizes: dict, t: int, dtype: str) -> ModelConfig:
  return ModelConfig(vocab_size=256, intermediate_size=64, num_hidden_layers=1,
                     max_position_embeddings=max(t, 4096), attention="dsa", dtype=dtype,
                     param_dtype=dtype, moe=None, **sizes)


def layer_flops(cfg: ModelConfig, t: int) -> dict[str, float]:
  """Forward FLOPs of the dense MLA layer and of the DSA layer over T = t tokens."""
  m, d, n = cfg.mla, cfg.hidden_size, cfg.num_attention_heads
  c, r, hn, hv = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
  hi, di, k = cfg.dsa.index_n_heads, cfg.dsa.index_head_dim, cfg.dsa.index_topk
  keys = np.arange(1, t + 1, dtype=np.float64)  # causal: query t sees t+1 keys
  shared = t * 2 * (d * m.q_lora_rank + m.q_lora_rank * n * (hn + r) + d * (c + r)
                    + n * hv * d)
  dense = shared + keys.sum() * 2 * n * (hn + r + hv) + t * 2 * c * n * (hn + hv)
  indexer = t * 2 * (m.q_lora_rank * hi * di + d * di + d * hi) + keys.sum() * 2 * hi * di
  dsa = (shared + np.minimum(keys, k).sum() * 2 * n * (2 * c + r) + t * 2 * n * c * (hn + hv)
         + indexer)
  return {"dense": float(dense), "dsa": float(dsa)}


def layers(cfg: ModelConfig):
  """(dense MLA, DSA) layers with the same MLA weights; DSA adds its indexer."""
  dsa = DSAttention(cfg, rngs=nnx.Rngs(0))
  mla = MLA(cfg, rngs=nnx.Rngs(0))
  return mla, dsa


def functions(layer, cfg: ModelConfig, t: int):
  """(forward(state, x), forward_and_backward(state, x, cotangent)) of one layer, jittable."""
  graphdef, _ = nnx.split(layer)
  positions = jnp.arange(t, dtype=jnp.int32)[None]
  options = RunOptions()

  def forward(state, x):
    module = nnx.merge(graphdef, state)
    ctx = type(module).context(cfg, TokenContext(None, positions))
    return module.attend(x, ctx, options)

  def loss(state, x, cotangent):
    return jnp.sum(forward(state, x).astype(jnp.float32) * cotangent)

  return forward, jax.grad(loss, argnums=(0, 1))


def part_local(lengths: list[int], repeats: int) -> None:
  device = jax.devices()[0]
  print(f"machine: {device.device_kind} ({device.platform}), host "
        f"{platform.processor() or platform.machine()}; jax {jax.__version__}; float32, B=1; "
        f"MLA hidden 256, 8 heads, kv_lora 128; DSA index 4 x 32, top-k 2048")
  print(f"{'T':>6} {'FLOP ratio':>10} | {'dense fwd':>9} {'DSA fwd':>8} {'speedup':>7} "
        f"{'of FLOPs':>8} | {'dense f+b':>9} {'DSA f+b':>8} {'speedup':>7} {'of FLOPs':>8}")
  for t in lengths:
    cfg = config(SMALL, t, "float32")
    flops = layer_flops(cfg, t)
    ratio = flops["dense"] / flops["dsa"]
    key = jax.random.split(jax.random.key(t), 2)
    x = jax.random.normal(key[0], (1, t, cfg.hidden_size), jnp.float32)
    cot = jax.random.normal(key[1], (1, t, cfg.hidden_size), jnp.float32)
    times = {}
    for name, layer in zip(("dense", "dsa"), layers(cfg)):
      forward, grad = functions(layer, cfg, t)
      state = nnx.state(layer)
      times[name, "fwd"] = seconds(forward, (state, x), repeats)
      times[name, "f+b"] = seconds(grad, (state, x, cot), repeats)
    row = f"{t:>6} {ratio:>9.2f}x"
    for part in ("fwd", "f+b"):
      speedup = times["dense", part] / times["dsa", part]
      row += (f" | {times['dense', part]:>8.2f}s {times['dsa', part]:>7.2f}s {speedup:>6.2f}x "
              f"{speedup / ratio:>7.0%}")
    print(row, flush=True)


def part_tpu(topology_name: str, lengths: list[int]) -> None:
  from dsjax.compile.topology import device_context, get_topology
  topology = get_topology(topology_name)
  device = topology.devices[0]
  print(f"\n# Part 2: one DeepSeek-V3.2-size attention layer (hidden 7168, 128 heads, index "
        f"64 x 128, top-k 2048), bf16, forward + backward compiled for one {device.device_kind} "
        f"chip ({topology_name})")
  for t in lengths:
    cfg = config(V32, t, "bfloat16")
    flops = layer_flops(cfg, t)
    spec = jax.ShapeDtypeStruct
    x = spec((1, t, cfg.hidden_size), jnp.bfloat16)
    cot = spec((1, t, cfg.hidden_size), jnp.float32)
    row = f"  T={t:>6}  FLOP ratio {flops['dense'] / flops['dsa']:5.2f}x"
    for name in ("dense", "dsa"):
      layer = nnx.eval_shape(lambda: layers(cfg)[0 if name == "dense" else 1])
      _, grad = functions(layer, cfg, t)
      began = time.perf_counter()
      with device_context([device]):
        try:
          compiled = jax.jit(grad).lower(nnx.state(layer), x, cot).compile()
        except jax.errors.JaxRuntimeError as error:
          if "RESOURCE_EXHAUSTED" not in str(error):
            raise
          row += f" | {name}: does not fit ({str(error).split('RESOURCE_EXHAUSTED: ')[-1]})"
          continue
      stats = compiled.memory_analysis()
      row += (f" | {name}: temporaries {stats.temp_size_in_bytes / 2**30:6.2f} GiB, compiled in "
              f"{time.perf_counter() - began:4.0f} s")
    print(row, flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="8192,16384,32768")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--tpu", default="", help="a TPU topology (e.g. v5p:2x2x1) for part 2")
  parser.add_argument("--tpu_lengths", default="65536,131072")
  args = parser.parse_args()
  if args.lengths:
    part_local([int(x) for x in args.lengths.split(",")], args.repeats)
  if args.tpu:
    part_tpu(args.tpu, [int(x) for x in args.tpu_lengths.split(",")])


if __name__ == "__main__":
  main()
