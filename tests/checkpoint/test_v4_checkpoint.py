"""DeepSeek-V4 end to end against transformers' DeepseekV4ForCausalLM in fp32: a random tiny
model with all three attention kinds, hash-routed and routed MoE layers and mHC streams,
written by transformers' save_pretrained and read by dsjax.load_hf_checkpoint, gives the same
logits; dsjax.save_hf_checkpoint writes it back in DeepSeek's names and transformers loads it
to the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsjax
from dsjax.checkpoint.hf_config import from_hf
from tests.hf_fixtures import tiny_v4_config

LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
          "compressed_sparse_attention"]
MLP = ["hash_moe", "hash_moe", "moe", "moe"]
T = 23  # not a multiple of the rates; longer than the window plus two HCA windows


def _reference():
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref
  config = tiny_v4_config(LAYERS, MLP, n_routed_experts=6, num_experts_per_tok=2,
                          moe_intermediate_size=8, swiglu_limit=1.0, routed_scaling_factor=1.5,
                          hc_mult=3)
  torch.manual_seed(0)
  model = ref.DeepseekV4ForCausalLM(config).eval()
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.3 if p.ndim > 1 else 0.5
      p.copy_(torch.randn(p.shape) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    for name, buf in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        buf.copy_(torch.randn(buf.shape) * 0.1)
      elif name.endswith("tid2eid"):  # K distinct experts per token
        buf.copy_(torch.from_numpy(np.stack([rng.permutation(6)[:2] for _ in range(64)])))
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = _reference()
  path = tmp_path_factory.mktemp("v4")
  model.save_pretrained(path)
  ids = np.random.default_rng(1).integers(0, 64, (2, T))
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
  return path, ids, logits


def test_config_reads_every_layer_kind(saved):
  cfg = from_hf(json.loads((saved[0] / "config.json").read_text()))
  assert [(s.attention, s.ffn) for s in cfg.layer_specs] == [
      ("v4_sliding", "hash_moe"), ("v4_csa", "hash_moe"), ("v4_hca", "moe"), ("v4_csa", "moe")]
  assert cfg.mhc.hc_mult == 3 and cfg.moe.swiglu_limit == 1.0
  assert cfg.v4.sliding_window == 5 and (cfg.v4.csa_rate, cfg.v4.hca_rate) == (2, 4)


def test_logits_match_transformers(saved):
  path, ids, expected = saved
  model = dsjax.load_hf_checkpoint(path, dtype=jnp.float32)
  logits = model(jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_save_round_trip_loads_in_transformers(saved, tmp_path):
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref
  path, ids, expected = saved
  dsjax.save_hf_checkpoint(dsjax.load_hf_checkpoint(path, dtype=jnp.float32), tmp_path)
  reloaded = ref.DeepseekV4ForCausalLM.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    logits = reloaded(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_fp8_and_fp4_checkpoint_loads_as_its_dequantised_form(saved, tmp_path):
  """DeepSeek's release format: attention projections in FP8 e4m3 with e8m0 scales per
  128x128 block (`.scale`), routed experts in packed FP4 with e8m0 scales per 1x32 block."""
  from dsjax.checkpoint import quant_formats as q
  from dsjax.checkpoint.safetensors_io import SafetensorsReader, write_sharded
  from dsjax.checkpoint import hf_checkpoint
  from dsjax.checkpoint.hf_names import checkpoint_entries
  from flax import nnx
  plain = tmp_path / "plain"
  dsjax.save_hf_checkpoint(dsjax.load_hf_checkpoint(saved[0], dtype=jnp.float32), plain)
  quantised, expected = tmp_path / "quantised", {}
  tensors = {}
  with SafetensorsReader(plain) as reader:
    for name in reader.keys():
      w = reader.get(name)
      if ".experts." in name:
        packed, scale = q.quantize_fp4_blockwise(w)
        tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = packed, scale
        expected[name] = q.dequantize_fp4_blockwise(packed, scale)
      elif ".attn.w" in name and name.endswith(".weight"):
        weight, scale = q.quantize_fp8_e8m0_blockwise(w)
        tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = weight, scale
        expected[name] = q.dequantize_fp8_e8m0_blockwise(weight, scale)
      else:
        tensors[name] = w
  assert any(".experts." in n for n in expected) and any(".attn.wq_a" in n for n in expected)
  write_sharded(quantised, tensors)
  (quantised / "config.json").write_text((plain / "config.json").read_text())
  model = dsjax.load_hf_checkpoint(quantised, dtype=jnp.float32)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  checked = 0
  for entry in checkpoint_entries(model.config, set(flat)):
    if entry.hf_name in expected:  # every quantised tensor, in dsjax's layout
      got = np.asarray(flat[entry.path].get_value())[entry.index]
      np.testing.assert_array_equal(got, hf_checkpoint._to_dsjax(expected[entry.hf_name],
                                                                 entry, got.shape))
      checked += 1
  assert checked == len(expected)
