"""DeepSeekMoE router math: scores, group-limited top-k, weight normalisation.

Shapes: M tokens, E experts, K chosen experts per token, G expert groups.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import MoEConfig


class Routing(NamedTuple):
  """expert_ids int32[M,K], expert_weights float32[M,K], scores float32[M,E] (unbiased);
  dropped: with expert parallelism, the fraction of (token, expert) rows a capacity factor
  dropped (float32 scalar), else None."""
  expert_ids: jax.Array
  expert_weights: jax.Array
  scores: jax.Array
  dropped: jax.Array | None = None


def _group_mask(choice: jax.Array, moe: MoEConfig) -> jax.Array:
  """bool[M,E]: experts inside the topk_group best groups of each token."""
  m, e = choice.shape
  grouped = choice.reshape(m, moe.n_group, e // moe.n_group)
  if moe.topk_method == "noaux_tc":
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # V3: sum of the top-2 biased scores
  else:
    group_scores = grouped.max(-1)  # V2 group_limited_greedy: best expert of the group
  _, top_groups = jax.lax.top_k(group_scores, moe.topk_group)
  chosen = jnp.zeros((m, moe.n_group), bool).at[jnp.arange(m)[:, None], top_groups].set(True)
  return jnp.repeat(chosen, e // moe.n_group, axis=1)


def route(router_logits: jax.Array, bias: jax.Array, moe: MoEConfig) -> Routing:
  """Chooses K experts per token from float32 router_logits[M,E].

  The load-balancing `bias[E]` shifts only which experts are chosen; the returned weights are
  the unbiased scores of the chosen experts, optionally renormalised, times
  routed_scaling_factor.
  """
  logits = router_logits.astype(jnp.float32)
  if moe.scoring_func == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    scores = jax.nn.softmax(logits, axis=-1)
  choice = scores + bias.astype(jnp.float32)
  if moe.topk_method != "greedy" and moe.n_group > 1:
    choice = jnp.where(_group_mask(choice, moe), choice, -jnp.inf)
  _, expert_ids = jax.lax.top_k(choice, moe.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if moe.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  weights = weights * moe.routed_scaling_factor
  return Routing(expert_ids.astype(jnp.int32), weights, scores)
