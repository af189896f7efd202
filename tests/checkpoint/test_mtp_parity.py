"""MTP parity: a random dsjax V3 model with one MTP module, saved with save_hf_checkpoint, gives
the same main logits, expert sets and depth-1 MTP logits in transformers' DeepseekV3ForCausalLM
+ MtpModel (which pairs the main model's final *normalised* hidden state at position i with the
embedding of token i+1)."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.modeling_layers import MtpModel

import dsjax
from tests import hf_fixtures as hf

NUM_LAYERS = 3  # main model: 1 dense + 2 MoE layers; the MTP module is checkpoint layer 3


def _random_mtp_checkpoint(path, seed: int = 0) -> None:
  """A random V3 checkpoint with one MTP module (layer L = num_hidden_layers), in DeepSeek's
  layout: a randomised transformers model with L+1 layers whose last layer becomes the MTP
  block, plus random enorm/hnorm/eh_proj/shared_head.norm. (Built in torch because an eager
  dsjax.Transformer init compiles one random-normal kernel per shape: tens of seconds on CPU.)"""
  config = hf.v3_config(num_hidden_layers=NUM_LAYERS + 1)
  hf.build_torch_model(config, seed=seed).save_pretrained(path)
  d, gen = config.hidden_size, torch.Generator().manual_seed(seed + 1)
  prefix = f"model.layers.{NUM_LAYERS}."
  tensors = {prefix + "enorm.weight": torch.rand(d, generator=gen) + 0.5,
             prefix + "hnorm.weight": torch.rand(d, generator=gen) + 0.5,
             prefix + "shared_head.norm.weight": torch.rand(d, generator=gen) + 0.5,
             prefix + "eh_proj.weight": torch.randn(d, 2 * d, generator=gen) * 0.2}
  (file,) = hf.checkpoint_files(path)
  save_file({**load_file(file), **tensors}, file, metadata={"format": "pt"})
  config_file = Path(path) / "config.json"
  hf_config = json.loads(config_file.read_text())
  hf_config.update(num_hidden_layers=NUM_LAYERS, num_nextn_predict_layers=1)
  config_file.write_text(json.dumps(hf_config))


def _random_mtp_model(tmp_path, seed: int = 0) -> dsjax.Transformer:
  _random_mtp_checkpoint(tmp_path / "source", seed)
  model = dsjax.load_hf_checkpoint(tmp_path / "source")
  assert model.config.num_mtp_layers == 1 and model.config.num_hidden_layers == NUM_LAYERS
  return model


def _load_torch_mtp(path, num_hidden_layers: int):
  main = hf.load_torch_model(path)
  # MtpModel picks the checkpoint's MTP tensors with a regex built from this list, which
  # transformers hard-codes to DeepSeek-V3's layer 61.
  main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{num_hidden_layers}.*"]
  return main, MtpModel.from_pretrained(main).eval()


def test_mtp_logits_match_transformers(tmp_path):
  model = _random_mtp_model(tmp_path, seed=0)
  cfg = model.config
  dsjax.save_hf_checkpoint(model, tmp_path / "saved")
  main, mtp = _load_torch_mtp(tmp_path / "saved", cfg.num_hidden_layers)

  ids = hf.random_ids(cfg.vocab_size, batch=2, seq_len=hf.SEQ_LEN)
  b, t = ids.shape
  assert t > cfg.rope.original_max_position_embeddings
  logits, experts, mtp_logits = hf.dsjax_forward_with_mtp(model, ids)

  ref_logits, ref_experts, _ = hf.torch_forward(main, ids)
  main_diff = float(np.abs(logits - ref_logits).max())
  hf.assert_same_expert_sets(experts, ref_experts)

  tokens = torch.as_tensor(ids)
  with torch.no_grad():
    hidden = main.model(tokens).last_hidden_state  # post final norm
    # Depth 1 over the whole sequence: hidden state i with token i+1, at position i+1.
    positions = torch.arange(1, t)[None].expand(b, -1)
    h1 = mtp.forward_layer(0, last_hidden_states=hidden[:, :-1], position_ids=positions,
                           mtp_cache=None, input_ids=tokens[:, 1:])
    ref_mtp = mtp._project_to_logits(h1).numpy()

  assert len(mtp_logits) == 1 and mtp_logits[0].shape == (b, t - 1, cfg.vocab_size)
  mtp_diff = float(np.abs(mtp_logits[0] - ref_mtp).max())
  print(f"mtp: main max |diff| = {main_diff:.2e}, depth-1 max |diff| = {mtp_diff:.2e} "
        f"(max |logit| {np.abs(ref_mtp).max():.2f})")
  assert main_diff <= 1e-4
  assert mtp_diff <= 1e-4


def test_mtp_weights_load_into_transformers(tmp_path):
  """Every MTP tensor that dsjax writes lands in MtpModel (none left at its initial value)."""
  model = _random_mtp_model(tmp_path, seed=1)
  dsjax.save_hf_checkpoint(model, tmp_path / "saved")
  _, mtp = _load_torch_mtp(tmp_path / "saved", model.config.num_hidden_layers)
  layer = mtp.layers[0]
  ours = model.mtp[0]
  np.testing.assert_array_equal(layer.enorm.weight.detach().numpy(), np.asarray(ours.enorm.weight[...]))
  np.testing.assert_array_equal(layer.hnorm.weight.detach().numpy(), np.asarray(ours.hnorm.weight[...]))
  np.testing.assert_array_equal(layer.post_norm.weight.detach().numpy(),
                                np.asarray(ours.norm.weight[...]))
  np.testing.assert_array_equal(layer.eh_proj.weight.detach().numpy().T, np.asarray(ours.eh_proj[...]))
  np.testing.assert_array_equal(layer.mtp_block.mlp.gate.e_score_correction_bias.numpy(),
                                np.asarray(ours.block.ffn.router_bias[...]))
