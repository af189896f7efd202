"""DeepSeek-V4's hash-routed MoE layer (feed-forward kind "hash_moe"; V4 uses it for its first
num_hash_layers MoE layers).

Each token's K experts come from a frozen table of its id, tid2eid [V,K], instead of the biased
top-k of the router scores; the gate still weights the chosen experts (their scores,
renormalised and scaled: dsjax.ops.routing.hash_route). Everything else is DeepSeekMoE's
(dsjax.model.moe): the shared experts, the dispatches, the routing output for balancing.

The table is a FrozenTable (dsjax.model.param), not a parameter: training never changes it, and
checkpoints store and restore it with the model. A fresh model spreads the tokens evenly over
the experts (`spread_table`); real tables come from checkpoints. Hash layers have no router
bias, so the aux-loss-free bias update leaves them alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.kinds import TokenContext, register_ffn
from dsjax.model.moe import MoE
from dsjax.model.param import AXES, FrozenTable
from dsjax.ops.routing import Routing, hash_route


def spread_table(vocab_size: int, k: int, num_experts: int) -> np.ndarray:
  """int32[V,K]: token t's experts (t*K + j) % E for j < K: K distinct experts per token
  (K <= E) and every expert used by about V*K/E tokens."""
  tokens, slots = np.arange(vocab_size)[:, None], np.arange(k)[None, :]
  return ((tokens * k + slots) % num_experts).astype(np.int32)


@register_ffn("hash_moe")
class HashMoE(MoE):
  """MoE whose experts are tid2eid[token id]; x [B,T,D] of tokens.ids [B,T] -> ([B,T,D],
  Routing over the B*T tokens)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.moe is None:
      raise ValueError("layer_pattern has 'hash_moe' layers but moe=None; add a moe config or "
                       "use 'dense'.")
    super().__init__(cfg, rngs=rngs)

  def _init_selection(self, cfg: ModelConfig) -> None:
    """The token -> experts table tid2eid [V,K] (no router bias)."""
    moe = cfg.moe
    table = spread_table(cfg.vocab_size, moe.num_experts_per_tok, moe.n_routed_experts)
    self.tid2eid = FrozenTable(jnp.asarray(table), **{AXES: ("vocab", None)})

  def route(self, x: jax.Array, tokens: TokenContext | None = None) -> Routing:
    """Routing of x [M,D], the M = B*T tokens of tokens.ids [B,T]."""
    if tokens is None or tokens.ids is None:
      raise ValueError("A 'hash_moe' layer chooses experts by token id, and this pass gives it "
                       "none (tokens.ids=None); call it through feed_forward with the token "
                       "context, or use ffn='moe' where no ids exist.")
    ids = tokens.ids.reshape(-1)
    if ids.shape[0] != x.shape[0]:
      raise ValueError(f"tokens.ids has {ids.shape[0]} tokens for {x.shape[0]} rows of x; "
                       "pass the ids [B,T] of the hidden states x [B,T,D].")
    return hash_route(self.router_logits(x), self.tid2eid[...][ids], self.moe)
