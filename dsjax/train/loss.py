"""Training losses: next-token cross-entropy (+ z-loss), MTP targets, DeepSeek-V3's
sequence-wise balance loss and expert-load statistics.

Losses come back as mask-weighted sums with their weight, so that micro-batches and data
shards add up to the exact batch mean (mean = sum / weight). Shapes: B rows of T tokens,
V vocabulary, L MoE layers, M = B*T routed tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CrossEntropy(NamedTuple):
  """Mask-weighted sums: loss_sum = sum mask * -log p(target), z_sum = sum mask *
  logsumexp(logits)^2, weight_sum = sum mask (all float32 scalars)."""
  loss_sum: jax.Array
  z_sum: jax.Array
  weight_sum: jax.Array


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> CrossEntropy:
  """Cross-entropy of logits [..., V] (any float dtype; computed in float32) against int
  targets [...], weighted by mask [...] (0 drops a position; its target may be anything).

  The z-loss (PaLM) of weight w is w * z_sum / weight_sum; the caller applies w.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  valid = mask != 0
  # Masked positions may hold padding ids outside [0, V); any in-range id keeps the gather safe.
  safe_targets = jnp.where(valid, targets, 0)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
  # where (not only * mask) so that non-finite logits at dropped positions cannot leak in
  nll = jnp.where(valid, (lse - target_logit) * mask, 0.0)
  z = jnp.where(valid, jnp.square(lse) * mask, 0.0)
  return CrossEntropy(jnp.sum(nll), jnp.sum(z), jnp.sum(mask))


def mtp_targets(targets: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array, k: int
                ) -> tuple[jax.Array, jax.Array]:
  """Targets and mask of MTP depth k, aligned with the depth's logits [B,T-k,V].

  Position i of depth k predicts targets[:, i+k]. It counts only where loss_mask[:, i+k] is
  set and inputs i and i+k belong to the same packed sequence.
  targets, segment_ids int[B,T]; loss_mask float[B,T] -> (int[B,T-k], float32[B,T-k]).
  """
  t = targets.shape[1]
  if not 1 <= k < t:
    raise ValueError(f"MTP depth k={k} needs 1 <= k < sequence length {t}; lower "
                     "model.num_mtp_layers or raise train.seq_len.")
  same_sequence = segment_ids[:, :-k] == segment_ids[:, k:]
  mask = loss_mask[:, k:].astype(jnp.float32) * same_sequence.astype(jnp.float32)
  return targets[:, k:], mask


def _token_mask(token_mask: jax.Array | None, segment_ids: jax.Array) -> jax.Array:
  """float32[M]: 1 for real tokens (segment id > 0 and token_mask set), 0 for padding."""
  valid = segment_ids.reshape(-1) > 0
  if token_mask is not None:
    if token_mask.size != valid.size:
      raise ValueError(f"token_mask has {token_mask.size} entries but segment_ids has "
                       f"{valid.size}; pass a token mask of shape {segment_ids.shape}.")
    valid &= token_mask.reshape(-1) > 0
  return valid.astype(jnp.float32)


def _row_sequences(segment_ids: jax.Array) -> jax.Array:
  """int32[T]: the index in [0, T) of each token's packed sequence within its row: sequences
  are the runs of equal segment id (packing writes them contiguously), so segment ids need
  not be small or dense."""
  starts = jnp.concatenate([jnp.ones((1,), bool), segment_ids[1:] != segment_ids[:-1]])
  return jnp.cumsum(starts, dtype=jnp.int32) - 1


def _row_balance(scores, expert_ids, segment_ids, valid, num_experts_per_tok: int):
  """One row's sum over its sequences of L_bal (float32[L]) and its number of sequences.
  scores [L,T,E], expert_ids [L,T,K], segment_ids and valid [T]."""
  layers, t, e = scores.shape
  seq = _row_sequences(segment_ids)
  lengths = jax.ops.segment_sum(valid, seq, num_segments=t)  # T_s, [T] (most are empty)
  denom = jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-30)
  probs = jnp.where(valid[None, :, None] > 0, scores / denom, 0.0)
  prob_sum = jax.ops.segment_sum(jnp.moveaxis(probs, 1, 0), seq, num_segments=t)  # [T,L,E]
  # sum_i count_i * prob_sum_i as a gather at each token's chosen experts: no [L,T,E] counts.
  chosen = prob_sum[seq[None, :, None], jnp.arange(layers)[:, None, None], expert_ids]
  per_token = jnp.sum(chosen, axis=-1) * valid[None]  # [L,T]
  dot = jax.ops.segment_sum(per_token.T, seq, num_segments=t)  # [T,L]
  has_tokens = lengths > 0
  safe_len = jnp.where(has_tokens, lengths, 1.0)
  per_sequence = e / num_experts_per_tok * dot / jnp.square(safe_len)[:, None]
  per_sequence = jnp.where(has_tokens[:, None], per_sequence, 0.0)
  return jnp.sum(per_sequence, axis=0), jnp.sum(has_tokens)


def sequence_balance_loss(scores: jax.Array, expert_ids: jax.Array, segment_ids: jax.Array,
                          num_experts_per_tok: int, token_mask: jax.Array | None = None
                          ) -> jax.Array:
  """DeepSeek-V3's complementary sequence-wise balance loss of each MoE layer: float32[L].

  Per sequence s of T_s real tokens, L_bal = sum_i f_i * P_i with
  f_i = E / (K * T_s) * #{t : expert i in the top-K of token t} and
  P_i = 1/T_s * sum_t s_it / sum_j s_jt, then averaged over the sequences of the batch.
  A sequence is one packed segment of one row; padding (segment id 0, or token_mask 0) is
  ignored. Uniform routing gives 1. The caller multiplies by the weight alpha.

  scores float[L,M,E] (unbiased router scores), expert_ids int[L,M,K],
  segment_ids int[B,T] with M = B*T, token_mask [B,T] or [M] (optional). Computed row by
  row (a sequence never crosses rows), so a batch split over devices stays split.
  """
  layers, m, e = scores.shape
  if segment_ids.size != m or expert_ids.shape[:2] != (layers, m):
    raise ValueError(f"scores {scores.shape} and expert_ids {expert_ids.shape} must be [L,B*T,.] "
                     f"for segment_ids {segment_ids.shape}; pass the routing of this batch.")
  b, t = segment_ids.shape
  valid = _token_mask(token_mask, segment_ids).reshape(b, t)
  rows = jax.vmap(_row_balance, in_axes=(1, 1, 0, 0, None))
  total, sequences = rows(scores.astype(jnp.float32).reshape(layers, b, t, e),
                          expert_ids.reshape(layers, b, t, -1), segment_ids, valid,
                          num_experts_per_tok)
  return jnp.sum(total, axis=0) / jnp.maximum(jnp.sum(sequences), 1)


def expert_load(expert_ids: jax.Array, num_experts: int, token_mask: jax.Array | None = None
                ) -> jax.Array:
  """float32[L,E]: how many tokens chose each expert in each layer, counting only tokens with
  token_mask set. expert_ids int[L,M,K]; token_mask [M] or [B,T] with B*T = M (optional)."""
  layers, m, k = expert_ids.shape
  if token_mask is None:
    weights = jnp.ones((m, k), jnp.float32)
  else:
    if token_mask.size != m:
      raise ValueError(f"token_mask has {token_mask.size} entries for {m} routed tokens; pass "
                       "the mask of the tokens in expert_ids.")
    weights = jnp.broadcast_to(token_mask.reshape(m, 1).astype(jnp.float32), (m, k))

  def count(ids):
    return jnp.zeros((num_experts,), jnp.float32).at[ids.reshape(-1)].add(weights.reshape(-1))
  return jax.vmap(count)(expert_ids)


def load_imbalance(load: jax.Array) -> jax.Array:
  """float32[L]: max over experts / mean over experts of load [L,E] (1 is perfectly even)."""
  load = load.astype(jnp.float32)
  mean = jnp.mean(load, axis=-1)
  return jnp.max(load, axis=-1) / jnp.maximum(mean, 1e-30)
