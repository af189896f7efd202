"""DeepSeekMoE router math: scores, group-limited top-k, weight normalisation, and the hash
routing of DeepSeek-V4's first MoE layers (experts given per token, weights still scored).

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


def router_scores(router_logits: jax.Array, scoring_func: str) -> jax.Array:
  """float32[M,E] scores of router_logits[M,E]: sigmoid (V3), softmax over the experts (V2) or
  sqrt(softplus(logit)) (V4's "sqrtsoftplus")."""
  logits = router_logits.astype(jnp.float32)
  if scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  if scoring_func == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if scoring_func == "sqrtsoftplus":
    return jnp.sqrt(jax.nn.softplus(logits))
  raise ValueError(f"moe.scoring_func={scoring_func!r}; use 'sigmoid', 'softmax' or "
                   "'sqrtsoftplus'.")


def _chosen_weights(scores: jax.Array, expert_ids: jax.Array, moe: MoEConfig) -> jax.Array:
  """float32[M,K]: the scores of the chosen experts, optionally renormalised to sum to 1,
  times routed_scaling_factor."""
  weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if moe.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * moe.routed_scaling_factor


def route(router_logits: jax.Array, bias: jax.Array, moe: MoEConfig) -> Routing:
  """Chooses K experts per token from float32 router_logits[M,E].

  The load-balancing `bias[E]` shifts only which experts are chosen; the returned weights are
  the unbiased scores of the chosen experts, optionally renormalised, times
  routed_scaling_factor.
  """
  scores = router_scores(router_logits, moe.scoring_func)
  choice = scores + bias.astype(jnp.float32)
  if moe.topk_method != "greedy" and moe.n_group > 1:
    choice = jnp.where(_group_mask(choice, moe), choice, -jnp.inf)
  _, expert_ids = jax.lax.top_k(choice, moe.num_experts_per_tok)
  return Routing(expert_ids.astype(jnp.int32), _chosen_weights(scores, expert_ids, moe), scores)


def hash_route(router_logits: jax.Array, expert_ids: jax.Array, moe: MoEConfig) -> Routing:
  """The Routing of tokens whose K experts are given, expert_ids int[M,K] (DeepSeek-V4's hash
  layers: a fixed table of the token ids): no bias, no top-k; the weights are the chosen
  experts' scores of float32 router_logits[M,E], optionally renormalised, times
  routed_scaling_factor, as in `route`."""
  scores = router_scores(router_logits, moe.scoring_func)
  expert_ids = expert_ids.astype(jnp.int32)
  return Routing(expert_ids, _chosen_weights(scores, expert_ids, moe), scores)
