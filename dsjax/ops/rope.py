"""Rotary position embedding with YaRN scaling, in DeepSeek's interleaved layout.

Shapes: positions int[B,T]; cos/sin float32[B,T,R/2]; x [B,T,N,R].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import RopeConfig, yarn_mscale


def _yarn_correction_range(rope: RopeConfig, dim: int) -> tuple[int, int]:
  """Rotary-dim indices between which YaRN ramps from extrapolation to interpolation."""
  def correction_dim(rotations: float) -> float:
    return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta)))
  low = math.floor(correction_dim(rope.beta_fast))
  high = math.ceil(correction_dim(rope.beta_slow))
  return max(low, 0), min(high, dim - 1)


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies float32[dim/2] and the cos/sin magnitude factor for `dim` rotary dims."""
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.float32(rope.theta) ** exponents
  extrapolation = np.float32(1.0) / pos_freqs
  if rope.type == "default":
    return extrapolation.astype(np.float32), 1.0
  interpolation = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
  low, high = _yarn_correction_range(rope, dim)
  high = high + 0.001 if low == high else high  # avoids a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
  extrapolation_weight = np.float32(1.0) - ramp.astype(np.float32)
  inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
  if rope.mscale and rope.mscale_all_dim:
    magnitude = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
  else:
    magnitude = yarn_mscale(rope.factor)
  return inv_freq.astype(np.float32), float(magnitude)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, dim: int) -> tuple[jax.Array, jax.Array]:
  """cos and sin float32[B,T,dim/2] (magnitude-scaled) for integer positions[B,T]."""
  inv_freq, magnitude = rope_frequencies(rope, dim)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool = True) -> jax.Array:
  """Rotates x[B,T,N,R] by the angles behind cos/sin[B,T,R/2]; the output keeps x's layout."""
  cos = cos[:, :, None, :]
  sin = sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  if interleave:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
