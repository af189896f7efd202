"""DeepSeek-V3.2 (DSA): fp32 parity with transformers' eager DeepseekV32 on random checkpoints:
logits and routed experts, on sequences longer than index_topk (the indexer's selection
matters: the same weights with a top-k that keeps every key give other logits) and of at most
index_topk tokens (dense MLA). 16 indexer heads keep exact ties at the k-th score (a key scores
exactly 0 when every head's ReLU is 0) improbable, so that top-k has one answer."""

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

import dsjax
from dsjax.checkpoint.hf_config import from_hf, to_hf
from tests import hf_fixtures as hf

TOPK = 12


def v32_config(**overrides) -> DeepseekV32Config:
  kw = dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_parameters=hf.yarn(1.0, 1.0), index_n_heads=16, index_head_dim=16,
            index_topk=TOPK)
  kw.update(overrides)
  return DeepseekV32Config(**hf._common(**kw))


def _torch_model(config, seed=0):
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  return hf.randomize_torch(DeepseekV32ForCausalLM(config).to(torch.float32), seed).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  config = v32_config()
  model = _torch_model(config)
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
