"""DSA's two implementations agree: the gather path (each query reads its k selected latents,
absorbed) equals the dense-mask reference in logits and in every gradient; the selection
matters (a larger top-k changes the logits), packed documents stay apart, and the LM loss sends
no gradient into the indexer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import DSAConfig
from tests.model_fixtures import randomized_model, tiny_config, tokens

DSA = DSAConfig(index_n_heads=16, index_head_dim=16, index_topk=6)


def _model(impl, topk=DSA.index_topk):
  cfg = tiny_config(attention="dsa", dsa=dataclasses.replace(DSA, impl=impl, index_topk=topk),
                    num_mtp_layers=0)
  return randomized_model(cfg)


def _loss(params, rest, graphdef, ids, segment_ids):
  out = nnx.merge(graphdef, params, rest).forward(ids, segment_ids=segment_ids)
  return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 1]), out.logits


def _value_and_grad(model, ids, segment_ids=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)
  (loss, logits), grads = fn(params, rest, graphdef, ids, segment_ids)
  return logits, nnx.to_flat_state(grads)


@pytest.fixture(scope="module")
def ids():
  return tokens(tiny_config(), t=20)


def test_gather_equals_dense_reference(ids):
  gather_logits, gather_grads = _value_and_grad(_model("gather"), ids)
  dense_logits, dense_grads = _value_and_grad(_model("dense"), ids)
  np.testing.assert_allclose(gather_logits, dense_logits, atol=1e-5)
  for (path, g), (_, d) in zip(gather_grads, dense_grads):
    np.testing.assert_allclose(g.get_value(), d.get_value(), atol=1e-5, rtol=1e-4,
                               err_msg="/".join(map(str, path)))
  indexer = [g for p, g in gather_grads if "indexer" in p]
  assert indexer and all(float(jnp.abs(g.get_value()).max()) == 0 for g in indexer)
  others = [g for p, g in gather_grads if "indexer" not in p]
  assert sum(float(jnp.abs(g.get_value()).max()) > 0 for g in others) > 10


def test_selection_changes_the_output(ids):
  sparse, _ = _value_and_grad(_model("gather"), ids)
  dense_mla, _ = _value_and_grad(_model("gather", topk=64), ids)
  np.testing.assert_allclose(sparse[:, :DSA.index_topk], dense_mla[:, :DSA.index_topk],
                             atol=1e-5)  # queries with <= k visible keys see them all
  assert float(jnp.abs(sparse - dense_mla).max()) > 1e-2


def test_packed_documents_stay_apart(ids):
  model = _model("gather")
  segment_ids = jnp.asarray(np.repeat([[1, 2]], 10, axis=1).reshape(1, 20).repeat(2, 0))
  packed, _ = _value_and_grad(model, ids, segment_ids)
  alone, _ = _value_and_grad(model, ids[:, 10:])
  np.testing.assert_allclose(packed[:, 10:], alone, atol=1e-5)
