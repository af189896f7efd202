"""NSA vs full causal attention: forward and forward+backward time over sequence length, side
by side in one run, next to the theoretical FLOP ratio. Nothing here is asserted.

  python benchmarks/nsa.py [--lengths 4096,8192,16384,32768 --heads 16 --kv_heads 1]

Both sides are the attention core only (queries, keys and values given; no projections):
  full: causal softmax attention as an XLA flash-style loop: query blocks mapped, each an
        online-softmax scan over key blocks that skips those past the diagonal (the work of a
        causal flash kernel), every query block recomputed in the backward pass;
  NSA:  dsjax.ops.nsa.branch_outputs with the paper's block sizes (l=32, d=16, l'=64, n=16,
        w=512): compression over mean-pooled blocks, top-n selection by the gather path,
        sliding window, in scanned query chunks that are recomputed in the backward pass.
Both loops keep one block's buffers at a time, so memory stays bounded at 32k.
On CPU both are XLA. On a GPU/TPU (--select pallas) all three branches run through the
Pallas selection kernel, as with the model's select_impl="pallas": the selection scores in
query chunks without gradient, then compression, selection and window as block-sparse
attention over whole sequences.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import NSAConfig
from dsjax.ops import nsa as nsa_ops
from pallas_kernels.nsa import selected_attention
from pallas_kernels.nsa.reference import selected_attention_gather

_HIGHEST = jax.lax.Precision.HIGHEST


def full_attention(q, k, v, block: int, scale: float):
  """Causal flash-style attention in XLA: a map over query blocks, each an online-softmax scan
  over key blocks that skips (lax.cond) the blocks past the diagonal, and is recomputed in the
  backward pass. Work: the causal triangle (plus half of each diagonal block); memory: one
  query block's working set."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  blocks = -(-t // block)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, blocks * block - t), (0, 0), (0, 0)])
  split = lambda x: jnp.moveaxis(pad(x).reshape(b, blocks, block, *x.shape[2:]), 1, 0)
  qb = split(q).reshape(blocks, b, block, kv, n // kv, h)
  kb, vb = split(k), split(v)
  diagonal = jnp.tril(jnp.ones((block, block), bool))

  @jax.checkpoint
  def query_block(args):
    i, qi = args

    def key_block(carry, j):
      def attend(carry):
        peak, total, acc = carry
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", qi, kb[j], precision=_HIGHEST) * scale
        logits = jnp.where((j < i) | diagonal, logits, -jnp.inf)
        new_peak = jnp.maximum(peak, logits.max(axis=-1))
        weights = jnp.exp(logits - new_peak[..., None])
        rescale = jnp.exp(peak - new_peak)
        acc = acc * rescale[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", weights, vb[j],
                                                    precision=_HIGHEST)
        return new_peak, total * rescale + weights.sum(axis=-1), acc
      return jax.lax.cond(j <= i, attend, lambda carry: carry, carry), None

    init = (jnp.full((b, kv, n // kv, block), -jnp.inf), jnp.zeros((b, kv, n // kv, block)),
            jnp.zeros((b, kv, n // kv, block, v.shape[-1])))
    (_, total, acc), _ = jax.lax.scan(key_block, init, jnp.arange(blocks))
    return acc / total[..., None]                              # [B,KV,G,block,Hv]

  out = jax.lax.map(query_block, (jnp.arange(blocks), qb))    # [blocks,B,KV,G,block,Hv]
  out = jnp.moveaxis(out, 0, 3).reshape(b, n, blocks * block, -1)
  return jnp.moveaxis(out, 1, 2)[:, :t]


def nsa_attention(q, k, v, cfg: NSAConfig, chunk: int, scale: float, select_impl: str):
  """The three branches (sharing k, v here) mixed with equal gates."""
  k_cmp = nsa_ops.block_windows(k, cfg.compress_block, cfg.compress_stride).mean(axis=3)
  v_cmp = nsa_ops.block_windows(v, cfg.compress_block, cfg.compress_stride).mean(axis=3)

  def kernel(q, k, v, indices, key_start, key_end):
    return selected_attention(q, k, v, indices, cfg.select_block, scale, key_start=key_start,
                              key_end=key_end)

  def select(qc, kc, vc, indices, offset, starts):
    del starts  # one sequence per row
    return selected_attention_gather(qc, kc, vc, indices, cfg.select_block, scale,
                                     query_offset=offset)
  # With the kernels, query chunks bound only the selection scores' memory.
  outs, _ = nsa_ops.branch_outputs(q, jnp.stack([k, k]), jnp.stack([v, v]), k_cmp, v_cmp, cfg,
                                   scale, select, query_chunk=chunk,
                                   attend_selected=kernel if select_impl == "pallas" else None)
  return outs.sum(axis=0) / 3


def flop_ratio(t: int, cfg: NSAConfig) -> float:
  """Keys attended per query, summed over queries: full causal t(t+1)/2 vs NSA's visible
  compressed blocks + selected tokens + window tokens (each capped by the causal prefix)."""
  return float((np.arange(t) + 1).sum() / nsa_ops.keys_per_query(t, cfg).sum())


def seconds(fn, args, repeats: int) -> float:
  """Best of `repeats` calls of the compiled fn (compilation excluded; the first call is
  timed too, since at 32k one call takes minutes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192,16384,32768")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=1)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--chunk", type=int, default=1024, help="query chunk of both paths")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--select", default="auto", choices=["auto", "gather", "pallas"])
  args = parser.parse_args()
  device = jax.devices()[0]
  select_impl = (("gather" if device.platform == "cpu" else "pallas") if args.select == "auto"
                 else args.select)
  cfg = NSAConfig(num_kv_heads=args.kv_heads, head_dim=args.head_dim, v_head_dim=args.head_dim)
  scale = args.head_dim ** -0.5
  print(f"machine: {device.device_kind} ({device.platform}), host "
        f"{platform.processor() or platform.machine()}; jax {jax.__version__}; float32, B=1, "
        f"heads {args.heads} on {args.kv_heads} KV, head dim {args.head_dim}; NSA l=32 d=16 "
        f"l'=64 n=16 w=512, selection by {select_impl}")
  print(f"{'T':>6} {'FLOP ratio':>10} | {'full fwd':>9} {'NSA fwd':>8} {'speedup':>7} | "
        f"{'full f+b':>9} {'NSA f+b':>8} {'speedup':>7}")
  for t in (int(x) for x in args.lengths.split(",")):
    key = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(key[0], (1, t, args.heads, args.head_dim), jnp.float32)
    k = jax.random.normal(key[1], (1, t, args.kv_heads, args.head_dim), jnp.float32)
    v = jax.random.normal(key[2], (1, t, args.kv_heads, args.head_dim), jnp.float32)
    paths = {"full": lambda q, k, v: full_attention(q, k, v, args.chunk, scale),
             "nsa": lambda q, k, v: nsa_attention(q, k, v, cfg, args.chunk, scale, select_impl)}
    times = {}
    for name, fn in paths.items():
      times[name, "fwd"] = seconds(fn, (q, k, v), args.repeats)
      grad = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
      times[name, "f+b"] = seconds(grad, (q, k, v), args.repeats)
    print(f"{t:>6} {flop_ratio(t, cfg):>9.2f}x | {times['full', 'fwd']:>8.2f}s "
          f"{times['nsa', 'fwd']:>7.2f}s {times['full', 'fwd'] / times['nsa', 'fwd']:>6.2f}x | "
          f"{times['full', 'f+b']:>8.2f}s {times['nsa', 'f+b']:>7.2f}s "
          f"{times['full', 'f+b'] / times['nsa', 'f+b']:>6.2f}x", flush=True)


if __name__ == "__main__":
  main()
