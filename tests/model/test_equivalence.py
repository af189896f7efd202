"""Equal paths: scanned == unrolled, dense == sorted dispatch, jit == eager, remat == none."""

import jax
import numpy as np
import pytest
from flax import nnx

import dsjax
from tests.model_fixtures import (assert_trees_close, forward, randomized_model, tiny_config,
                                  tokens, value_and_grad)


@pytest.fixture(scope="module")
def model():
  return randomized_model(tiny_config())


def test_scanned_equals_unrolled(model):
  ids = tokens(model.config)
  scanned, unrolled = forward(model, ids, scan=True), forward(model, ids, scan=False)
  np.testing.assert_allclose(scanned.logits, unrolled.logits, atol=1e-5)
  np.testing.assert_array_equal(scanned.routing.expert_ids, unrolled.routing.expert_ids)
  (l1, g1), (l2, g2) = value_and_grad(model, ids, scan=True), value_and_grad(model, ids, scan=False)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert_trees_close(g1, g2, 1e-5)


@pytest.mark.parametrize("impl", ["ragged", "blocked", "pallas"])
def test_dense_dispatch_equals_sorted_dispatch(model, impl):
  ids = tokens(model.config)
  dense, other = forward(model, ids, moe_impl="dense"), forward(model, ids, moe_impl=impl)
  np.testing.assert_allclose(dense.logits, other.logits, atol=1e-4)
  (l1, g1), (l2, g2) = (value_and_grad(model, ids, moe_impl="dense"),
                        value_and_grad(model, ids, moe_impl=impl))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  assert_trees_close(g1, g2, 1e-4)


def test_jit_equals_eager():
  cfg = tiny_config(num_hidden_layers=2, num_mtp_layers=0)
  model = randomized_model(cfg, seed=2)
  ids = tokens(cfg, t=8)
  with jax.disable_jit():
    eager = model(ids)
  np.testing.assert_allclose(forward(model, ids).logits, eager, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims"])
def test_remat_policies_leave_gradients_unchanged(model, policy):
  remat = nnx.merge(nnx.split(randomized_model(tiny_config(remat_policy=policy)))[0],
                    nnx.state(model))
  ids = tokens(model.config)
  (l1, g1), (l2, g2) = value_and_grad(model, ids), value_and_grad(remat, ids)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert_trees_close(g1, g2, 1e-5)


def test_softmax_group_limited_dense_equals_sorted():
  cfg = tiny_config(moe=dsjax.MoEConfig(
      n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=16,
      n_group=4, topk_group=2, scoring_func="softmax", topk_method="group_limited_greedy",
      first_k_dense_replace=0), num_mtp_layers=0)
  m = randomized_model(cfg, seed=3)
  ids = tokens(cfg)
  dense = forward(m, ids, moe_impl="dense").logits
  for impl in ("ragged", "blocked"):
    np.testing.assert_allclose(forward(m, ids, moe_impl=impl).logits, dense, atol=1e-4)
