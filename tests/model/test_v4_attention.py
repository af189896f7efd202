"""DeepSeek-V4's attention kinds (v4_sliding, v4_csa, v4_hca) against transformers'
DeepseekV4Attention in fp32: the same inputs (captured from a tiny DeepseekV4Model's layers),
the same weights, outputs within 1e-5; plus the compression and visibility rules."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dsjax.config import RopeConfig, V4AttentionConfig
from dsjax.model.kinds import TokenContext, attention_kind
from dsjax.model.options import RunOptions
from dsjax.ops import v4_attention as v4
from tests.hf_fixtures import tiny_v4_config
from tests.model_fixtures import tiny_config

LAYERS = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
KINDS = {"sliding_attention": "v4_sliding", "compressed_sparse_attention": "v4_csa",
         "heavily_compressed_attention": "v4_hca"}
V4 = V4AttentionConfig(head_dim=16, qk_rope_head_dim=8, q_lora_rank=12, o_groups=2,
                       o_lora_rank=6, sliding_window=5, csa_rate=2, hca_rate=4,
                       compress_rope=RopeConfig(theta=160000.0), index_n_heads=8,
                       index_head_dim=8, index_topk=3)
T = 19  # not a multiple of the rates; longer than the window plus two HCA windows


def _reference():
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref
  config = tiny_v4_config(LAYERS, ["moe"] * 3, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=8, hc_mult=2)
  torch.manual_seed(0)
  model = ref.DeepseekV4Model(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "self_attn" in name:  # random everything: weights, norms, sinks, position biases
        p.copy_(torch.randn(p.shape) * (0.3 if p.ndim > 1 else 0.5)
                + (1.0 if name.endswith("norm.weight") else 0.0))
  return model


@pytest.fixture(scope="module")
def captured():
  """Each layer's attention input, output and module from one forward of the reference."""
  model = _reference()
  records = {}

  def hook(layer):
    def capture(module, args, kwargs, output):
      records[layer] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                        output[0], module)
    return capture

  handles = [model.layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True)
             for i in range(3)]
  ids = torch.from_numpy(np.random.default_rng(0).integers(0, 64, (2, T)))
  with torch.no_grad():
    model(input_ids=ids, use_cache=False)
  for h in handles:
    h.remove()
  return records


def _t(x):
  return jnp.asarray(x.detach().numpy())


def _copy_compressor(ours, theirs):
  ours.wkv.set_value(_t(theirs.kv_proj.weight).T)
  ours.wgate.set_value(_t(theirs.gate_proj.weight).T)
  ours.ape.set_value(_t(theirs.position_bias))
  ours.norm.weight.set_value(_t(theirs.kv_norm.weight))


def _dsjax_layer(kind: str, module, v4_cfg=V4):
  cfg = tiny_config(hidden_size=32, num_attention_heads=4, v4=v4_cfg, rms_norm_eps=1e-6)
  layer = attention_kind(kind).create(cfg, rngs=nnx.Rngs(0))
  n, d, q = 4, V4.head_dim, V4.q_lora_rank
  layer.wq_a.set_value(_t(module.q_a_proj.weight).T)
  layer.q_norm.weight.set_value(_t(module.q_a_norm.weight))
  layer.wq_b.set_value(_t(module.q_b_proj.weight).T.reshape(q, n, d))
  layer.wkv.set_value(_t(module.kv_proj.weight).T)
  layer.kv_norm.weight.set_value(_t(module.kv_norm.weight))
  g = V4.o_groups
  layer.wo_a.set_value(_t(module.o_a_proj.weight).reshape(g, V4.o_lora_rank, -1)
                       .transpose(0, 2, 1))
  layer.wo_b.set_value(_t(module.o_b_proj.weight).T)
  layer.attn_sink.set_value(_t(module.sinks))
  if module.compressor is not None:
    _copy_compressor(layer.compressor, module.compressor)
    indexer = getattr(module.compressor, "indexer", None)
    if indexer is not None:
      _copy_compressor(layer.indexer.compressor, indexer)
      layer.indexer.wq_b.set_value(_t(indexer.q_b_proj.weight).T.reshape(
          q, V4.index_n_heads, V4.index_head_dim))
      layer.indexer.weights_proj.set_value(_t(indexer.scorer.weights_proj.weight).T)
  return cfg, layer


def _attend(captured, layer, v4_cfg=V4, drop_entries=False):
  x, expected, module = captured[layer]
  kind = KINDS[LAYERS[layer]]
  cfg, ours = _dsjax_layer(kind, module, v4_cfg)
  if drop_entries:  # the sliding window alone, with the layer's own rope
    object.__setattr__(ours, "_entries", lambda *args: None)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  ctx = attention_kind(kind).context(cfg, TokenContext(None, positions))
  return np.asarray(ours.attend(_t(x), ctx, RunOptions())), expected.numpy()


@pytest.mark.parametrize("layer", range(3), ids=LAYERS)
def test_attention_matches_transformers(captured, layer):
  out, expected = _attend(captured, layer)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer, topk, drop", [(1, 100, False), (1, 3, True), (2, 3, True)],
                         ids=["csa_all_entries", "csa_no_entries", "hca_no_entries"])
def test_the_entries_and_the_selection_matter(captured, layer, topk, drop):
  """Attending to every entry, or to none, moves the output away from the reference's: the
  parity above depends on the compressed entries and on the indexer's choice."""
  out, expected = _attend(captured, layer, dataclasses.replace(V4, index_topk=topk), drop)
  assert np.abs(out - expected).max() > 1e-3


def test_csa_windows_pool_the_previous_window_with_the_current_one():
  rng = np.random.default_rng(0)
  kv = jnp.asarray(rng.normal(size=(1, 6, 4)), jnp.float32)  # 2 series of 2 dims, rate 2
  gate = jnp.asarray(rng.normal(size=(1, 6, 4)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  out = v4.compress_windows(kv, gate, bias, 2, overlap=True)
  g = gate + jnp.tile(bias, (3, 1))
  for w in range(3):
    slots_kv = [kv[0, 2 * w + j, 2:] for j in range(2)]
    slots_g = [g[0, 2 * w + j, 2:] for j in range(2)]
    if w > 0:
      slots_kv = [kv[0, 2 * (w - 1) + j, :2] for j in range(2)] + slots_kv
      slots_g = [g[0, 2 * (w - 1) + j, :2] for j in range(2)] + slots_g
    p = jnp.exp(jnp.stack(slots_g)) / jnp.exp(jnp.stack(slots_g)).sum(0)
    np.testing.assert_allclose(out[0, w], (p * jnp.stack(slots_kv)).sum(0), rtol=1e-6)


def test_entries_become_visible_when_their_window_is_complete():
  positions = jnp.arange(9)[None]
  visible = v4.visible_entries(positions, 2, 4)
  np.testing.assert_array_equal(visible[0].sum(-1), [0, 0, 0, 1, 1, 1, 1, 2, 2])


def test_sinks_absorb_weight_and_a_query_without_keys_gives_zero():
  q = jnp.ones((1, 2, 1, 2))
  kv = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
  visible = jnp.asarray([[[True, False], [False, False]]])
  out = v4.sink_attention(q, kv, visible, jnp.asarray([0.0]), 1.0)
  # Query 0: one key of logit 1 against the sink's 0.
  np.testing.assert_allclose(out[0, 0, 0], np.e / (np.e + 1) * np.asarray([1.0, 0.0]),
                             rtol=1e-6)
  np.testing.assert_array_equal(out[0, 1, 0], [0.0, 0.0])
