"""The model structure is open: a new attention kind (plain multi-head softmax attention with its
own K/V cache) and a new feed-forward kind, defined and registered in this file only, train a
step, prefill + decode and generate; and a hybrid pattern (MLA and NSA layers alternating with
dense and MoE feed-forwards) is scanned == unrolled and prefill + decode == forward."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.config import LayerSpec, NSAConfig
from dsjax.model.kinds import (AttentionKind, FeedForwardKind, attention_kinds, ffn_kinds,
                               register_attention, register_ffn)
from dsjax.model.param import normal_param
from dsjax.model.pattern import layer_runs
from dsjax.ops.attention import AttentionMask, decode_masks, dot_product_attention
from dsjax.ops.rope import apply_rope, rope_cos_sin
from dsjax.ops.slots import write_at_slots
from dsjax.train.setup import build_run
from dsjax.train.state import init_train_state
from tests.model_fixtures import (forward, randomized_model, scanned_and_unrolled,
                                  tiny_config, tokens)
from tests.train.experiments import small_experiment

HEAD_DIM = 8


class KVCache(NamedTuple):
  """Keys (rotated) and values [B,S,N,H] of one layer; a stack adds a leading axis."""
  k: jax.Array
  v: jax.Array

  @property
  def slots(self) -> int:
    k = self.k
    return k.arrays[0].shape[-3] if hasattr(k, "arrays") else k.shape[-3]

  def write(self, new: "KVCache", positions) -> "KVCache":
    return KVCache(*(write_at_slots(c, n, positions, 2) for c, n in zip(self, new)))

  def padded(self, slots: int, offset: int = 0) -> "KVCache":
    t = self.k.shape[-3]
    def pad(a):
      widths = [(0, 0)] * a.ndim
      widths[-3] = (offset, slots - offset - t)
      return jnp.pad(a, widths)
    return KVCache(*map(pad, self))


class MHAContext(NamedTuple):
  cos: jax.Array
  sin: jax.Array
  mask: jax.Array  # forward: [B,1,T,T]; decode: cache slots [B,1,T,S]
  new_mask: jax.Array | None = None
  slot_mask: jax.Array | None = None


@register_attention("test_mha")
class MultiHeadAttention(AttentionKind):
  """softmax(q k / sqrt(H)) v over N heads of HEAD_DIM, rotary on the whole head."""

  def __init__(self, cfg, *, rngs):
    d, n, std, pdt = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range, "float32"
    for name in ("wq", "wk", "wv"):
      setattr(self, name, normal_param(rngs, (d, n, HEAD_DIM), ("embed", "heads", "head_dim"),
                                       std, pdt))
    self.wo = normal_param(rngs, (n, HEAD_DIM, d), ("heads", "head_dim", "embed"), std, pdt)

  @classmethod
  def create(cls, cfg, *, rngs):
    return cls(cfg, rngs=rngs)

  @classmethod
  def context(cls, cfg, tokens):
    cos, sin = rope_cos_sin(tokens.positions, cfg.rope, HEAD_DIM)
    mask = AttentionMask.self_attention(tokens.positions, tokens.segment_ids).dense()
    return MHAContext(cos, sin, mask)

  @classmethod
  def decode_context(cls, cfg, positions, slots, first_slot=0):
    cos, sin = rope_cos_sin(positions, cfg.rope, HEAD_DIM)
    cache_mask, new_mask = decode_masks(positions, slots, first_slot)
    slot_mask = (jnp.arange(slots) <= positions[:, :, None])[:, None]
    return MHAContext(cos, sin, cache_mask, new_mask, slot_mask)

  @classmethod
  def flops_per_token(cls, cfg, seq_len):
    return 2 * cfg.num_attention_heads * seq_len / 2 * 2 * HEAD_DIM

  def _qkv(self, x, ctx):
    q, k, v = (jnp.einsum("BTD,DNH->BTNH", x, getattr(self, w)[...]) for w in ("wq", "wk", "wv"))
    return apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v

  def _out(self, q, k, v, mask):
    out = dot_product_attention(q, k, v, mask, HEAD_DIM ** -0.5)
    return jnp.einsum("BTNH,NHD->BTD", out, self.wo[...])

  def attend(self, x, ctx, options):
    q, k, v = self._qkv(x, ctx)
    return self._out(q, k, v, ctx.mask)

  def attend_prefill(self, x, ctx, options, lengths=None, slots=None):
    q, k, v = self._qkv(x, ctx)
    cache = KVCache(k, v)
    return self._out(q, k, v, ctx.mask), cache if slots is None else cache.padded(slots)

  def attend_decode(self, x, ctx, cache, positions, options):
    q, k, v = self._qkv(x, ctx)
    keys = jnp.concatenate([cache.k, k], axis=1)
    values = jnp.concatenate([cache.v, v], axis=1)
    return self._out(q, keys, values, jnp.concatenate([ctx.mask, ctx.new_mask], -1)), KVCache(k, v)

  def attend_decode_in_place(self, x, ctx, cache, positions, options):
    q, k, v = self._qkv(x, ctx)
    cache = cache.write(KVCache(k, v), positions)
    return self._out(q, cache.k, cache.v, ctx.slot_mask), cache


@register_ffn("test_token_scaled")
class TokenScaledMLP(FeedForwardKind):
  """gelu(x w1) w2, scaled per token by a learned factor of (token id mod 4): reads the token
  context."""

  def __init__(self, cfg, *, rngs):
    d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
    self.w1 = normal_param(rngs, (d, f), ("embed", "mlp"), std, "float32")
    self.w2 = normal_param(rngs, (f, d), ("mlp", "embed"), std, "float32")
    self.scale = normal_param(rngs, (4,), (None,), 1.0, "float32")

  @classmethod
  def create(cls, cfg, *, rngs):
    return cls(cfg, rngs=rngs)

  def feed_forward(self, x, tokens, options):
    y = jax.nn.gelu(x @ self.w1[...]) @ self.w2[...]
    return y * self.scale[...][tokens.ids % 4][..., None], None


NEW_PATTERN = (LayerSpec("test_mha", "test_token_scaled"), LayerSpec("mla", "moe"),
               LayerSpec("test_mha", "moe"))


def _decode_logits(model, ids, prompt, step=1, slots=32):
  """Logits of tokens prompt.. from prefill(ids[:, :prompt]) then decode, stacked layout."""
  out, cache = model.prefill(ids[:, :prompt], slots=slots)
  logits = []
  for start in range(prompt, ids.shape[1], step):
    positions = jnp.broadcast_to(jnp.arange(start, start + step, dtype=jnp.int32),
                                 (ids.shape[0], step))
    step_logits, _, cache = model.decode(ids[:, start:start + step], positions, cache)
    logits.append(step_logits)
  return out.logits, jnp.concatenate(logits, axis=1)


def test_new_kinds_are_registered_by_this_file_only():
  assert {"test_mha", "mla", "nsa"} <= set(attention_kinds())
  assert {"test_token_scaled", "dense", "moe"} <= set(ffn_kinds())
  with pytest.raises(ValueError, match="registered: .*mla"):
    dsjax.Transformer(tiny_config(layer_pattern=(LayerSpec("nope", "dense"),) * 3),
                      rngs=nnx.Rngs(0))


def test_new_kinds_prefill_decode_and_generate():
  cfg = tiny_config(layer_pattern=NEW_PATTERN, num_mtp_layers=0)
  model = randomized_model(cfg)
  assert model.stack_names == ("test_token_scaled_layers", "moe_layers", "moe_layers_2")
  assert type(model.test_token_scaled_layers.blocks.attn).__name__ == "MultiHeadAttention"
  ids = tokens(cfg, t=20)
  full = forward(model, ids).logits
  prompt_logits, decoded = _decode_logits(model, ids, 12)
  np.testing.assert_allclose(prompt_logits, full[:, :12], atol=1e-5)
  np.testing.assert_allclose(decoded, full[:, 12:], atol=1e-4)
  # dsjax.generate (per-layer buffers, in-place decode) == greedy argmax of the full forward.
  prompt = [int(t) for t in ids[0, :6]]
  generated = dsjax.generate(model, [prompt], max_new_tokens=5, temperature=0.0)[0]
  seq = list(prompt)
  for _ in range(5):
    seq.append(int(jnp.argmax(forward(model, jnp.asarray([seq], jnp.int32)).logits[0, -1])))
  assert generated == seq[len(prompt):]


def test_new_kinds_train_a_step():
  pattern = tuple(dict(attention=s.attention, ffn=s.ffn) for s in NEW_PATTERN)
  run = build_run(small_experiment(**{"model.layer_pattern": pattern}))
  state = init_train_state(run.model_cfg, run.optimizer, 0, run.state_shardings)
  iterator = run.data.train_iterator()
  batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
  iterator.close()
  new, metrics = run.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
  before, after = nnx.to_flat_state(state.params), dict(nnx.to_flat_state(new.params))
  changed = {"/".join(map(str, p)) for p, v in before
             if not np.array_equal(v.get_value(), after[p].get_value())}
  assert any(p.endswith("ffn/scale") for p in changed)  # the new FFN's token-indexed factor
  assert any(p.endswith("attn/wk") for p in changed)    # the new attention's keys


HYBRID = (LayerSpec("mla", "dense"), LayerSpec("nsa", "moe")) * 2
NSA = NSAConfig(num_kv_heads=2, head_dim=8, v_head_dim=8, compress_block=4, compress_stride=2,
                compress_hidden=16, select_block=4, num_selected=3, window=4,
                select_impl="gather")


@pytest.fixture(scope="module")
def hybrid():
  cfg = tiny_config(num_hidden_layers=4, layer_pattern=HYBRID, nsa=NSA, num_mtp_layers=0)
  return randomized_model(cfg)


def test_hybrid_pattern_is_one_scanned_period(hybrid):
  runs = layer_runs(hybrid.config)
  assert [(r.name, len(r.period), r.repeats) for r in runs] == [("layers", 2, 2)]


def test_hybrid_scanned_equals_unrolled(hybrid):
  (logits1, g1), (logits2, g2) = scanned_and_unrolled(hybrid, tokens(hybrid.config, t=16))
  np.testing.assert_allclose(logits1, logits2, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert sum(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g1)) > 10


def test_hybrid_prefill_and_decode_equal_the_forward(hybrid):
  ids = tokens(hybrid.config, t=20)
  full = forward(hybrid, ids).logits
  prompt_logits, decoded = _decode_logits(hybrid, ids, 11, slots=20)
  np.testing.assert_allclose(prompt_logits, full[:, :11], atol=1e-5)
  np.testing.assert_allclose(decoded, full[:, 11:], atol=1e-4)
