"""Properties of the forward pass: causality, packing, annotations, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.model.param import RouterBias, logical_axes
from dsjax.parallel.rules import LOGICAL_AXES, state_partition_specs
from tests.model_fixtures import forward, mtp_logits, randomized_model, tiny_config, tokens


@pytest.fixture(scope="module")
def model():
  return randomized_model(tiny_config(), seed=5)


def test_future_tokens_do_not_change_past_logits_or_gradients(model):
  ids = tokens(model.config, b=1, t=20)
  changed = ids.at[:, 12:].set((ids[:, 12:] + 7) % model.config.vocab_size)
  np.testing.assert_allclose(forward(model, ids).logits[:, :12],
                             forward(model, changed).logits[:, :12], atol=1e-5)
  np.testing.assert_allclose(mtp_logits(model, ids)[0][:, :11],
                             mtp_logits(model, changed)[0][:, :11], atol=1e-5)

  # Gradients of the prefix loss w.r.t. the embedding table do not see the future tokens.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def prefix_grad(p, x):
    return jax.grad(lambda q: jnp.sum(nnx.merge(graphdef, q, rest)(x)[:, :12] ** 2))(p)
  g1, g2 = prefix_grad(params, ids), prefix_grad(params, changed)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_packed_sequences_equal_separate_runs(model):
  a, b = tokens(model.config, b=1, t=10, seed=2), tokens(model.config, b=1, t=14, seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  positions = jnp.concatenate([jnp.arange(10), jnp.arange(14)])[None]
  segments = jnp.concatenate([jnp.ones(10, jnp.int32), 2 * jnp.ones(14, jnp.int32)])[None]
  out = forward(model, packed, positions, segments).logits
  np.testing.assert_allclose(out[:, :10], forward(model, a).logits, atol=1e-5)
  np.testing.assert_allclose(out[:, 10:], forward(model, b).logits, atol=1e-5)


def test_every_variable_has_logical_axes_of_its_rank(model):
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = logical_axes(var)
    assert len(axes) == var.get_value().ndim, path
    assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)
    if path[0] in ("dense_layers", "moe_layers"):
      assert axes[0] == "layers", path
  # Under the default rules experts land on `expert`, heads and expert hidden dims on `tensor`,
  # and the MLA low-rank dims (like `embed`) on `fsdp`.
  specs = dict(nnx.to_flat_state(state_partition_specs(nnx.state(model))))
  spec = lambda *path: tuple(specs[path])  # noqa: E731
  assert spec("moe_layers", "blocks", "ffn", "w1") == (None, "expert", "fsdp", "tensor")
  assert spec("moe_layers", "blocks", "attn", "wq_b") == (None, "fsdp", "tensor", None)
  assert spec("embed",) == ("tensor", "fsdp")


def test_router_bias_is_not_a_parameter(model):
  params = nnx.state(model, nnx.Param)
  biases = nnx.state(model, RouterBias)
  assert jax.tree.leaves(biases), "MoE layers must carry router biases"
  names = {p[-1] for p, _ in nnx.to_flat_state(params)}
  assert "router_bias" not in names


def test_routing_weights_are_normalised_unbiased_scores(model):
  x = jax.random.normal(jax.random.key(0), (16, model.config.hidden_size))
  graphdef, state = nnx.split(model.moe_layers.blocks)
  layer0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).ffn
  routing = layer0.route(x)
  picked = np.take_along_axis(np.asarray(routing.scores), np.asarray(routing.expert_ids), -1)
  expected = picked / picked.sum(-1, keepdims=True) * model.config.moe.routed_scaling_factor
  np.testing.assert_allclose(routing.expert_weights, expected, rtol=1e-5)
  # The bias moves the choice: a large bias on expert 0 makes every token pick it.
  layer0.router_bias.set_value(jnp.zeros_like(layer0.router_bias[...]).at[0].set(10.0))
  assert np.all(np.any(np.asarray(layer0.route(x).expert_ids) == 0, axis=-1))


def test_input_errors_are_actionable(model):
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model(jnp.zeros((1, model.config.max_position_embeddings + 1), jnp.int32))
  with pytest.raises(ValueError, match=r"int\[B,T\]"):
    model(jnp.zeros((5,), jnp.int32))


def test_bfloat16_compute_stays_bfloat16_and_close_to_float32(model):
  bf16 = nnx.merge(nnx.split(randomized_model(tiny_config(dtype="bfloat16")))[0],
                   nnx.state(model))
  ids = tokens(model.config, b=1, t=16)
  out = forward(bf16, ids)
  assert out.logits.dtype == jnp.bfloat16 and out.hidden.dtype == jnp.bfloat16
  ref = forward(model, ids).logits
  error = np.abs(np.asarray(out.logits, np.float32) - np.asarray(ref))
  assert error.mean() < 0.03 * np.abs(np.asarray(ref)).mean(), error.mean()
