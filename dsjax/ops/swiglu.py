"""The SwiGLU activation of the dense MLPs and the experts, optionally clamped (DeepSeek-V4)."""

import jax
import jax.numpy as jnp


def swiglu(gate: jax.Array, up: jax.Array, limit: float = 0.0) -> jax.Array:
  """silu(gate) * up of pre-activations gate, up [..., F]. limit > 0 clamps them first, as
  DeepSeek-V4's experts do: gate = min(gate, limit), up = clip(up, -limit, limit); 0 leaves
  them as they are."""
  if limit < 0:
    raise ValueError(f"swiglu limit={limit}; use 0 (no clamp) or a positive limit.")
  if limit:
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
  return jax.nn.silu(gate) * up
