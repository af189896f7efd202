"""DeepSeek-V3.2(-Exp): DeepSeek-V3 (configs/deepseek_v3_671b.py) with DeepSeek Sparse
Attention in every layer: a lightning indexer of 64 heads x 128 dims picks each query's 2048
tokens (the hyper-parameters of deepseek-ai/DeepSeek-V3.2-Exp's config.json).

Continued pre-training from DeepSeek-V3.1-Terminus, as the V3.2 report describes, in two
stages at 128K tokens per sequence (docs/dsa.md):
  * dense warm-up: dense attention, only the indexers train on their KL loss; lr 1e-3,
    1000 steps of 16 sequences (2.1B tokens):
      python train.py --config=configs/deepseek_v32_671b.py --config.train.init_from=<V3.1 dir>
        --config.train.dsa_stage=dense_warmup --config.train.steps=1000
        --config.train.batch_size=16 --config.optimizer.lr=1e-3
  * sparse training (this file's default): the selection on, every parameter trains (the
    indexers on their KL over the selected keys, the rest on the LM loss); lr 7.3e-6,
    15000 steps of 480 sequences (944B tokens), from the warm-up's checkpoint.
The batch of 480 needs a mesh whose batch split (data x fsdp x expert) divides it."""

from pathlib import Path

from dsjax.experiment import load_experiment


def get_config():
  # configs are not a package: DeepSeek-V3's file, loaded by path
  cfg = load_experiment(Path(__file__).with_name("deepseek_v3_671b.py"))
  cfg.model.attention = "dsa"
  cfg.model.dsa = dict(index_n_heads=64, index_head_dim=128, index_topk=2048, impl="gather",
                       index_precision="exact")
  cfg.train.seq_len = 131072
  cfg.train.batch_per_shard = 0
  cfg.train.batch_size = 480
  cfg.train.steps = 15000
  cfg.train.dsa_stage = "sparse"
  cfg.train.indexer_loss_weight = 1.0
  cfg.optimizer.lr = 7.3e-6
  cfg.optimizer.schedule = "constant"
  cfg.optimizer.warmup_steps = 0
  return cfg
