"""Flash attention for training and prefill: Mosaic TPU kernels (forward, dq, dk/dv) with a
custom_vjp, visibility from positions and segment ids, and a dense oracle."""

from pallas_kernels.attention.metadata import BlockRanges, block_ranges, block_visibility
from pallas_kernels.attention.ops import flash_attention
from pallas_kernels.attention.reference import attention_reference, visible_keys
from pallas_kernels.attention.tiling import BlockSizes

__all__ = ["BlockRanges", "BlockSizes", "attention_reference", "block_ranges",
           "block_visibility", "flash_attention", "visible_keys"]
