"""DeepSeek-V4-Flash (284B total, 13B activated): the hyper-parameters of DeepSeek-V4-Flash's
config.json as transformers 5.25 reads them (DeepseekV4Config's defaults) with the released
layer schedule: 2 sliding-window layers, then CSA at even and HCA at odd layers
(compress_ratios 0, 0, 4, 128, 4, 128, ...); the first 3 MoE layers hash-routed; mHC with 4
streams. dsjax counts 284.3B parameters without the MTP block (tests/test_param_counts.py),
which dsjax does not build yet (docs/v4.md).
Not yet compiled for a pod: the v4 attention kinds are dense over [T, T + W] logits (no kernel
yet), so the mesh and batch below are a starting point, not a fit shown by dsjax.compile."""

from dsjax.experiment import experiment_config

LAYERS = 43
RATIOS = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, LAYERS)]
KINDS = {0: "v4_sliding", 4: "v4_csa", 128: "v4_hca"}
HASH_LAYERS = 3


def get_config():
  model = dict(
      vocab_size=129280, hidden_size=4096, intermediate_size=2048, num_hidden_layers=LAYERS,
      num_attention_heads=64, attention="v4_sliding",
      layer_pattern=tuple(dict(attention=KINDS[r], ffn="hash_moe" if i < HASH_LAYERS else "moe")
                          for i, r in enumerate(RATIOS)),
      v4=dict(head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
              sliding_window=128, csa_rate=4, hca_rate=128,
              compress_rope=dict(theta=160000.0, type="yarn", factor=16.0,
                                 original_max_position_embeddings=65536, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                 interleave=True),
              index_n_heads=64, index_head_dim=128, index_topk=512),
      mhc=dict(hc_mult=4, sinkhorn_iters=20, eps=1e-6, init_scale=0.01),
      rope=dict(theta=10000.0, type="default"),
      moe=dict(n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=6,
               moe_intermediate_size=2048, n_group=1, topk_group=1, scoring_func="sqrtsoftplus",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5,
               first_k_dense_replace=0, swiglu_limit=10.0),
      num_mtp_layers=0, max_position_embeddings=1048576, rms_norm_eps=1e-6,
      bos_token_id=0, eos_token_id=1, dtype="bfloat16", param_dtype="float32",
      remat_policy="full")
  return experiment_config(
      model, seed=0,
      train=dict(steps=100_000, batch_per_shard=1, seq_len=4096, log_every=10,
                 checkpoint_every=1000, eval_every=1000, balance_alpha=1e-4,
                 router_bias_rate=1e-3, sample_tokens=0),
      optimizer=dict(lr=2.2e-4, warmup_steps=2000, schedule="deepseek_v3", decay_fraction=0.29,
                     min_lr_ratio=0.1, weight_decay=0.1, clip=1.0),
      data=dict(source="default", tokenizer="DeepSeek-V4-Flash"),
      mesh=dict(data=1, fsdp=-1, expert=8, tensor=1))
