"""FP8 checkpoints: DeepSeek-V3's float8_e4m3fn weights with float32 `<name>_scale_inv` blocks
load to exactly the parameters of the torch-dequantised fp32 checkpoint."""

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import dsjax
from dsjax.checkpoint.safetensors_io import SafetensorsReader
from tests import hf_fixtures as hf

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int]):
  """(w_fp8 [out,in], scale_inv float32 [ceil(out/bo), ceil(in/bi)]) with scale = amax/448."""
  (out, inp), (bo, bi) = w.shape, block
  rows, cols = math.ceil(out / bo), math.ceil(inp / bi)
  padded = F.pad(w.float(), (0, cols * bi - inp, 0, rows * bo - out))
  amax = padded.view(rows, bo, cols, bi).abs().amax(dim=(1, 3))
  scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
  full = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out, :inp]
  return (w.float() / full).to(torch.float8_e4m3fn), scale.float()


def dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
  (out, inp), (bo, bi) = w_fp8.shape, block
  return w_fp8.float() * scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out, :inp]


def _quantized(name: str, tensor: torch.Tensor) -> bool:
  # Every 2-D Linear weight (routers and lm_head included); embeddings and norms stay fp32.
  return tensor.ndim == 2 and "embed_tokens" not in name


def write_fp8_pair(src, fp8_dir, deq_dir, block, write_block_size: bool,
                   keep: tuple[str, ...] = ()) -> int:
  """From the fp32 checkpoint `src`, writes the FP8 checkpoint and its torch-dequantised fp32
  twin; returns the number of quantised tensors. Names ending in `keep` stay float32."""
  tensors = {k: v for f in hf.checkpoint_files(src) for k, v in load_file(f).items()}
  fp8, deq = {}, {}
  for name, t in tensors.items():
    if _quantized(name, t) and not name.endswith(keep):
      w_fp8, scale = quantize_blockwise(t, block)
      fp8[name], fp8[name + "_scale_inv"] = w_fp8, scale
      deq[name] = dequantize(w_fp8, scale, block)
    else:
      fp8[name] = deq[name] = t
  config = json.loads((src / "config.json").read_text())
  for d, ts in ((fp8_dir, fp8), (deq_dir, deq)):
    d.mkdir()
    save_file(ts, d / "model.safetensors", metadata={"format": "pt"})
  (deq_dir / "config.json").write_text(json.dumps(config))
  quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
  if write_block_size:
    quant["weight_block_size"] = list(block)
  (fp8_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
  return sum(1 for n in fp8 if n.endswith("_scale_inv"))


# (block, whether config.json names it): DeepSeek's 128x128 with dims 136 and 200 (partial
# edge blocks), the loader's default when quantization_config has no weight_block_size, and
# 16x16 for many blocks, partial ones included (hidden 40, q_lora 24, ...).
BLOCKS = {"128_explicit": ((128, 128), True), "128_default": ((128, 128), False),
          "16x16": ((16, 16), True)}


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("fp32")
  config = hf.v3_config(hidden_size=40, intermediate_size=136, vocab_size=200)
  hf.build_torch_model(config, seed=3).save_pretrained(path)
  return path


@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_fp8_loads_as_dequantized_fp32(blocks, fp32_checkpoint, tmp_path):
  block, named = BLOCKS[blocks]
  fp8_dir, deq_dir = tmp_path / "fp8", tmp_path / "deq"
  n_quantized = write_fp8_pair(fp32_checkpoint, fp8_dir, deq_dir, block, named)
  assert n_quantized > 20
  with SafetensorsReader(fp8_dir) as reader:
    name = "model.layers.2.mlp.experts.7.down_proj.weight"
    assert reader.dtype(name) == ml_dtypes.float8_e4m3fn
    assert reader.shape(name + "_scale_inv") == tuple(-(-n // b) for n, b in zip(
        reader.shape(name), block))

  from_fp8 = hf.dsjax_params(dsjax.load_hf_checkpoint(fp8_dir))
  from_deq = hf.dsjax_params(dsjax.load_hf_checkpoint(deq_dir))
  from_src = hf.dsjax_params(dsjax.load_hf_checkpoint(fp32_checkpoint))
  assert from_fp8.keys() == from_deq.keys()
  for path in from_fp8:
    assert from_fp8[path].dtype == np.float32, path
    np.testing.assert_array_equal(from_fp8[path], from_deq[path], err_msg=str(path))
  # Quantisation really happened: the experts' weights moved off their fp32 values.
  experts = ("moe_layers", "blocks", "ffn", "w1")
  assert not np.array_equal(from_fp8[experts], from_src[experts])
  np.testing.assert_allclose(from_fp8[experts], from_src[experts], rtol=0.07, atol=1e-3)


def test_wrong_block_size_is_detected(fp32_checkpoint, tmp_path):
  """Scales written for 16x16 blocks but read as 128x128 (config without weight_block_size)
  must fail with the expected scale shape rather than load silently wrong weights."""
  fp8_dir, deq_dir = tmp_path / "fp8", tmp_path / "deq"
  write_fp8_pair(fp32_checkpoint, fp8_dir, deq_dir, (16, 16), write_block_size=False)
  with pytest.raises(ValueError, match="scale_inv shape"):
    dsjax.load_hf_checkpoint(fp8_dir)


def test_missing_scale_inv_is_a_clear_error(fp32_checkpoint, tmp_path):
  fp8_dir, deq_dir = tmp_path / "fp8", tmp_path / "deq"
  write_fp8_pair(fp32_checkpoint, fp8_dir, deq_dir, (128, 128), write_block_size=True)
  name = "model.layers.1.self_attn.kv_b_proj.weight"
  hf.rewrite_tensor(fp8_dir, name + "_scale_inv", None)
  with pytest.raises(ValueError, match=rf"{name} is stored as .*{name}_scale_inv nor"):
    dsjax.load_hf_checkpoint(fp8_dir)
