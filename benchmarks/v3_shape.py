"""The DeepseekV3-layout model the forward and decode benchmarks share, sized by their
--hidden --layers --experts --topk --vocab flags: hidden/64 heads, q_lora hidden/2, kv_lora
hidden/4, qk_nope 64, qk_rope 32, v 64, one dense layer (MLP 4 x hidden) then MoE layers of
experts of width hidden/2 (+1 shared), sigmoid + noaux_tc routing over 4 groups keeping 2."""


def v3_config(args, **fields):
  """transformers' DeepseekV3Config of that shape; `fields` add to or override it."""
  from transformers import DeepseekV3Config
  heads = args.hidden // 64
  config = dict(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
      moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers,
      num_attention_heads=heads, num_key_value_heads=heads, n_shared_experts=1,
      n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_group=4, topk_group=2,
      first_k_dense_replace=1, q_lora_rank=args.hidden // 2, kv_lora_rank=args.hidden // 4,
      qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)
  return DeepseekV3Config(**(config | fields))
