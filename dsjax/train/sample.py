"""A short sample from the model being trained, printed at the end of a run.

It recomputes the full forward pass over a fixed-length buffer for each token (one compiled
loop, no cache): simple and exact, fine for a few hundred tokens of a small model. Use
`dsjax.generate` (latent KV cache) for real inference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "temperature"))
def _sample(graphdef, params, router_bias, buffer, key, *, prompt_len: int, temperature: float):
  model = nnx.merge(graphdef, params, router_bias)

  def body(pos, carry):
    tokens, key = carry
    logits = model(tokens)[0, pos - 1].astype(jnp.float32)
    key, sub = jax.random.split(key)
    if temperature > 0:
      token = jax.random.categorical(sub, logits / temperature)
    else:
      token = jnp.argmax(logits)
    return tokens.at[0, pos].set(token.astype(tokens.dtype)), key

  tokens, _ = jax.lax.fori_loop(prompt_len, buffer.shape[1], body, (buffer, key))
  return tokens


def sample_tokens(graphdef, params, router_bias, prompt: list[int], num_tokens: int,
                  key: jax.Array, temperature: float = 0.7, max_len: int | None = None
                  ) -> list[int]:
  """`num_tokens` ids continuing `prompt` (temperature 0: greedy), within `max_len`."""
  if not prompt:
    raise ValueError("The sample prompt is empty; set --config.train.sample_prompt.")
  total = len(prompt) + num_tokens
  if max_len is not None:
    total = min(total, max_len)
  buffer = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
  out = _sample(graphdef, params, router_bias, buffer, key, prompt_len=len(prompt),
                temperature=float(temperature))
  return [int(t) for t in out[0, len(prompt):]]
