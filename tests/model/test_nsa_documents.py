"""NSA over packed rows: with document starts (from segment ids), no branch reads a key of an
earlier document, and a document placed at a block-aligned offset of a packed row gets the
output it gets alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import NSAConfig, RopeConfig
from dsjax.model.nsa import NSAttention
from dsjax.ops import nsa
from dsjax.ops.rope import rope_cos_sin
from pallas_kernels.nsa.reference import selected_attention_gather
from tests.model.test_nsa_layer import CFG, _nsa_model_config
from tests.model_fixtures import assert_close_at_scale

WIDTH, HEADS = 32, 8


def test_document_starts_of_segment_ids():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 9, size=(3, 12))
  segments = np.stack([np.repeat(np.arange(1, 13), row)[:40] for row in lengths])
  segments[0, 30:] = 0  # trailing padding: no document, start -1
  starts = np.asarray(nsa.document_starts(jnp.asarray(segments)))
  for row, seg in zip(starts, segments):
    want = [-1 if seg[t] == 0 else
            max(s for s in range(t + 1) if s == 0 or seg[s] != seg[s - 1]) for t in range(40)]
    np.testing.assert_array_equal(row, want)


def _rope(positions):
  return rope_cos_sin(jnp.asarray(positions), RopeConfig(), CFG.head_dim)


def _packed_inputs(boundary: int, t: int = 70, seed: int = 0):
  """x [2,t,WIDTH]; each row holds document A (0..boundary-1) then B; positions restart at B,
  as the packing pipeline writes them; starts from the segment ids."""
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, t, WIDTH)), jnp.float32)
  index = np.arange(t)
  positions = np.broadcast_to(np.where(index < boundary, index, index - boundary), (2, t))
  segments = np.broadcast_to(np.where(index < boundary, 1, 2), (2, t))
  return x, _rope(positions), nsa.document_starts(jnp.asarray(segments))


@pytest.mark.parametrize("boundary", [32, 48])
def test_aligned_document_in_a_packed_row_equals_the_document_alone(boundary):
  """Document B starting at a multiple of the selection block (and so of the compression
  stride) sees the same compressed blocks, the same candidate selection blocks (the first
  forced) and the same window as when it is a row of its own (outputs reach |15| with
  std 0.3; 1e-4 is float32 rounding of the different matmul shapes)."""
  layer = NSAttention(WIDTH, HEADS, CFG, std=0.3, rngs=nnx.Rngs(0))
  x, (cos, sin), starts = _packed_inputs(boundary)
  packed = layer(x, cos, sin, starts=starts)
  rest = 70 - boundary
  alone = layer(x[:, boundary:], *_rope(np.broadcast_to(np.arange(rest), (2, rest))))
  np.testing.assert_allclose(packed[:, boundary:], alone, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(packed[:, :boundary], layer(x[:, :boundary], cos[:, :boundary],
                                                         sin[:, :boundary]), rtol=1e-5, atol=1e-4)
  # Without the starts, B reads A's keys (the control: the test sees a leak).
  leaky = layer(x, cos, sin)
  assert float(jnp.abs(leaky[:, boundary:] - alone).max()) > 1e-3


@pytest.mark.parametrize("boundary", [13, 27, 40])
def test_nothing_crosses_a_document_boundary(boundary):
  """At any boundary: changing document A changes neither B's outputs nor the gradient a loss
  on B sends anywhere; A's gradient from that loss is zero."""
  layer = NSAttention(WIDTH, HEADS, CFG, std=0.3, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(layer)
  x, (cos, sin), starts = _packed_inputs(boundary, seed=2)
  changed = x.at[:, :boundary].set(
      np.random.default_rng(3).normal(size=x[:, :boundary].shape))
  weights = jnp.sin(jnp.arange(2 * (70 - boundary) * WIDTH)).reshape(2, 70 - boundary, WIDTH)

  def b_loss(params, x):
    out = nnx.merge(graphdef, params)(x, cos, sin, starts=starts)
    return jnp.sum(out[:, boundary:] * weights)
  loss_a, (gp_a, gx_a) = jax.value_and_grad(b_loss, argnums=(0, 1))(params, x)
  loss_b, (gp_b, gx_b) = jax.value_and_grad(b_loss, argnums=(0, 1))(params, changed)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  assert float(jnp.abs(gx_a[:, :boundary]).max()) == 0.0
  np.testing.assert_allclose(gx_a, gx_b, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gp_a, gp_b)


@pytest.mark.parametrize("chunk, stages", [(16, 2), (20, 16)])
def test_packed_branches_in_query_chunks_equal_whole_sequence(chunk, stages):
  """The chunked scan carries each chunk's document starts: chunked == whole, with three
  documents in a row."""
  cfg = NSAConfig(num_kv_heads=2, head_dim=16, v_head_dim=12, compress_block=8,
                  compress_stride=4, select_block=8, num_selected=3, window=10)
  rng = np.random.default_rng(5)
  b, t, kv, g = 2, 70, 2, 3
  q = jnp.asarray(rng.normal(size=(b, t, kv * g, 16)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(2, b, t, kv, 16)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(2, b, t, kv, 12)), jnp.float32)
  k_cmp = nsa.block_windows(keys[0], 8, 4).mean(axis=3)
  v_cmp = nsa.block_windows(values[0], 8, 4).mean(axis=3)
  segments = np.repeat([[1] * 21 + [2] * 30 + [3] * 19], b, axis=0)
  starts = nsa.document_starts(jnp.asarray(segments))

  def select(q, k, v, indices, offset, starts):
    return selected_attention_gather(q, k, v, indices, 8, 0.25, query_offset=offset,
                                     key_start=starts)
  whole, whole_idx = nsa.branch_outputs(q, keys, values, k_cmp, v_cmp, cfg, 0.25, select,
                                        starts=starts)
  parts, parts_idx = nsa.branch_outputs(q, keys, values, k_cmp, v_cmp, cfg, 0.25, select,
                                        query_chunk=chunk, stages=stages, starts=starts)
  np.testing.assert_array_equal(whole_idx, parts_idx)
  np.testing.assert_allclose(whole, parts, atol=1e-5)
  # Selection starts at each document's first block: no index before it.
  first_block = np.asarray(starts)[:, :, None, None] // 8
  idx = np.asarray(whole_idx)
  assert np.all((idx == -1) | (idx >= first_block))
  own_block = np.arange(t)[None, :, None, None] // 8
  assert np.all((idx == own_block).any(axis=-1))  # and the query's own block is always read


def test_packed_rows_in_the_nsa_model():
  """Transformer.forward with segment ids: a document packed at an aligned offset gets the
  logits it gets alone (NSA in every layer, MoE and the dense block included)."""
  from tests.model_fixtures import forward, randomized_model, tokens
  model = randomized_model(_nsa_model_config())
  a, b = 16, 20  # the model's select_block is 8, its compress_stride 2
  ids = tokens(model.config, b=2, t=a + b, seed=4)
  index = np.arange(a + b)
  positions = jnp.asarray(np.broadcast_to(np.where(index < a, index, index - a), (2, a + b)))
  segments = jnp.asarray(np.broadcast_to(np.where(index < a, 1, 2), (2, a + b)))
  packed = forward(model, ids, positions, segments).logits
  np.testing.assert_allclose(packed[:, a:], forward(model, ids[:, a:]).logits, atol=1e-4)
  np.testing.assert_allclose(packed[:, :a], forward(model, ids[:, :a]).logits, atol=1e-4)


@pytest.mark.parametrize("boundary", [27])
def test_pallas_selection_with_documents_equals_gather(boundary):
  """select_impl='pallas' (all three branches through the kernel) with document starts, the
  second document beginning inside a selection block (the kernel masking the block's tokens
  before it; 27 is not a multiple of l'=16 nor of d): equal to the XLA branches, with the
  gradients."""
  layer = NSAttention(WIDTH, HEADS, CFG, std=0.3, rngs=nnx.Rngs(4))
  x, (cos, sin), starts = _packed_inputs(boundary, t=56, seed=6)

  def loss(x, impl):
    return jnp.sum(jnp.sin(layer(x, cos, sin, select_impl=impl, starts=starts)))
  (a, ga), (b, gb) = (jax.value_and_grad(loss)(x, impl) for impl in ("pallas", "gather"))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  assert_close_at_scale(ga, gb, rel=1e-5)  # gradients reach |30|
