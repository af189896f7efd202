"""DeepSeek-V2-Lite (15.7B total, 2.4B activated): deepseek-ai/DeepSeek-V2-Lite's config.json.
Direct queries (no q_lora), softmax greedy routing over 64 experts, YaRN x40.

Trains on a TPU v5p-8 slice (`python -m dsjax.compile --config=configs/deepseek_v2_lite.py
--topology=v5p:2x2x1`: 79.4 of 95.7 GiB per chip) with one 4096-token sequence per chip and
remat "full"; unchanged on bigger slices (v5p-128: 28.4 GiB per chip). docs/scale.md."""

from dsjax.experiment import experiment_config


def get_config():
  model = dict(
      vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
      num_attention_heads=16,
      mla=dict(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128),
      rope=dict(theta=10000.0, type="yarn", factor=40.0, original_max_position_embeddings=4096,
                beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
      moe=dict(n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
               moe_intermediate_size=1408, n_group=1, topk_group=1, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
               first_k_dense_replace=1),
      num_mtp_layers=0, max_position_embeddings=163840, rms_norm_eps=1e-6,
      bos_token_id=100000, eos_token_id=100001, dtype="bfloat16", param_dtype="float32",
      remat_policy="full")
  return experiment_config(
      model, seed=0,
      # One 4096-token sequence per batch shard: the global batch scales with the mesh.
      train=dict(steps=10_000, batch_per_shard=1, seq_len=4096, log_every=10,
                 checkpoint_every=500, eval_every=500),
      optimizer=dict(lr=4.2e-4, warmup_steps=2000, schedule="cosine", weight_decay=0.1, clip=1.0),
      # data.tokenizer: the HF checkpoint directory (or its tokenizer.json), downloaded separately.
      data=dict(source="default", tokenizer="DeepSeek-V2-Lite"),
      mesh=dict(data=1, fsdp=-1, expert=1, tensor=1))
