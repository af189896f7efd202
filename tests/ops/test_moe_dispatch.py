"""The three exact MoE dispatch implementations agree, forward and gradients, over random
expert assignments including empty experts and one expert taking every row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsjax.ops.moe_dispatch import (experts_blocked, experts_dense, experts_dense_out_major,
                                   experts_sorted)
from tests.model_fixtures import assert_close_at_scale


def _problem(seed, m, k, e, skew):
  rng = np.random.default_rng(seed)
  d, f = 8, 6
  if skew:  # every token picks from the first k experts only: the others stay empty
    ids = np.stack([rng.permutation(k) for _ in range(m)])
  else:
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(m)])
  x = rng.normal(size=(m, d)).astype(np.float32)
  weights = rng.random((m, k)).astype(np.float32)
  w1, w3 = (rng.normal(size=(e, d, f)).astype(np.float32) for _ in range(2))
  w2 = rng.normal(size=(e, f, d)).astype(np.float32)
  return x, jnp.asarray(ids, jnp.int32), weights, w1, w3, w2


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 40), k=st.integers(1, 3),
       e=st.sampled_from([3, 4, 8]), skew=st.booleans(), block=st.sampled_from([None, 4, 16]))
def test_blocked_and_sorted_equal_dense(seed, m, k, e, skew, block):
  x, ids, weights, w1, w3, w2 = _problem(seed, m, k, e, skew)
  dense = experts_dense(x, ids, weights, w1, w3, w2)
  np.testing.assert_allclose(experts_blocked(x, ids, weights, w1, w3, w2, block), dense,
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(experts_sorted(x, ids, weights, w1, w3, w2), dense,
                             atol=1e-4, rtol=1e-4)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 24), e=st.sampled_from([3, 8]),
       skew=st.booleans())
def test_out_major_weights_give_the_same_experts(seed, m, e, skew):
  """The decoding layout (w1/w3 [E,F,D], w2 [D,E,F]) through the dense and blocked dispatches."""
  x, ids, weights, w1, w3, w2 = _problem(seed, m, 2, e, skew)
  dense = experts_dense(x, ids, weights, w1, w3, w2)
  w1t, w3t = (np.swapaxes(w, 1, 2) for w in (w1, w3))
  w2t = np.transpose(w2, (2, 0, 1))
  np.testing.assert_allclose(experts_dense_out_major(x, ids, weights, w1t, w3t, w2t), dense,
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(experts_blocked(x, ids, weights, w1t, w3t, w2t, out_major=True),
                             dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", [experts_blocked, experts_sorted])
def test_gradients_equal_dense(impl):
  x, ids, weights, w1, w3, w2 = _problem(0, 19, 2, 8, skew=False)

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(a[0], ids, a[1], *a[2:])))
  args = (x, weights, w1, w3, w2)
  expected = jax.grad(loss(experts_dense), argnums=range(5))(*args)
  got = jax.grad(loss(impl), argnums=range(5))(*args)
  for a, b in zip(got, expected):  # gradients reach |78|
    assert_close_at_scale(a, b, rel=1e-5)
