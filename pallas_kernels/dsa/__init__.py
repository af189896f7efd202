"""DeepSeek-V3.2's token-sparse MLA (DSA): TPU (Mosaic) and GPU (Triton) kernels with a
custom_vjp, a dense-mask oracle and a gather oracle."""

from pallas_kernels.backend import BACKENDS
from pallas_kernels.dsa.ops import resolve_backend, sparse_mla
from pallas_kernels.dsa.reference import (selection_mask, sparse_mla_gather,
                                          sparse_mla_reference)
from pallas_kernels.dsa.tiling import BlockSizes

__all__ = ["BACKENDS", "BlockSizes", "resolve_backend", "selection_mask", "sparse_mla",
           "sparse_mla_gather", "sparse_mla_reference"]
