"""A CPU-fast DSA model (DeepSeek-V3.2's sparse attention): the tiny DeepSeek-V3-style MoE
model of configs/tiny.py with a lightning indexer in every layer (4 heads of 32 dims) picking
32 of the up to 128 earlier tokens each query attends to. It trains from scratch in the
sparse stage (every parameter learns, the indexers on their KL loss, reported as indexer_kl
in metrics.jsonl); `--config.train.dsa_stage=dense_warmup` with `--config.train.init_from`
runs DeepSeek's first stage on a trained model (docs/dsa.md)."""

from pathlib import Path

from dsjax.experiment import load_experiment


def get_config():
  cfg = load_experiment(Path(__file__).with_name("tiny.py"))  # configs are not a package
  cfg.model.attention = "dsa"
  cfg.model.dsa = dict(index_n_heads=4, index_head_dim=32, index_topk=32, impl="gather",
                       index_precision="exact")
  cfg.train.dsa_stage = "sparse"
  return cfg
