"""Tunables of the selected-attention kernels. Untuned: no TPU or GPU was at hand; the defaults
compile within VMEM on v5p, v6e and tpu7x at 64k tokens (docs/kernels.md)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """`queries_per_step` (TPU): queries per grid step of the forward and dq kernels. Their S
  block indices sit in SMEM for that step only, so SMEM holds queries_per_step * S int32
  whatever T is; more queries per step amortise the step overhead. A power of two >= 8; at
  128 and above the [G, queries] log-sum-exp rows are lane-dense.
  `list_chunk` (TPU): query positions of a key block's list copied to SMEM at a time by the
  dk/dv kernel, in windows that start at multiples of it. A power of two; compiled for a TPU
  a multiple of 128 too, since Mosaic copies HBM slices only at 128-lane offsets (smaller
  windows only in interpret mode).
  `num_warps` / `num_stages`: Triton's launch options (GPU).
  """
  queries_per_step: int = 128
  list_chunk: int = 128
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("queries_per_step", "list_chunk", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r}; use a positive int.")
    for name, least in (("queries_per_step", 8), ("list_chunk", 1)):
      value = getattr(self, name)
      if value < least or value & (value - 1):
        raise ValueError(f"BlockSizes.{name}={value}; use a power of two >= {least}.")
