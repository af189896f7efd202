"""dsjax.ops.routing.route against a per-token loop written from DeepSeek's formulas."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsjax.config import MoEConfig
from dsjax.ops.routing import route


def reference_route(logits: np.ndarray, bias: np.ndarray, moe: MoEConfig):
  """One token at a time, as DeepSeek's inference/model.py Gate.forward reads."""
  ids, weights = [], []
  for row in logits.astype(np.float64):
    if moe.scoring_func == "sigmoid":
      scores = 1 / (1 + np.exp(-row))
    else:
      scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    choice = scores + bias
    if moe.topk_method != "greedy" and moe.n_group > 1:
      groups = choice.reshape(moe.n_group, -1)
      if moe.topk_method == "noaux_tc":
        group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
      else:
        group_score = groups.max(-1)
      keep = np.argsort(-group_score)[:moe.topk_group]
      allowed = np.zeros_like(groups, bool)
      allowed[keep] = True
      choice = np.where(allowed.reshape(-1), choice, -np.inf)
    chosen = np.argsort(-choice)[:moe.num_experts_per_tok]
    w = scores[chosen]
    if moe.norm_topk_prob:
      w = w / w.sum()
    ids.append(chosen)
    weights.append(w * moe.routed_scaling_factor)
  return np.array(ids), np.array(weights)


MOES = [
    MoEConfig(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
              scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
              routed_scaling_factor=2.5),
    MoEConfig(n_routed_experts=16, num_experts_per_tok=3, n_group=8, topk_group=3,
              scoring_func="softmax", topk_method="group_limited_greedy"),
    MoEConfig(n_routed_experts=12, num_experts_per_tok=2, scoring_func="softmax",
              topk_method="greedy", routed_scaling_factor=16.0),
    MoEConfig(n_routed_experts=8, num_experts_per_tok=2, scoring_func="sigmoid",
              topk_method="greedy", norm_topk_prob=True),
]


@pytest.mark.parametrize("moe", MOES, ids=lambda m: f"{m.scoring_func}-{m.topk_method}")
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bias_scale=st.sampled_from([0.0, 0.05, 1.0]))
def test_route_matches_per_token_reference(moe, seed, bias_scale):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (32, moe.n_routed_experts)).astype(np.float32)
  bias = (rng.normal(0, bias_scale, moe.n_routed_experts)).astype(np.float32)
  got = route(logits, bias, moe)
  ref_ids, ref_weights = reference_route(logits, bias, moe)
  order = np.argsort(np.asarray(got.expert_ids), axis=-1)
  ref_order = np.argsort(ref_ids, axis=-1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(got.expert_ids), order, -1),
                                np.take_along_axis(ref_ids, ref_order, -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(got.expert_weights), order, -1),
                             np.take_along_axis(ref_weights, ref_order, -1), rtol=1e-5)


def test_bias_never_enters_the_weights():
  moe = dataclasses.replace(MOES[0], norm_topk_prob=False, routed_scaling_factor=1.0)
  logits = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  got = route(logits, np.full(16, 0.3, np.float32), moe)  # a uniform shift changes nothing
  plain = route(logits, np.zeros(16, np.float32), moe)
  np.testing.assert_array_equal(got.expert_ids, plain.expert_ids)
  scores = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(got.expert_weights,
                             np.take_along_axis(scores, np.asarray(got.expert_ids), -1),
                             rtol=1e-6)
