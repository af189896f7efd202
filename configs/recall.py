"""Long-context evidence for NSA: the synthetic key-value recall task (dsjax.data.recall) over
rows of 4096 tokens, for two tiny dense models that differ only in attention. Training rows
hold episodes of 128..4096 tokens (log-uniform); held-out rows are full 4096-token episodes.

  python train.py --config=configs/recall.py:nsa --workdir=runs/recall_nsa
  python train.py --config=configs/recall.py:mla --workdir=runs/recall_mla

Both: 2 layers, hidden 64, 4 query heads, dense SwiGLU MLPs, no MTP, byte-sized vocabulary,
the same data, optimizer and step budget. `nsa` uses Native Sparse Attention (4 query heads
on 1 KV head; l=16, d=8, l'=32, n=6, w=64: a query sees at most 64 + 6*32 = 256 of its 4096
keys directly), `mla` full causal Multi-head Latent Attention. eval_accuracy in
metrics.jsonl is the fraction of keys recalled (16 facts and 16 queries per row; chance 1/8).

The budget here (3,000 steps of 8 rows) is sized for an accelerator: on the 2-core CPU a
4096-token row takes 3-4 s to train (MLA; 1,150-1,800 tokens/s) and the recall mechanism
(induction) forms slowly; see docs/nsa.md for the CPU probes.
"""

from dsjax.experiment import experiment_config

_NSA = dict(num_kv_heads=1, head_dim=16, v_head_dim=16, compress_block=16, compress_stride=8,
            compress_hidden=32, select_block=32, num_selected=6, window=64, select_impl="auto")


def get_config(attention: str = "nsa"):
  if attention not in ("nsa", "mla"):
    raise ValueError(f"configs/recall.py:{attention}: use configs/recall.py:nsa or :mla.")
  model = dict(
      vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
      num_attention_heads=4,
      mla=dict(q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16),
      rope=dict(theta=10000.0, type="default"), moe=None, num_mtp_layers=0,
      max_position_embeddings=4096, rms_norm_eps=1e-6, dtype="float32",
      param_dtype="float32", attention=attention, nsa=_NSA if attention == "nsa" else None)
  return experiment_config(
      model, seed=0,
      train=dict(steps=3000, batch_size=8, seq_len=4096, checkpoint_every=250, eval_every=250,
                 eval_batches=4, log_every=10),
      optimizer=dict(lr=3e-3, warmup_steps=100, schedule="deepseek_v3"),
      data=dict(source="recall:num_keys=16,num_values=8,filler=96,min_len=128",
                tokenizer="byte"),
      mesh=dict(data=-1, fsdp=1, expert=1, tensor=1))
