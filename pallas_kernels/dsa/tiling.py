"""Tunables of the sparse MLA kernels. Untuned: no TPU or GPU was at hand; the defaults compile
for v5p, v6e, tpu7x and H100 at DeepSeek-V3.2's shapes (docs/kernels.md)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """`block_k` (TPU): latent rows gathered per chunk of a query's index list, the N dim of
  the score matmul. A multiple of 8 (whole sublane tiles of the f32 / int32 gather buffer).
  `queries_per_step` (TPU): query tokens per grid step; their block_k-padded index lists
  sit in SMEM for that step only, so SMEM holds queries_per_step * K int32 whatever T is.
  A power of two >= 8 (the [queries, N] log-sum-exp block is whole sublane tiles).
  `gpu_block_k` / `gpu_block_h` (GPU): rows gathered per chunk and query heads per Triton
  program; powers of two >= 16 (tl.dot's minimum). `num_warps` / `num_stages`: Triton's
  launch options.
  `vmem_limit_mib` (TPU): the kernels' scoped-VMEM limit, None for the compiler's default
  (16 MiB on v5p, 32 MiB on v6e and tpu7x). The f32 backward at N=128, D=576 needs 16.2 MiB
  with the default queries_per_step: pass 32 on v5p.
  `backward_queries` (both): queries per backward kernel call. The backward writes each
  query's K per-row latent gradients (f32) before XLA scatter-adds them, so its scratch is
  backward_queries * K * D * 4 bytes (1.2 GB at 256 x 2048 x 576), not T * K * D * 4.
  """
  block_k: int = 128
  queries_per_step: int = 8
  gpu_block_k: int = 32
  gpu_block_h: int = 32
  num_warps: int = 4
  num_stages: int = 2
  backward_queries: int = 256
  vmem_limit_mib: int | None = None

  def __post_init__(self):
    for name in ("block_k", "queries_per_step", "gpu_block_k", "gpu_block_h", "num_warps",
                 "num_stages", "backward_queries"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r}; use a positive int.")
    if self.vmem_limit_mib is not None and (not isinstance(self.vmem_limit_mib, int)
                                            or self.vmem_limit_mib < 1):
      raise ValueError(f"BlockSizes.vmem_limit_mib={self.vmem_limit_mib!r}; use a positive "
                       "int or None.")
    if self.block_k % 8:
      raise ValueError(f"BlockSizes.block_k={self.block_k}; use a multiple of 8.")
    for name, least in (("queries_per_step", 8), ("gpu_block_k", 16), ("gpu_block_h", 16)):
      value = getattr(self, name)
      if value < least or value & (value - 1):
        raise ValueError(f"BlockSizes.{name}={value}; use a power of two >= {least}.")
