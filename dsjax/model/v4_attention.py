"""DeepSeek-V4's attention kinds: v4_sliding, v4_csa and v4_hca.

All three: q = wq_b(q_norm(wq_a(x))) then a weightless RMS norm per head; ONE key-value head
kv = kv_norm(wkv(x)) read as both keys and values; partial rotary on the trailing
qk_rope_head_dim dims (interleaved pairs); softmax scale head_dim^-0.5 with a learned sink
logit per head (`attn_sink`, fp32) in the denominator only; the output's rotary dims rotated
back at the query's position; then the grouped projection: heads in o_groups groups, each
projected to o_lora_rank (wo_a), then wo_b to hidden.

Keys: the last v4.sliding_window tokens (the query's own included), and in one softmax with
them the compressed entries of earlier windows (dsjax.model.v4_compressor):
  v4_sliding  none; ModelConfig.rope.
  v4_hca      every complete window of v4.hca_rate tokens (non-overlapping); v4.compress_rope.
  v4_csa      overlapping windows of 2 * v4.csa_rate at stride csa_rate, of which the lightning
              indexer picks v4.index_topk per query; v4.compress_rope.
Packed sequences (segment ids): a compressed entry is visible only when its whole window (and
for CSA the previous one) lies in the query's segment; windows stay on the row's token grid.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig, RopeConfig, V4AttentionConfig
from dsjax.model.kinds import AttentionKind, TokenContext, register_attention
from dsjax.model.norm import RMSNorm
from dsjax.model.param import AXES, normal_param
from dsjax.model.v4_compressor import Compressor, Indexer, rotate_trailing
from dsjax.ops import v4_attention as v4
from dsjax.ops.linear import project
from dsjax.ops.rope import rope_cos_sin


class V4Context(NamedTuple):
  """Per-sequence context of a V4 kind: the queries' and keys' cos/sin [B,T,R/2] (the kind's
  rope), positions int[B,T], segment ids int[B,T] or None, and the sliding window's
  visibility bool [B,T,T]."""
  cos: jax.Array
  sin: jax.Array
  positions: jax.Array
  segment_ids: jax.Array | None
  window: jax.Array


def sliding_visibility(positions, segment_ids, window: int) -> jax.Array:
  """bool[B,T,T]: key s is at most window - 1 positions before query t (and not after it),
  in the same non-padding segment."""
  gap = positions[:, :, None] - positions[:, None, :]
  visible = (gap >= 0) & (gap < window)
  if segment_ids is not None:
    visible &= (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
  return visible


def _entries_in_segment(segment_ids, num_entries: int, rate: int, overlap: bool) -> jax.Array:
  """bool[B,T,W]: entry w's windows (w, and w - 1 with `overlap`) lie in query t's segment."""
  last = segment_ids[:, jnp.arange(num_entries) * rate + rate - 1]
  first_index = jnp.maximum(jnp.arange(num_entries) - (1 if overlap else 0), 0) * rate
  first = segment_ids[:, first_index]
  same = (first == last) & (last != 0)
  return same[:, None, :] & (segment_ids[:, :, None] == last[:, None, :])


def _v4(cfg: ModelConfig) -> V4AttentionConfig:
  return cfg.v4 or V4AttentionConfig()


class V4Attention(AttentionKind):
  """The sliding-window kind; CSA and HCA add compressed entries (`_entries`)."""

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout.
  PROJECTIONS = {"wq_a": (0, 1), "wq_b": (0, 1), "wkv": (0, 1), "wo_b": (0, 1)}

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    c, d, n = _v4(cfg), cfg.hidden_size, cfg.num_attention_heads
    _check_groups(c, n)
    std, pdt = cfg.initializer_range, cfg.param_dtype
    self.wq_a = normal_param(rngs, (d, c.q_lora_rank), ("embed", "q_lora"), std, pdt)
    self.q_norm = RMSNorm(c.q_lora_rank, cfg.rms_norm_eps, "q_lora", jnp.float32)
    self.wq_b = normal_param(rngs, (c.q_lora_rank, n, c.head_dim),
                             ("q_lora", "heads", "head_dim"), std, pdt)
    self.wkv = normal_param(rngs, (d, c.head_dim), ("embed", "head_dim"), std, pdt)
    self.kv_norm = RMSNorm(c.head_dim, cfg.rms_norm_eps, "head_dim", jnp.float32)
    self.wo_a = normal_param(rngs, (c.o_groups, n // c.o_groups * c.head_dim, c.o_lora_rank),
                             (None, None, None), std, pdt)
    self.wo_b = normal_param(rngs, (c.o_groups * c.o_lora_rank, d), (None, "embed"), std, pdt)
    self.attn_sink = nnx.Param(jnp.zeros((n,), jnp.float32), **{AXES: ("heads",)})
    self.cfg4, self.eps, self.dtype = c, cfg.rms_norm_eps, cfg.dtype
    self.scale = c.head_dim ** -0.5

  # ---- the attention-kind interface (dsjax.model.kinds) ----
  @classmethod
  def create(cls, cfg: ModelConfig, *, rngs: nnx.Rngs) -> "V4Attention":
    return cls(cfg, rngs=rngs)

  @classmethod
  def rope(cls, cfg: ModelConfig) -> RopeConfig:
    return cfg.rope

  @classmethod
  def context(cls, cfg: ModelConfig, tokens: TokenContext) -> V4Context:
    c = _v4(cfg)
    cos, sin = rope_cos_sin(tokens.positions, cls.rope(cfg), c.qk_rope_head_dim)
    window = sliding_visibility(tokens.positions, tokens.segment_ids, c.sliding_window)
    return V4Context(cos, sin, tokens.positions, tokens.segment_ids, window)

  @classmethod
  def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> float:
    c = _v4(cfg)
    keys = min(c.sliding_window, seq_len / 2) + cls._compressed_keys(c, seq_len)
    return 2 * 2 * cfg.num_attention_heads * keys * c.head_dim

  @classmethod
  def _compressed_keys(cls, c: V4AttentionConfig, seq_len: int) -> float:
    return 0.0

  def attend(self, x, ctx: V4Context, options) -> jax.Array:
    q_latent = self.q_norm(project(x, self._w("wq_a")).astype(jnp.float32)).astype(x.dtype)
    q = project(q_latent, self._w("wq_b"))
    q = q * jax.lax.rsqrt(jnp.mean(jnp.square(q.astype(jnp.float32)), -1, keepdims=True)
                          + self.eps).astype(q.dtype)
    q = rotate_trailing(q, ctx.cos, ctx.sin)
    kv = self.kv_norm(project(x, self._w("wkv")).astype(jnp.float32)).astype(x.dtype)
    kv = rotate_trailing(kv[:, :, None, :], ctx.cos, ctx.sin)[:, :, 0, :]
    keys, visible = kv, ctx.window
    extra = self._entries(x, q_latent, ctx)
    if extra is not None:
      entries, entry_visible = extra
      keys = jnp.concatenate([kv, entries.astype(kv.dtype)], axis=1)
      visible = jnp.concatenate([visible, entry_visible], axis=-1)
    out = v4.sink_attention(q, keys, visible, self.attn_sink[...], self.scale)
    out = rotate_trailing(out, ctx.cos, -ctx.sin)
    return self._output(out)

  def attend_prefill(self, x, ctx, options, lengths=None, slots=None):
    raise NotImplementedError(
        "DeepSeek-V4 attention has no decode cache yet: dsjax trains and runs the forward "
        "pass of v4_* layers; use generate() with another attention kind (docs/v4.md).")

  attend_decode = attend_decode_in_place = attend_prefill

  @classmethod
  def decode_context(cls, cfg, positions, slots: int, first_slot: int = 0):
    return None  # built so that prefill can report the missing cache by its own message

  # ---- V4's own pieces ----
  def _w(self, name: str) -> jax.Array:
    return getattr(self, name)[...].astype(self.dtype)

  def _entries(self, x, q_latent, ctx: V4Context):
    """(compressed entries [B,W,D], their visibility bool [B,T,W]) or None."""
    return None

  def _output(self, out: jax.Array) -> jax.Array:
    """[B,T,H,D] -> grouped wo_a, then wo_b: [B,T,hidden]."""
    b, t = out.shape[:2]
    g = self.cfg4.o_groups
    grouped = out.reshape(b, t, g, -1)
    low = jnp.einsum("BTGI,GIO->BTGO", grouped, self._w("wo_a"))
    return project(low.reshape(b, t, -1), self._w("wo_b"))


def _check_groups(c: V4AttentionConfig, heads: int) -> None:
  if heads % c.o_groups:
    raise ValueError(f"num_attention_heads={heads} is not a multiple of v4.o_groups="
                     f"{c.o_groups}; the grouped output projection splits the heads evenly.")


register_attention("v4_sliding")(V4Attention)


class _CompressedV4Attention(V4Attention):
  """V4 attention with a compressor over windows of `_rate(v4)` tokens."""

  OVERLAP = False

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    c = _v4(cfg)
    self.compressor = Compressor(cfg, c, c.head_dim, self._rate(c), self.OVERLAP, rngs=rngs)

  @classmethod
  def rope(cls, cfg: ModelConfig) -> RopeConfig:
    return _v4(cfg).compress_rope

  @classmethod
  def _rate(cls, c: V4AttentionConfig) -> int:
    raise NotImplementedError

  @classmethod
  def _compressed_keys(cls, c: V4AttentionConfig, seq_len: int) -> float:
    return seq_len / 2 / cls._rate(c)

  def _entries(self, x, q_latent, ctx: V4Context):
    entries = self.compressor(x)
    rate = self._rate(self.cfg4)
    visible = v4.visible_entries(ctx.positions, entries.shape[1], rate)
    if ctx.segment_ids is not None:
      visible &= _entries_in_segment(ctx.segment_ids, entries.shape[1], rate, self.OVERLAP)
    return entries, self._select(x, q_latent, ctx, visible)

  def _select(self, x, q_latent, ctx, visible):
    return visible


@register_attention("v4_hca")
class HCAttention(_CompressedV4Attention):
  """Heavily compressed attention: one entry per v4.hca_rate tokens, all of them attended."""

  @classmethod
  def _rate(cls, c: V4AttentionConfig) -> int:
    return c.hca_rate


@register_attention("v4_csa")
class CSAttention(_CompressedV4Attention):
  """Compressed sparse attention: overlapping entries every v4.csa_rate tokens, of which the
  lightning indexer picks v4.index_topk per query."""

  OVERLAP = True

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.indexer = Indexer(cfg, _v4(cfg), rngs=rngs)

  @classmethod
  def _rate(cls, c: V4AttentionConfig) -> int:
    return c.csa_rate

  @classmethod
  def _compressed_keys(cls, c: V4AttentionConfig, seq_len: int) -> float:
    return min(c.index_topk, seq_len / 2 / c.csa_rate)

  def _select(self, x, q_latent, ctx, visible):
    return self.indexer.select(x, q_latent, ctx.cos, ctx.sin, visible)
