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
  """

  moe_impl: str | None = None
  attn_impl: str = "absorb"
  select_impl: str | None = None
  scan: bool | None = None


DEFAULT = RunOptions()


def run_options(moe_impl: str | None = None, attn_impl: str = "absorb",
                scan: bool | None = None, select_impl: str | None = None) -> RunOptions:
  """RunOptions from the keyword arguments of Transformer's entry points."""
  return RunOptions(moe_impl=moe_impl, attn_impl=attn_impl, select_impl=select_impl, scan=scan)
