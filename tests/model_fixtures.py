"""Tiny random dsjax models and compiled forward/gradient functions shared by model tests.

Compiled functions take the graphdef as a static argument, so equal model structures share
one compilation across tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsjax
from dsjax.model.param import RouterBias


def tiny_config(**changes) -> dsjax.ModelConfig:
  cfg = dsjax.ModelConfig(
      vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
      mla=dsjax.MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=8, v_head_dim=12),
      moe=dsjax.MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                          moe_intermediate_size=16, n_group=4, topk_group=2,
                          scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                          routed_scaling_factor=2.5, first_k_dense_replace=1),
      num_mtp_layers=1)
  return cfg.replace(**changes)


def randomized_model(cfg, seed=0) -> dsjax.Transformer:
  """Random init (compiled once) plus random norm weights and router biases, so that routing
  has no near-ties."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.split(dsjax.Transformer(cfg, rngs=nnx.Rngs(seed)))[1])()
  model = nnx.merge(graphdef, state)
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape = var.get_value().shape
    if path[-1] == "weight":
      var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, shape), var.get_value().dtype))
    elif isinstance(var, RouterBias):
      var.set_value(jnp.asarray(rng.normal(0, 0.1, shape), jnp.float32))
  return model


def tokens(cfg, b=2, t=24, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "moe_impl", "scan"))
def _forward(graphdef, state, ids, positions, segment_ids, moe_impl=None, scan=None):
  return nnx.merge(graphdef, state).forward(ids, positions, segment_ids, moe_impl, scan)


def forward(model, ids, positions=None, segment_ids=None, moe_impl=None, scan=None):
  graphdef, state = nnx.split(model)
  return _forward(graphdef, state, ids, positions, segment_ids, moe_impl=moe_impl, scan=scan)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _mtp(graphdef, state, ids):
  return nnx.merge(graphdef, state).mtp_logits(ids)


def mtp_logits(model, ids):
  graphdef, state = nnx.split(model)
  return _mtp(graphdef, state, ids)


def _loss(graphdef, params, rest, ids, moe_impl, scan):
  model = nnx.merge(graphdef, params, rest)
  out = model.forward(ids, moe_impl=moe_impl, scan=scan)
  mtp = sum(jnp.mean(l) for l in model.mtp_logits(ids, hidden=out.hidden, moe_impl=moe_impl))
  return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0]) + mtp


@functools.partial(jax.jit, static_argnames=("graphdef", "moe_impl", "scan"))
def _value_and_grad(graphdef, params, rest, ids, moe_impl=None, scan=None):
  return jax.value_and_grad(lambda p: _loss(graphdef, p, rest, ids, moe_impl, scan))(params)


def value_and_grad(model, ids, moe_impl=None, scan=None):
  """A loss over main and MTP logits and its gradient w.r.t. every nnx.Param."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return _value_and_grad(graphdef, params, rest, ids, moe_impl=moe_impl, scan=scan)


def _logit_loss(params, rest, graphdef, ids, scan):
  out = nnx.merge(graphdef, params, rest).forward(ids, scan=scan)
  return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0]), out.logits


def scanned_and_unrolled(model, ids):
  """((logits, grads) scanned, (logits, grads) unrolled) of a loss over the main logits;
  grads: the nnx.Param gradient state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grad = jax.jit(jax.value_and_grad(_logit_loss, has_aux=True), static_argnums=(2, 4))
  (_, logits1), g1 = grad(params, rest, graphdef, ids, True)
  (_, logits2), g2 = grad(params, rest, graphdef, ids, False)
  return (logits1, g1), (logits2, g2)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol)


def assert_close_at_scale(actual, expected, rel):
  """Every |actual - expected| <= rel * max|expected|: float32 sums taken in another order
  (another kernel, another CPU's vector width) differ by a few ulps of the largest terms
  they add, so a small element can carry an error that is large relative to itself."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * np.abs(expected).max())
