"""The NSA layer (dsjax.model.nsa): causal as a whole (selection driven by the compression
scores included), its gates mix the branches, and bad shapes are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import NSAConfig, RopeConfig
from dsjax.model.nsa import NSAttention
from dsjax.ops.rope import rope_cos_sin
from tests.model_fixtures import assert_close_at_scale

CFG = NSAConfig(num_kv_heads=2, head_dim=16, v_head_dim=12, compress_block=8,
                compress_stride=4, compress_hidden=24, select_block=16, num_selected=3,
                window=10)


def _layer_and_inputs(t=70, seed=0):
  layer = NSAttention(32, 8, CFG, std=0.3, rngs=nnx.Rngs(seed))
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, t, 32)), jnp.float32)
  cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t), (2, t)), RopeConfig(), CFG.head_dim)
  return layer, x, cos, sin


@pytest.mark.parametrize("t_cut", [5, 31, 50])
def test_layer_is_causal(t_cut):
  """Changing the input after t_cut changes neither the outputs up to t_cut nor the gradient
  they send to the inputs and parameters."""
  layer, x, cos, sin = _layer_and_inputs()
  graphdef, params = nnx.split(layer)
  changed = x.at[:, t_cut + 1:].set(np.random.default_rng(1).normal(size=x[:, t_cut + 1:].shape))
  weights = jnp.cos(jnp.arange(2 * (t_cut + 1) * 32)).reshape(2, t_cut + 1, 32)

  def past_loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x, cos, sin)[:, :t_cut + 1] * weights)
  (loss_a, (gp_a, gx_a)) = jax.value_and_grad(past_loss, argnums=(0, 1))(params, x)
  (loss_b, (gp_b, gx_b)) = jax.value_and_grad(past_loss, argnums=(0, 1))(params, changed)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  np.testing.assert_allclose(gx_a[:, :t_cut + 1], gx_b[:, :t_cut + 1], atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gp_a, gp_b)
  # And the future does matter for the future (the test would notice a constant layer).
  out_a, out_b = layer(x, cos, sin), layer(changed, cos, sin)
  assert float(jnp.abs(out_a[:, t_cut + 1:] - out_b[:, t_cut + 1:]).max()) > 1e-3


def test_gates_mix_the_three_branches():
  layer, x, cos, sin = _layer_and_inputs(t=40)
  outs, gates, indices = layer.branches(x, cos, sin)
  mixed = sum(gates[..., c:c + 1] * outs[c] for c in range(3))
  want = jnp.einsum("BTNH,NHD->BTD", mixed, layer.wo[...])
  np.testing.assert_allclose(layer(x, cos, sin), want, atol=1e-5)
  assert outs.shape == (3, 2, 40, 8, 12) and indices.shape == (2, 40, 2, 3)
  assert bool(jnp.all((gates > 0) & (gates < 1)))


def test_bad_head_counts_are_refused():
  with pytest.raises(ValueError, match="not a multiple of nsa.num_kv_heads"):
    NSAttention(32, 6, CFG.__class__(num_kv_heads=4), std=0.1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="compress_stride=6 must divide"):
    NSAConfig(compress_stride=6)
  with pytest.raises(ValueError, match="nsa.query_chunk=-1; use 0"):
    NSAConfig(query_chunk=-1)


def _nsa_model_config():
  from tests.model_fixtures import tiny_config
  return tiny_config(attention="nsa", nsa=NSAConfig(
      num_kv_heads=2, head_dim=8, v_head_dim=8, compress_block=4, compress_stride=2,
      compress_hidden=8, select_block=8, num_selected=3, window=6))


def test_nsa_model_scanned_equals_unrolled_and_trains():
  """attention='nsa' in ModelConfig: every block (and the MTP module) uses NSA; scanned and
  unrolled stacks agree, and every NSA parameter receives a gradient."""
  from tests.model_fixtures import forward, randomized_model, tokens, value_and_grad
  model = randomized_model(_nsa_model_config())
  assert type(model.moe_layers.blocks.attn).__name__ == "NSAttention"
  ids = tokens(model.config, t=30)
  np.testing.assert_allclose(forward(model, ids, scan=True).logits,
                             forward(model, ids, scan=False).logits, atol=1e-5)
  _, grads = value_and_grad(model, ids)
  for path, g in nnx.to_flat_state(grads):
    if "attn" in path:
      assert float(jnp.abs(g.get_value()).max()) > 0, path


def test_hf_export_and_speculative_decoding_refuse_nsa():
  import dsjax
  from dsjax.checkpoint.hf_config import to_hf
  cfg = _nsa_model_config()
  with pytest.raises(ValueError, match="no HuggingFace DeepseekV2/V3 equivalent"):
    to_hf(cfg)
  model = nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="speculative='mtp' is not supported"):
    dsjax.generate(model, [[1, 2]], max_new_tokens=2, speculative="mtp")


def test_query_chunk_leaves_the_layer_unchanged():
  """nsa.query_chunk=16 (with "gather", every branch in rematerialised chunks) gives the
  whole-sequence layer's output and input gradient. (With "pallas" it chunks only the
  selection scores: tests/ops/test_nsa.py::test_branches_through_one_block_sparse_attention.)
  """
  import dataclasses
  layer, x, cos, sin = _layer_and_inputs(t=40)
  graphdef, params = nnx.split(layer)
  chunked = dataclasses.replace(CFG, query_chunk=16)

  def loss(x, cfg):
    model = nnx.merge(graphdef, params)
    model.nsa = cfg
    return jnp.sum(jnp.sin(model(x, cos, sin, select_impl="gather")))
  (a, ga), (b, gb) = (jax.value_and_grad(loss)(x, cfg) for cfg in (CFG, chunked))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-4)  # f32 sums in another order


def test_pallas_selection_equals_gather_in_the_layer():
  """select_impl='pallas' (the selection kernel, interpreted on CPU, for the selection and
  the window branch) gives the output of the gather path and the XLA sliding window."""
  layer, x, cos, sin = _layer_and_inputs(t=40)
  assert_close_at_scale(layer(x, cos, sin, select_impl="pallas"),
                        layer(x, cos, sin, select_impl="gather"), rel=1e-5)
