"""NNX modules of the DeepSeek family.

Dimension legend (einsum strings use these letters):
  B batch, T query length, S key length, D model width (hidden_size), N attention heads,
  H head dim, C kv_lora_rank, Q q_lora_rank, R rotary head dim, E routed experts,
  K experts per token, F ffn width, V vocab, G kv groups / expert groups, L layers,
  M tokens flattened (B*T).

Logical axis names carried by every parameter (mapped to mesh axes by config rules only):
  vocab, embed, q_lora, kv_lora, heads, head_dim, mlp, experts, expert_mlp, layers.
"""

from dsjax.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
