"""The MFU estimate's attention FLOPs: causal MLA sees T/2 keys per query on average; NSA its
visible compressed blocks, selected tokens and window, counted by hand here."""

import dataclasses

import pytest
from flax import nnx

from dsjax.config import ModelConfig, NSAConfig
from dsjax.model import Transformer
from dsjax.train.flops import active_matmul_params, train_flops_per_token

_MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, moe=None, num_mtp_layers=0,
              mla=dict(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=8))


def _attention_flops(cfg: ModelConfig, seq_len: int) -> float:
  params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  return train_flops_per_token(params, cfg, seq_len) - 6 * active_matmul_params(params, cfg)


def test_mla_counts_half_the_sequence_per_query():
  cfg = ModelConfig.from_dict(_MODEL)
  assert _attention_flops(cfg, 100) == pytest.approx(3 * 2 * 2 * 4 * 50 * (8 + 4 + 8))


def test_nsa_counts_compressed_selected_and_window_keys():
  nsa = NSAConfig(num_kv_heads=1, head_dim=8, v_head_dim=8, compress_block=4,
                  compress_stride=2, select_block=4, num_selected=3, window=3)
  cfg = ModelConfig.from_dict({**_MODEL, "attention": "nsa", "nsa": dataclasses.asdict(nsa)})
  t = 10
  keys = 0
  for pos in range(t):
    compressed = sum(1 for i in range(t) if i * 2 + 4 - 1 <= pos)
    keys += compressed + min(pos + 1, 3 * 4) + min(pos + 1, 3)
  assert _attention_flops(cfg, t) == pytest.approx(3 * 2 * 2 * 4 * (keys / t) * (8 + 8))
