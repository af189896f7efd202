"""Tunables of the flash attention kernels. Untuned: no TPU was at hand."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """`block_q` queries and `block_k` keys per grid step, the same for the forward and both
  backward kernels. block_q is a multiple of 8 (sublanes) and block_k of 128 (lanes: the
  step's key positions are one lane-dense row). Shorter sequences use one block (rounded up
  to those multiples); longer ones are zero-padded to whole blocks. VMEM at 512 x 512 with
  q/k head dim 192 and v head dim 128 in bf16: about 1 MiB of double-buffered operands and
  a few 1 MiB float32 [block_q, block_k] temporaries, inside every chip's default scoped
  VMEM."""
  block_q: int = 512
  block_k: int = 512

  def __post_init__(self):
    for name, multiple in (("block_q", 8), ("block_k", 128)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < multiple or value % multiple:
        raise ValueError(f"BlockSizes.{name}={value!r}; use a positive multiple of "
                         f"{multiple}.")
