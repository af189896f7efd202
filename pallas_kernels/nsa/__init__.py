"""Native Sparse Attention's selected-block attention: TPU (Mosaic) and GPU (Triton) kernels
with a custom_vjp, a dense-mask oracle and a gather-based XLA path."""

from pallas_kernels.backend import BACKENDS
from pallas_kernels.nsa.metadata import block_query_lists
from pallas_kernels.nsa.ops import resolve_backend, selected_attention
from pallas_kernels.nsa.reference import (allowed_keys, selected_attention_gather,
                                          selected_attention_reference)
from pallas_kernels.nsa.tiling import BlockSizes

__all__ = ["BACKENDS", "BlockSizes", "allowed_keys", "block_query_lists", "resolve_backend",
           "selected_attention", "selected_attention_gather", "selected_attention_reference"]
