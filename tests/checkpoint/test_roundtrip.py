"""transformers -> save_pretrained -> dsjax.load_hf_checkpoint -> dsjax.save_hf_checkpoint ->
transformers from_pretrained reproduces the original model: same tensors, same logits."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

import dsjax
from dsjax.checkpoint.hf_names import FLOAT32_IN_FILE
from tests import hf_fixtures as hf

CASES = {
    "v3": lambda: hf.v3_config(),
    "v2": lambda: hf.v2_config(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                               q_lora_rank=None),
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  return {k: v.detach().float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_dsjax_transformers_round_trip(case, tmp_path):
  original = hf.build_torch_model(CASES[case](), seed=2)
  original.save_pretrained(tmp_path / "hf")
  model = dsjax.load_hf_checkpoint(tmp_path / "hf")
  # A small shard size forces several files plus model.safetensors.index.json.
  dsjax.save_hf_checkpoint(model, tmp_path / "dsjax", max_shard_bytes=64 * 1024)
  assert len(hf.checkpoint_files(tmp_path / "dsjax")) > 1
  resharded = hf.dsjax_params(dsjax.load_hf_checkpoint(tmp_path / "dsjax"))  # sharded + index
  for path, value in hf.dsjax_params(model).items():
    np.testing.assert_array_equal(resharded[path], value, err_msg=str(path))
  assert json.loads((tmp_path / "dsjax" / "config.json").read_text())["model_type"] == \
      original.config.model_type

  reloaded = hf.load_torch_model(tmp_path / "dsjax")
  ours, ref = _state(reloaded), _state(original)
  assert ours.keys() == ref.keys()
  for name in ref:
    torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)

  ids = hf.random_ids(original.config.vocab_size)
  ref_logits, ref_experts, _ = hf.torch_forward(original, ids)
  logits, experts, _ = hf.torch_forward(reloaded, ids)
  diff = float(np.abs(logits - ref_logits).max())
  print(f"round trip {case}: max |logits diff| = {diff:.2e}")
  assert diff <= 1e-5
  hf.assert_same_expert_sets(experts, ref_experts)


def test_bfloat16_save_loads_in_transformers(tmp_path):
  original = hf.build_torch_model(CASES["v3"](), seed=4)
  original.save_pretrained(tmp_path / "hf")
  model = dsjax.load_hf_checkpoint(tmp_path / "hf")
  dsjax.save_hf_checkpoint(model, tmp_path / "bf16", dtype="bfloat16")
  hf_config = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert hf_config["dtype"] == "bfloat16"

  stored = {}
  for shard in (tmp_path / "bf16").glob("*.safetensors"):
    stored |= safetensors.torch.load_file(shard)
  ref = original.state_dict()
  # The router (weight and correction bias) stays float32 in the file, exactly.
  router = {name for name in stored if name.endswith(FLOAT32_IN_FILE)}
  assert router and {stored[n].dtype for n in stored if n not in router} == {torch.bfloat16}
  for name in router:
    torch.testing.assert_close(stored[name], ref[name], rtol=0, atol=0, msg=name)
  reloaded = hf.load_torch_model(tmp_path / "bf16", dtype=torch.bfloat16)
  state = reloaded.state_dict()
  for name, tensor in ref.items():
    # transformers >= 5.24 holds the router in float32, earlier ones in bf16.
    dtype = state[name].dtype if name.endswith(FLOAT32_IN_FILE) else torch.bfloat16
    torch.testing.assert_close(state[name], tensor.to(dtype), rtol=0, atol=0, msg=name)

  # Exactly the logits of transformers loading the original fp32 checkpoint as bf16 ...
  ids = hf.random_ids(original.config.vocab_size)
  logits, _, _ = hf.torch_forward(reloaded, ids)
  cast = hf.load_torch_model(tmp_path / "hf", dtype=torch.bfloat16)
  cast_logits, _, _ = hf.torch_forward(cast, ids)
  np.testing.assert_array_equal(logits, cast_logits)
  # ... and, in bf16 terms, those of the fp32 model (bf16 weights and activations).
  ref_logits, _, _ = hf.torch_forward(original, ids)
  err = np.abs(logits - ref_logits)
  scale = np.abs(ref_logits).max()
  print(f"bf16: max |diff| = {err.max():.3f}, mean {err.mean():.4f}, max |logit| {scale:.2f}")
  assert err.mean() <= 0.02 * scale and err.max() <= 0.15 * scale
