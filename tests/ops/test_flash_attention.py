"""The blocked (XLA flash) attention against the dense reference: forward and gradients with
causal masks, packed documents with padding, queries that see no key, Hq != Hv, lengths not
a multiple of the block and T != S; the block ranges it skips by; its memory; the auto rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.compile.topology import device_context, get_topology
from dsjax.ops import flash_attention
from dsjax.ops.attention import (DENSE_MAX_LOGITS, AttentionMask, attention_mask,
                                 dot_product_attention, resolve_impl)
from pallas_kernels.attention import block_ranges, block_visibility
from tests.model_fixtures import assert_close_at_scale

SCALE = 0.3


def packed(lengths_per_row, t):
  """(segment ids, positions) int32 [B,T]: documents of the given lengths back to back (ids
  1, 2, ..., positions restarting at 0), padding (id 0) after them."""
  seg = np.zeros((len(lengths_per_row), t), np.int32)
  pos = np.zeros_like(seg)
  for b, lengths in enumerate(lengths_per_row):
    col = 0
    for doc, n in enumerate(lengths, start=1):
      seg[b, col:col + n], pos[b, col:col + n] = doc, np.arange(n)
      col += n
  return jnp.asarray(seg), jnp.asarray(pos)


def qkv(seed, b, t, s, n=3, hq=12, hv=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = ((b, t, n, hq), (b, s, n, hq), (b, s, n, hv), (b, t, n, hv))
  q, k, v, w = (jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)
  return q, k, v, w.astype(jnp.float32)


def _causal(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _cases():
  """name -> (T, S, AttentionMask, block_q, block_k)."""
  seg, pos = packed([[10, 20, 5], [4, 17]], 45)
  # Row 0 ends with 10 padding queries, row 1 with 24; padding sees no key.
  seg_q, pos_q = packed([[7, 13]], 20)
  # Chunked prefill: 20 queries at positions 33..52 over 53 keys; query -1 sees nothing.
  late = jnp.arange(33, 53, dtype=jnp.int32).at[0].set(-1)[None]
  return {
      "causal": (37, 37, AttentionMask.self_attention(_causal(2, 37)), 8, 16),
      "packed": (45, 45, AttentionMask.self_attention(pos, seg), 16, 8),
      "packed_one_block": (45, 45, AttentionMask.self_attention(pos, seg), 64, 64),
      "packed_without_padding": (20, 20, AttentionMask(pos_q, pos_q, seg_q, seg_q), 8, 8),
      "queries_after_keys": (20, 53, AttentionMask(late, _causal(1, 53)), 8, 16),
  }


CASES = _cases()


def _loss(fn, w):
  return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)


@pytest.mark.parametrize("name", sorted(CASES))
def test_blocked_matches_dense_forward_and_gradients(name):
  t, s, mask, bq, bk = CASES[name]
  q, k, v, w = qkv(0, mask.q_positions.shape[0], t, s)

  def blocked(q, k, v):
    return flash_attention.blocked_attention(q, k, v, mask, SCALE, bq, bk)

  def dense(q, k, v):
    return dot_product_attention(q, k, v, mask.dense(), SCALE)
  got, want = jax.jit(blocked)(q, k, v), dense(q, k, v)
  assert_close_at_scale(got, want, 1e-5)
  grads = jax.jit(jax.grad(_loss(blocked, w), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(_loss(dense, w), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, expected):
    assert_close_at_scale(g, e, 1e-5)
  # Queries that see no key give exactly 0 and pass no gradient back.
  blind = ~np.asarray(mask.dense()[:, 0].any(-1))
  if blind.any():
    np.testing.assert_array_equal(np.asarray(got)[blind], 0)
    np.testing.assert_array_equal(np.asarray(grads[0])[blind], 0)


def test_blocked_bfloat16_is_close_to_float32():
  t, s, mask, bq, bk = CASES["packed"]
  q, k, v, w = qkv(1, 2, t, s)
  want = dot_product_attention(q, k, v, mask.dense(), SCALE)
  got = flash_attention.blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask,
                                          SCALE, bq, bk)
  assert got.dtype == jnp.bfloat16
  assert_close_at_scale(got.astype(jnp.float32), want, 2e-2)


def test_attention_mask_dense_is_the_mask():
  seg, pos = packed([[3, 4]], 9)
  mask = AttentionMask.self_attention(pos, seg)
  np.testing.assert_array_equal(mask.dense(), attention_mask(pos, pos, seg, seg))
  assert mask.dense().shape == (1, 1, 9, 9)


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_ranges_hold_every_visible_block(name):
  """The ranges are conservative (every block holding a visible pair is inside) and, for these
  masks (positions increasing within documents), exactly the hull of the visible blocks: the
  blocks past the diagonal and before the documents' starts are skipped."""
  t, s, mask, bq, bk = CASES[name]
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  b = mask.q_positions.shape[0]
  q_seg = mask.q_segment_ids if mask.q_segment_ids is not None else jnp.ones((b, t), jnp.int32)
  k_seg = mask.k_segment_ids if mask.k_segment_ids is not None else jnp.ones((b, s), jnp.int32)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])))  # noqa: E731
  args = (pad(mask.q_positions, tp), pad(mask.k_positions, sp), pad(q_seg, tp), pad(k_seg, sp))
  dense = np.asarray(attention_mask(*args)[:, 0])
  exact = dense.reshape(b, tp // bq, bq, sp // bk, bk).any(axis=(2, 4))
  ranges = block_ranges(*args, bq, bk)
  np.testing.assert_array_equal(block_visibility(*args, bq, bk) | exact,
                                block_visibility(*args, bq, bk))
  for row in range(b):
    for i in range(tp // bq):
      cols = np.flatnonzero(exact[row, i])
      lo, hi = (cols[0], cols[-1] + 1) if cols.size else (0, 0)
      assert (ranges.k_start[row, i], ranges.k_end[row, i]) == (lo, hi), (row, i)
    for j in range(sp // bk):
      rows = np.flatnonzero(exact[row, :, j])
      lo, hi = (rows[0], rows[-1] + 1) if rows.size else (0, 0)
      assert (ranges.q_start[row, j], ranges.q_end[row, j]) == (lo, hi), (row, j)


def _temp_bytes(fn, *shapes):
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_grows_linearly():
  """Forward + backward temporaries (XLA:CPU) at T = S = 1024 and 2048: the dense path holds
  [B,N,T,S] float32 logits and probabilities, 4x more for twice the length; the blocked one
  [B,N,512,512] blocks, whatever the length, and O(T) operands."""
  def temp_bytes(impl, t, b=1, n=4, hq=32, hv=16):
    shapes = [jax.ShapeDtypeStruct((b, t, n, h), jnp.float32) for h in (hq, hq, hv)]
    mask = AttentionMask.self_attention(_causal(b, t))
    grad = jax.grad(lambda q, k, v: jnp.sum(impl(q, k, v, mask)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  def dense(q, k, v, mask):
    return dot_product_attention(q, k, v, mask.dense(), SCALE)

  def blocked(q, k, v, mask):
    return flash_attention.blocked_attention(q, k, v, mask, SCALE)
  d1, d2 = temp_bytes(dense, 1024), temp_bytes(dense, 2048)
  b1, b2 = temp_bytes(blocked, 1024), temp_bytes(blocked, 2048)
  assert d2 > 3.5 * d1 and d2 >= 4 * 2048 * 2048 * 4
  assert b2 < 1.25 * b1, (b1, b2)
  assert b2 < d2 / 8, (b2, d2)


def test_auto_rule():
  def operands(t, dtype=jnp.float32):
    return (jax.ShapeDtypeStruct((1, t, 2, 192), dtype),) * 2 + (
        jax.ShapeDtypeStruct((1, t, 2, 128), dtype),)
  short, long = 64, int(np.sqrt(DENSE_MAX_LOGITS)) + 1
  assert resolve_impl("auto", *operands(short)) == "dense"
  assert resolve_impl("auto", *operands(long)) == "blocked"
  assert resolve_impl("blocked", *operands(short)) == "blocked"
  tpu = get_topology("v5p:2x2x1").devices
  with device_context(tpu):
    # XLA cannot partition a Mosaic call: the kernel needs a context mesh to be placed.
    assert resolve_impl("auto", *operands(short)) == "blocked"
    with jax.set_mesh(Mesh(np.asarray(tpu), ("x",))):
      assert resolve_impl("auto", *operands(short)) == "pallas"
  # cuDNN's checks ask the local GPU: a compile-only H100 falls back to the blocked path.
  with device_context(get_topology("h100:8").devices):
    assert resolve_impl("auto", *operands(long, jnp.bfloat16)) == "blocked"
  with pytest.raises(ValueError, match="use one of"):
    resolve_impl("flash", *operands(short))


def test_blocked_compiles_for_h100():
  """What `auto` runs when compiling for an H100 from a CPU host, forward + backward at a
  DeepSeek-V3 training shape per device (128 heads over tensor=8): the blocked path."""
  topo = get_topology("h100:8")
  sharding = NamedSharding(Mesh([topo.devices[0]], ("x",)), PartitionSpec())
  bf16 = jnp.bfloat16
  shapes = (jax.ShapeDtypeStruct((1, 4096, 16, 192), bf16),) * 2 + (
      jax.ShapeDtypeStruct((1, 4096, 16, 128), bf16),
      *(jax.ShapeDtypeStruct((1, 4096), jnp.int32),) * 2)

  def loss(q, k, v, positions, segment_ids):
    mask = AttentionMask.self_attention(positions, segment_ids)
    o = flash_attention.blocked_attention(q, k, v, mask, 0.07)
    return jnp.sum(o.astype(jnp.float32))
  with device_context(topo.devices):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=sharding,
                       out_shardings=sharding).lower(*shapes).compile()
  # Dense would hold 16 x 4096 x 4096 float32 logits (1 GiB) and their probabilities.
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30 // 2
