"""Run-time implementation choices, one static (hashable) object passed to every layer.

They pick how a layer computes, never what: every choice gives the same numbers (up to
rounding). None means "the model config's own setting" (moe.impl, nsa.select_impl, ...).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """Attributes:
    moe_impl: MoE dispatch ("dense", "blocked", "ragged", "pallas", "ep", "auto"), None for
      moe.impl.
    attn_impl: MLA decoding, "absorb" (latent space) or "naive" (expanded keys/values).
    select_impl: NSA selection ("gather", "pallas", "auto"), None for nsa.select_impl.
    scan: run each layer stack with lax.scan (True) or unrolled (False); None for
      scan_layers.
    dsa_stage: the only option that changes what is computed, for training DSA layers
      (DeepSeek-V3.2): None (inference: sparse attention, no indexer loss), "dense_warmup"
      (dense attention; the indexer learns the attention distribution over all visible keys)
      or "sparse" (sparse attention; the indexer learns it over its selected keys). Both
      stages return the indexer's KL loss as the layers' auxiliary output.
  """

  moe_impl: str | None = None
  attn_impl: str = "absorb"
  select_impl: str | None = None
  scan: bool | None = None
  dsa_stage: str | None = None


DEFAULT = RunOptions()


def run_options(moe_impl: str | None = None, attn_impl: str = "absorb",
                scan: bool | None = None, select_impl: str | None = None) -> RunOptions:
  """RunOptions from the keyword arguments of Transformer's entry points."""
  return RunOptions(moe_impl=moe_impl, attn_impl=attn_impl, select_impl=select_impl, scan=scan)
