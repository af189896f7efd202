"""DeepSeek-V4 attention math: window compression, the visibility of compressed entries, and
softmax attention with a sink logit per head.

Shapes: B batch, T tokens, H query heads, D the single K = V head's dims, W compressed entries,
m tokens per entry (the compression rate), I indexer heads, E indexer dims.

The indexer's scores and top-k are DSA's (dsjax.ops.dsa.index_scores, top_k_mask).

Compression (one entry per window of m tokens, DeepSeek-V4's compressors):
  HCA (non-overlapping): entry w = sum over window w of softmax_j(gate_j + bias_j) * kv_j.
  CSA (overlapping): features carry two series [a | b] of D each; entry w pools window w's b
    and window w-1's a together (2m slots; window -1 is zero kv with -inf gates).
An entry is normalised and rotated at its window's first position (w * m) by the caller; query
t sees entry w iff w < (t + 1) // m (its whole window is at or before t).
"""

import jax
import jax.numpy as jnp


def _pool(kv: jax.Array, gate: jax.Array) -> jax.Array:
  """sum_j softmax_j(gate) * kv over axis 2 (fp32 softmax): [B,W,S,D] -> [B,W,D]."""
  weights = jax.nn.softmax(gate.astype(jnp.float32), axis=2)
  return jnp.sum(kv.astype(jnp.float32) * weights, axis=2).astype(kv.dtype)


def compress_windows(kv: jax.Array, gate: jax.Array, position_bias: jax.Array, rate: int,
                     overlap: bool) -> jax.Array:
  """The un-normalised compressed entries [B,W,D] of the complete windows of kv, gate
  [B,T,C] (W = T // rate; C = D, or 2D with `overlap`); position_bias [rate, C] is added to
  each window's gates."""
  b, t, c = kv.shape
  w = t // rate
  kv = kv[:, :w * rate].reshape(b, w, rate, c)
  gate = gate[:, :w * rate].reshape(b, w, rate, c) + position_bias.astype(gate.dtype)
  if not overlap:
    return _pool(kv, gate)
  d = c // 2
  # Window w-1's first series (window -1: zero kv, -inf gates) beside window w's second.
  prev_kv = jnp.pad(kv[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)))
  prev_gate = jnp.pad(gate[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)),
                      constant_values=-jnp.inf)
  return _pool(jnp.concatenate([prev_kv, kv[..., d:]], axis=2),
               jnp.concatenate([prev_gate, gate[..., d:]], axis=2))


def entry_positions(num_entries: int, rate: int, batch: int) -> jax.Array:
  """int32[B,W]: each entry's rotary position, its window's first token (w * rate)."""
  return jnp.broadcast_to(jnp.arange(num_entries, dtype=jnp.int32) * rate, (batch, num_entries))


def visible_entries(positions: jax.Array, num_entries: int, rate: int) -> jax.Array:
  """bool[B,T,W]: entry w is complete at query position t (w < (t + 1) // rate)."""
  return jnp.arange(num_entries)[None, None, :] < ((positions + 1) // rate)[..., None]


def sink_attention(q: jax.Array, kv: jax.Array, visible: jax.Array, sinks: jax.Array,
                   scale: float) -> jax.Array:
  """softmax over [q.k * scale, sink_h] of each head, the sink dropped, times the values:
  q [B,T,H,D], kv [B,S,D] (keys = values), visible bool [B,T,S], sinks [H] -> [B,T,H,D].
  Logits in float32; a query that sees no key gives 0 (all its weight on the sink)."""
  logits = jnp.einsum("BTHD,BSD->BHTS", q.astype(jnp.float32), kv.astype(jnp.float32)) * scale
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], logits.shape[:3] + (1,))
  full = jnp.concatenate([logits, sink], axis=-1)
  probs = jax.nn.softmax(full, axis=-1)[..., :-1]
  return jnp.einsum("BHTS,BSD->BTHD", probs, kv.astype(jnp.float32)).astype(q.dtype)
