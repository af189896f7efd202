"""DeepSeek-V3.2 (DSA): fp32 parity with transformers' eager DeepseekV32 on random checkpoints:
logits, selected index sets and routed experts, on sequences longer than index_topk (the
indexer's selection matters: the same weights with a top-k that keeps every key give other
logits) and of at most index_topk tokens (dense MLA); save_hf_checkpoint's files load back in
transformers with the same tensors and logits; an FP8 V3.2 checkpoint (weights_proj kept
float32) loads as its dequantised twin."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

import jax.numpy as jnp

import dsjax
from dsjax.checkpoint.hf_config import from_hf, to_hf
from dsjax.ops import dsa as dsa_ops
from tests import hf_fixtures as hf
from tests.checkpoint.test_fp8 import write_fp8_pair

TOPK = hf.V32_TOPK


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  config = hf.v32_config()
  model = hf.build_torch_model(config)
  path = tmp_path_factory.mktemp("v32")
  model.save_pretrained(path)
  return config, model, path


def test_config_round_trips(checkpoint):
  config, _, path = checkpoint
  cfg = dsjax.load_hf_checkpoint(path).config
  assert cfg.attention == "dsa" and cfg.dsa.index_topk == TOPK
  assert (cfg.dsa.index_n_heads, cfg.dsa.index_head_dim) == (16, 16)
  assert from_hf(to_hf(cfg)) == cfg


@pytest.mark.parametrize("seq_len", [hf.SEQ_LEN, TOPK])
def test_logits_and_routing_match_transformers(checkpoint, seq_len):
  config, torch_model, path = checkpoint
  ids = hf.random_ids(config.vocab_size, batch=2, seq_len=seq_len)
  model = dsjax.load_hf_checkpoint(path)
  ref_logits, ref_experts, _ = hf.torch_forward(torch_model, ids)
  logits, experts = hf.dsjax_forward(model, ids)
  diff = float(np.abs(logits - ref_logits).max())
  print(f"T={seq_len}: max |logits diff| = {diff:.2e} (max |logit| {np.abs(ref_logits).max():.2f})")
  assert diff <= 1e-4
  hf.assert_same_expert_sets(experts, ref_experts)
  if seq_len > TOPK:  # keeping every key (dense MLA) is measurably different
    dense_cfg = model.config.replace(dsa=dataclasses.replace(model.config.dsa, index_topk=1024))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: dsjax.Transformer(dense_cfg,
                                                                       rngs=nnx.Rngs(0))))
    dense_logits, _ = hf.dsjax_forward(nnx.merge(graphdef, nnx.state(model)), ids)
    assert float(np.abs(dense_logits - ref_logits).max()) > 1e-2


def _torch_selection(torch_model, ids) -> list[np.ndarray]:
  """Each layer's selected indices int[B,T,k] in transformers (its indexers' outputs)."""
  picked = []
  hooks = [layer.self_attn.indexer.register_forward_hook(
      lambda _m, _i, out: picked.append(out.numpy())) for layer in torch_model.model.layers]
  try:
    hf.torch_forward(torch_model, ids)
  finally:
    for hook in hooks:
      hook.remove()
  return picked


def _dsjax_selection(model, ids, monkeypatch) -> list[tuple[np.ndarray, np.ndarray]]:
  """Each layer's (indices, valid) [B,T,k] in dsjax: an eager, unrolled forward recording
  dsa.top_k."""
  picked, top_k = [], dsa_ops.top_k

  def recording_top_k(scores, visible, k):
    out = top_k(scores, visible, k)
    picked.append(tuple(map(np.asarray, out)))
    return out

  monkeypatch.setattr(dsa_ops, "top_k", recording_top_k)
  model.forward(jnp.asarray(ids), scan=False)
  return picked


def test_selected_index_sets_match_transformers(checkpoint, monkeypatch):
  """Every layer selects the same key sets as transformers for every query that sees more
  than index_topk keys (16 indexer heads: no ties at the k-th score)."""
  config, torch_model, path = checkpoint
  ids = hf.random_ids(config.vocab_size, batch=2, seq_len=hf.SEQ_LEN)
  ref = _torch_selection(torch_model, ids)
  got = _dsjax_selection(dsjax.load_hf_checkpoint(path), ids, monkeypatch)
  assert len(got) == len(ref) == config.num_hidden_layers
  for layer, ((indices, valid), expected) in enumerate(zip(got, ref)):
    for b, t in np.ndindex(ids.shape[0], ids.shape[1] - TOPK):
      t += TOPK
      assert valid[b, t].all()
      assert set(indices[b, t].tolist()) == set(expected[b, t].tolist()), (layer, b, t)


def test_save_hf_checkpoint_loads_back_in_transformers(checkpoint, tmp_path):
  config, torch_model, path = checkpoint
  model = dsjax.load_hf_checkpoint(path)
  dsjax.save_hf_checkpoint(model, tmp_path / "dsjax", max_shard_bytes=64 * 1024)
  saved = json.loads((tmp_path / "dsjax" / "config.json").read_text())
  assert saved["model_type"] == "deepseek_v32" and saved["index_topk"] == TOPK
  reloaded = hf.load_torch_model(tmp_path / "dsjax")
  ours = {k: v.detach() for k, v in reloaded.state_dict().items()}
  ref = {k: v.detach() for k, v in torch_model.state_dict().items()}
  assert ours.keys() == ref.keys()
  assert any(".indexer." in name for name in ref)
  for name in ref:
    torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)
  ids = hf.random_ids(config.vocab_size)
  ref_logits, ref_experts, _ = hf.torch_forward(torch_model, ids)
  logits, experts, _ = hf.torch_forward(reloaded, ids)
  assert float(np.abs(logits - ref_logits).max()) <= 1e-5
  hf.assert_same_expert_sets(experts, ref_experts)


def test_fp8_checkpoint_loads_as_its_dequantised_twin(checkpoint, tmp_path):
  """DeepSeek's FP8 V3.2 files: block-quantised e4m3 weights with float32 scale_inv, the
  indexer's weights_proj (like the router) stored float32, not quantised."""
  _, _, path = checkpoint
  quantised = write_fp8_pair(path, tmp_path / "fp8", tmp_path / "deq", (16, 16), True,
                             keep=("indexer.weights_proj.weight", "mlp.gate.weight"))
  stored = load_file(tmp_path / "fp8" / "model.safetensors")
  assert quantised > 0 and "model.layers.1.self_attn.indexer.wq_b.weight_scale_inv" in stored
  proj = [n for n in stored if n.endswith("weights_proj.weight")]
  assert proj and all(stored[n].dtype == torch.float32 for n in proj)
  fp8 = hf.dsjax_params(dsjax.load_hf_checkpoint(tmp_path / "fp8"))
  deq = hf.dsjax_params(dsjax.load_hf_checkpoint(tmp_path / "deq"))
  assert fp8.keys() == deq.keys()
  for name, value in deq.items():
    np.testing.assert_array_equal(fp8[name], value, err_msg=str(name))
