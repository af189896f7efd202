"""A CPU-fast DeepSeek-V4-style model: mHC's 4 residual streams; sliding-window, CSA and HCA
attention layers (one K = V head of 64 dims with sinks, a 32-token window, CSA entries every 4
tokens of which an 4-head indexer picks 8, HCA entries every 16 tokens); hash-routed then
routed MoE layers (8 experts, 2 per token, sqrt-softplus router, SwiGLU clamp 10) and one MTP
module; byte-level vocabulary. Trains with `python train.py --config=configs/deepseek_v4_tiny.py`
(decoding V4 attention is not built yet: docs/v4.md)."""

from dsjax.experiment import experiment_config

PATTERN = (("v4_sliding", "hash_moe"), ("v4_csa", "hash_moe"), ("v4_hca", "moe"),
           ("v4_csa", "moe"))


def get_config():
  model = dict(
      vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
      num_attention_heads=4, attention="v4_sliding",
      layer_pattern=tuple(dict(attention=a, ffn=f) for a, f in PATTERN),
      v4=dict(head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64,
              sliding_window=32, csa_rate=4, hca_rate=16,
              index_n_heads=4,
              index_head_dim=32, index_topk=8),
      mhc=dict(hc_mult=4, sinkhorn_iters=20, eps=1e-6, init_scale=0.01),
      rope=dict(theta=10000.0, type="default"),
      moe=dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
               moe_intermediate_size=64, n_group=1, topk_group=1, scoring_func="sqrtsoftplus",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5,
               first_k_dense_replace=0, swiglu_limit=10.0, impl="auto"),
      num_mtp_layers=1, max_position_embeddings=512, rms_norm_eps=1e-6,
      dtype="float32", param_dtype="float32")
  return experiment_config(
      model, seed=0,
      train=dict(steps=600, batch_size=8, seq_len=128, checkpoint_every=200, eval_every=200,
                 router_bias_rate=1e-2, sample_tokens=0),
      optimizer=dict(lr=3e-3, warmup_steps=20, schedule="deepseek_v3"),
      data=dict(source="default", tokenizer="byte"),
      mesh=dict(data=-1, fsdp=1, expert=1, tensor=1))
