"""Moonlight-16B-A3B (moonshotai; 15.29B non-embedding / 2.24B activated non-embedding
parameters): a DeepSeek-V3 architecture (model_type deepseek_v3) with direct queries, 64
experts in one group, sigmoid noaux_tc routing, plain RoPE (theta 50000, 8K context), no MTP.
eos 163585 is the base model's [EOS]; the Instruct model's config.json uses 163586.

Trains on a TPU v5p-8 slice (`python -m dsjax.compile --config=configs/moonlight_16b.py
--topology=v5p:2x2x1`: 80.3 of 95.7 GiB per chip) with one 8192-token sequence per chip and
remat "full"; unchanged on v5p-16 (50.2 GiB per chip). docs/scale.md."""

from dsjax.experiment import experiment_config


def get_config():
  model = dict(
      vocab_size=163840, hidden_size=2048, intermediate_size=11264, num_hidden_layers=27,
      num_attention_heads=16,
      mla=dict(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128),
      rope=dict(theta=50000.0, type="default"),
      moe=dict(n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
               moe_intermediate_size=1408, n_group=1, topk_group=1, scoring_func="sigmoid",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.446,
               first_k_dense_replace=1),
      num_mtp_layers=0, max_position_embeddings=8192, rms_norm_eps=1e-5,
      bos_token_id=163584, eos_token_id=163585, dtype="bfloat16", param_dtype="float32",
      remat_policy="full")
  return experiment_config(
      model, seed=0,
      # One 8192-token sequence per batch shard: the global batch scales with the mesh.
      train=dict(steps=10_000, batch_per_shard=1, seq_len=8192, log_every=10,
                 checkpoint_every=500, eval_every=500),
      optimizer=dict(lr=4.2e-4, warmup_steps=2000, schedule="cosine", weight_decay=0.1, clip=1.0),
      # data.tokenizer: the HF checkpoint directory (or its tokenizer.json), downloaded separately.
      data=dict(source="default", tokenizer="Moonlight-16B-A3B"),
      mesh=dict(data=1, fsdp=-1, expert=1, tensor=1))
