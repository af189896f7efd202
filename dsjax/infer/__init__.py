"""Inference: decode caches (MLA's latents, NSA's decode state), sampling, batched jitted
generation, MTP speculation."""

from dsjax.infer.cache import (bytes_per_token_per_layer, cache_nbytes, cache_ratio,
                               full_kv_values_per_token, latent_values_per_token)
from dsjax.infer.generation import GenerationResult, Generator, generate
from dsjax.infer.sampling import SamplingParams, sample_next

__all__ = [
    "GenerationResult", "Generator", "SamplingParams", "bytes_per_token_per_layer",
    "cache_nbytes", "cache_ratio", "full_kv_values_per_token", "generate",
    "latent_values_per_token", "sample_next",
]
