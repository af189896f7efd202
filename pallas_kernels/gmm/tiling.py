"""Tile sizes of the grouped matmul kernels."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile of one kernel step: `tm` rows of lhs, `tk` of the contraction dim, `tn` output
  columns. In tgmm, `tm` tiles the contracted (row) dim and `tk` the output's K dim.

  TPU: tm a multiple of 8 (16 for bf16), tk and tn multiples of 128 (a dimension smaller than
  its tile uses the whole dimension). GPU (Triton): powers of two, at least 16.
  `num_warps` / `num_stages` are Triton's launch options (ignored on TPU).
  """
  tm: int = 128
  tk: int = 512
  tn: int = 512
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("tm", "tk", "tn", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r}; use a positive int.")

  @classmethod
  def default(cls, backend: str) -> "BlockSizes":
    """Defaults per backend. TPU: MXU-sized tiles whose scoped VMEM (double-buffered
    blocks plus the f32 accumulator, as XLA:TPU allocates it) is 1.75 MiB for gmm and 3.5 MiB
    for tgmm in bf16, 3.3 / 4 MiB in f32: within v5p's 16 MiB default limit (v6e, tpu7x:
    32 MiB) with room to spare (docs/kernels.md). Triton: 72 KiB of shared memory with 3
    pipeline stages in bf16, within Hopper's 227 KiB and Ampere's 163 KiB. Untuned."""
    if backend == "tpu":
      return cls(tm=128, tk=512, tn=512)
    if backend == "gpu":
      return cls(tm=64, tk=64, tn=128, num_warps=4, num_stages=3)
    raise ValueError(f"backend={backend!r}; use 'tpu' or 'gpu'.")

  def fit(self, backend: str, m: int, k: int, n: int) -> "BlockSizes":
    """These tiles shrunk to small operands: on TPU a tile never exceeds its dimension (a
    whole-dimension block is always legal); Triton needs powers of two, so there a tile
    shrinks to the next power of two >= the dimension (at least 16)."""
    if backend == "tpu":
      fitted = (min(self.tm, m), min(self.tk, k), min(self.tn, n))
    else:
      for name in ("tm", "tk", "tn"):
        value = getattr(self, name)
        if value < 16 or value & (value - 1):
          raise ValueError(f"BlockSizes.{name}={value} on GPU; Triton tiles must be powers of "
                           "two >= 16.")
      fitted = tuple(min(t, max(16, 1 << max(d - 1, 0).bit_length()))
                     for t, d in ((self.tm, m), (self.tk, k), (self.tn, n)))
    return dataclasses.replace(self, tm=fitted[0], tk=fitted[1], tn=fitted[2])
