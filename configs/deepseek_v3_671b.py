"""DeepSeek-V3 (671B total, 37B activated; +14B MTP module): the hyper-parameters of
deepseek-ai/DeepSeek-V3's config.json. Pre-training recipe values from the V3 report
(lr 2.2e-4, 2K warmup steps, weight decay 0.1, clip 1.0, 4K sequences, MTP lambda 0.3,
balance alpha 1e-4, bias update gamma 1e-3).

Pod: trains on a TPU v5p-1024 slice (`python -m dsjax.compile
--config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8`: 73.0 of 95.7 GiB per chip) with
one 4096-token sequence per chip, MTP on, remat "full", the experts split 8 ways (expert
parallelism, dropless) and everything else FSDP-sharded over the other 64. The smallest
slices that fit: v5p-512 (`--topology=v5p:8x8x4`, 94.2 of 95.7 GiB) and tpu7x:4x4x8 (106.5 of
188.2 GiB); no v6e slice (35 GiB of state per chip). docs/scale.md."""

from dsjax.experiment import experiment_config


def get_config():
  model = dict(
      vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
      num_attention_heads=128,
      mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128),
      rope=dict(theta=10000.0, type="yarn", factor=40.0, original_max_position_embeddings=4096,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
      moe=dict(n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
               moe_intermediate_size=2048, n_group=8, topk_group=4, scoring_func="sigmoid",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
               first_k_dense_replace=3),
      num_mtp_layers=1, max_position_embeddings=163840, rms_norm_eps=1e-6,
      # bf16 compute over fp32 master weights (the optimizer updates fp32 params).
      bos_token_id=0, eos_token_id=1, dtype="bfloat16", param_dtype="float32",
      remat_policy="full")
  return experiment_config(
      model, seed=0,
      # One 4096-token sequence per batch shard: the global batch scales with the mesh.
      train=dict(steps=100_000, batch_per_shard=1, seq_len=4096, log_every=10,
                 checkpoint_every=1000, eval_every=1000, mtp_weight=0.3, balance_alpha=1e-4,
                 router_bias_rate=1e-3),
      # Warm-up, constant lr for 10T of the 14.8T tokens, cosine decay to 2.2e-5 over 4.3T.
      optimizer=dict(lr=2.2e-4, warmup_steps=2000, schedule="deepseek_v3", decay_fraction=0.29,
                     min_lr_ratio=0.1, weight_decay=0.1, clip=1.0),
      # data.tokenizer: the HF checkpoint directory (or its tokenizer.json), downloaded separately.
      data=dict(source="default", tokenizer="DeepSeek-V3"),
      # Experts split 8 ways (all-to-all within each group of 8 chips), FSDP over the rest.
      mesh=dict(data=1, fsdp=-1, expert=8, tensor=1))
