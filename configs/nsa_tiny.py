"""A CPU-fast NSA model: the tiny DeepSeek-V3-style MoE model of configs/tiny.py with Native
Sparse Attention (GQA, 4 query heads on 1 KV head) in place of MLA. Block sizes are scaled
down from the paper's (l=32, d=16, l'=64, n=16, w=512) so that all three branches matter at
seq_len 512: l=16, d=8, l'=32, n=4, w=64."""

from pathlib import Path

from dsjax.experiment import load_experiment


def get_config():
  cfg = load_experiment(Path(__file__).with_name("tiny.py"))  # configs are not a package
  cfg.model.attention = "nsa"
  cfg.model.nsa = dict(num_kv_heads=1, head_dim=32, v_head_dim=32, compress_block=16,
                       compress_stride=8, compress_hidden=64, select_block=32, num_selected=4,
                       window=64, select_impl="auto", query_chunk=0)
  cfg.model.max_position_embeddings = 1024
  cfg.train.seq_len = 512
  cfg.train.batch_size = 2
  return cfg
