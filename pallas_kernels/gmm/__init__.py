"""Grouped matmul (megablox-style) kernels for DeepSeekMoE experts: TPU (Mosaic) and GPU
(Triton), with pure-jnp references."""

from pallas_kernels.backend import BACKENDS
from pallas_kernels.gmm.metadata import GroupMetadata, make_group_metadata
from pallas_kernels.gmm.ops import gmm, resolve_backend, tgmm
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference
from pallas_kernels.gmm.tiling import BlockSizes

__all__ = ["BACKENDS", "BlockSizes", "GroupMetadata", "gmm", "gmm_reference",
           "make_group_metadata", "resolve_backend", "tgmm", "tgmm_reference"]
