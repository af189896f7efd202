"""A CPU-fast DeepSeek-V3-style model: MLA with q_lora, 1 dense + 3 MoE layers (8 routed experts,
2 per token, sigmoid + noaux_tc group routing, 1 shared expert) and one MTP module; byte-level
vocabulary. Trains in minutes on a 2-core CPU."""

from dsjax.experiment import experiment_config


def get_config():
  model = dict(
      vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
      num_attention_heads=4,
      mla=dict(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
               v_head_dim=32),
      rope=dict(theta=10000.0, type="default"),
      moe=dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
               moe_intermediate_size=64, n_group=2, topk_group=1, scoring_func="sigmoid",
               topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
               first_k_dense_replace=1, impl="auto"),
      num_mtp_layers=1, max_position_embeddings=512, rms_norm_eps=1e-6,
      dtype="float32", param_dtype="float32")
  return experiment_config(
      model, seed=0,
      # Aux-loss-free balancing with a faster gamma than DeepSeek-V3's 1e-3: this run is short.
      train=dict(steps=600, batch_size=8, seq_len=128, checkpoint_every=200, eval_every=200,
                 router_bias_rate=1e-2),
      optimizer=dict(lr=3e-3, warmup_steps=20, schedule="deepseek_v3"),
      data=dict(source="default", tokenizer="byte"),
      mesh=dict(data=-1, fsdp=1, expert=1, tensor=1))
