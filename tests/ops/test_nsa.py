"""NSA branch math (dsjax.ops.nsa): parity with fla-core's pure-torch references, the chunked
sliding window against a dense band mask, block selection and its scores against plain loops,
and causality of every branch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsjax.ops import nsa
from pallas_kernels.nsa.reference import selected_attention_gather

with warnings.catch_warnings():  # fla warns that flash-attn and a GPU are absent
  warnings.simplefilter("ignore")
  from fla.ops.nsa.naive import naive_nsa_compression, naive_nsa_selection


def _qkv(seed, b, t, kv, g, h=16, hv=12):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, kv * g, h)).astype(np.float32)
  k = rng.normal(size=(b, t, kv, h)).astype(np.float32)
  v = rng.normal(size=(b, t, kv, hv)).astype(np.float32)
  return q, k, v


def _random_selection(seed, b, t, kv, top_n, block):
  """Distinct causal blocks per (b, t, kv head), -1 padded; scores random."""
  scores = np.random.default_rng(seed).random((b, t, kv, -(-t // block))).astype(np.float32)
  return nsa.select_blocks(jnp.asarray(scores), top_n, block)


@pytest.mark.parametrize("g,block", [(1, 8), (4, 4), (16, 8)])
def test_compression_attention_matches_fla(g, block):
  """fla's compressed blocks are back to back (stride = length)."""
  q, _, _ = _qkv(0, 2, 45, 2, g)
  rng = np.random.default_rng(1)
  c = nsa.num_compressed_blocks(45, block, block)
  k_cmp = rng.normal(size=(2, c, 2, 16)).astype(np.float32)
  v_cmp = rng.normal(size=(2, c, 2, 12)).astype(np.float32)
  got, _ = nsa.compression_attention(q, k_cmp, v_cmp, block, block, 0.3)
  want, _ = naive_nsa_compression(*map(torch.tensor, (q, k_cmp, v_cmp)), block, 0.3)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g,block,top_n", [(1, 8, 3), (4, 16, 5), (16, 4, 20)])
def test_selected_attention_matches_fla(g, block, top_n):
  """Includes T not a multiple of l', and n larger than the blocks available (-1 padding)."""
  q, k, v = _qkv(2, 2, 37, 2, g)
  indices = _random_selection(3, 2, 37, 2, top_n, block)
  got = selected_attention_gather(q, k, v, indices, block, 0.25)
  want = naive_nsa_selection(*map(torch.tensor, (q, k, v)),
                             torch.tensor(np.asarray(indices), dtype=torch.long), block, 0.25)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,window", [(50, 7), (50, 16), (33, 64), (64, 16)])
def test_sliding_window_equals_band_mask(t, window):
  q, k, v = _qkv(4, 2, t, 2, 4)
  got = nsa.sliding_window_attention(q, k, v, window, 0.25)
  distance = np.arange(t)[:, None] - np.arange(t)[None, :]
  band = jnp.asarray((distance >= 0) & (distance < window))
  want, _ = nsa.grouped_attention(q, k, v, band, 0.25)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _packed_starts(b, t, boundaries):
  starts = np.zeros((b, t), np.int32)
  for boundary in boundaries:
    starts[:, boundary:] = boundary
  starts[-1, t - 3:] = -1  # a padded tail
  return jnp.asarray(starts)


@pytest.mark.parametrize("t,window,block", [(50, 7, 8), (50, 16, 8), (33, 64, 16),
                                            (45, 20, 4)])
@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
def test_window_selection_is_the_sliding_window(t, window, block, packed):
  """The window written as block selections (window_selection: at most (w-1)//l' + 2 blocks,
  cut at max(t-w+1, document start)) attends exactly like sliding_window_attention."""
  q, k, v = _qkv(5, 2, t, 2, 4)
  starts = _packed_starts(2, t, (13, 30)) if packed else None
  assert nsa.window_selection(t, window, block)[0].shape == (t, (window - 1) // block + 2)

  def gather(q, k, v, indices, key_start, key_end):
    return selected_attention_gather(q, k, v, indices, block, 0.25, key_start=key_start,
                                     key_end=key_end)
  got = nsa.window_through_selection(gather, q, k, v, window, block, starts)
  want = nsa.sliding_window_attention(q, k, v, window, 0.25, starts)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_selection_scores_sum_overlapping_compressed_blocks():
  """Eq. 9 read spatially, Eq. 10 over the GQA group: a loop over token sets."""
  length, stride, block, t, kv, g = 8, 4, 16, 70, 2, 3
  c = nsa.num_compressed_blocks(t, length, stride)
  probs = np.random.default_rng(5).random((1, t, kv * g, c)).astype(np.float32)
  got = np.asarray(nsa.selection_scores(jnp.asarray(probs), kv, length, stride, block))
  want = np.zeros((1, t, kv, -(-t // block)), np.float32)
  for j in range(want.shape[-1]):
    selection_tokens = set(range(j * block, (j + 1) * block))
    for i in range(c):
      if selection_tokens & set(range(i * stride, i * stride + length)):
        want[..., j] += probs[..., i].reshape(1, t, kv, g).sum(-1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_select_blocks_forced_causal_top_n():
  block, top_n, t = 8, 4, 61
  scores = np.random.default_rng(6).random((2, t, 3, -(-t // block))).astype(np.float32)
  got = np.asarray(nsa.select_blocks(jnp.asarray(scores), top_n, block))
  for b, pos, h in np.ndindex(2, t, 3):
    own = pos // block
    forced = {0, own, max(own - 1, 0)}
    rest = sorted(set(range(own + 1)) - forced, key=lambda j: -scores[b, pos, h, j])
    want = forced | set(rest[:top_n - len(forced)])
    chosen = [j for j in got[b, pos, h] if j >= 0]
    assert len(chosen) == len(set(chosen)) == min(top_n, own + 1)
    assert set(chosen) == want
    assert np.all(got[b, pos, h][len(chosen):] == -1)


def _future_changes_nothing(branch, t_cut, *arrays):
  """branch(*arrays) -> [B,T,...]. Perturbing keys/values at positions > t_cut changes
  neither the outputs at <= t_cut nor the gradients those outputs send to positions <= t_cut."""
  rng = np.random.default_rng(7)
  changed = [a.copy() for a in arrays]
  for i in range(1, len(changed)):  # arrays[0] is q; the rest are keys / values
    changed[i][:, t_cut + 1:] = rng.normal(size=changed[i][:, t_cut + 1:].shape)

  def past_loss(*xs):
    out = branch(*xs)[:, :t_cut + 1]
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
  out_a, out_b = branch(*arrays), branch(*changed)
  np.testing.assert_allclose(out_a[:, :t_cut + 1], out_b[:, :t_cut + 1], atol=1e-6)
  grads_a = jax.grad(past_loss, argnums=range(len(arrays)))(*arrays)
  grads_b = jax.grad(past_loss, argnums=range(len(arrays)))(*changed)
  for ga, gb in zip(grads_a, grads_b):
    np.testing.assert_allclose(ga[:, :t_cut + 1], gb[:, :t_cut + 1], atol=1e-6)


@pytest.mark.parametrize("t_cut", [0, 13, 30])
def test_branches_are_causal(t_cut):
  q, k, v = _qkv(8, 1, 41, 2, 2)
  _future_changes_nothing(lambda q, k, v: nsa.sliding_window_attention(q, k, v, 9, 0.3),
                          t_cut, q, k, v)
  indices = _random_selection(9, 1, 41, 2, 4, 8)
  _future_changes_nothing(
      lambda q, k, v: selected_attention_gather(q, k, v, indices, 8, 0.3), t_cut, q, k, v)

  def compression(q, k, v):  # mean pooling stands in for phi here; the layer test uses phi
    k_cmp = nsa.block_windows(k, 8, 4).mean(axis=3)
    v_cmp = nsa.block_windows(v, 8, 4).mean(axis=3)
    return nsa.compression_attention(q, k_cmp, v_cmp, 8, 4, 0.3)[0]
  _future_changes_nothing(compression, t_cut, q, k, v)


def _branch_inputs(seed, t):
  """An NSA config with small blocks (l=8, d=4, l'=8, n=3, w=10), an RNG, and branch_outputs'
  inputs for B=2, T=t, 2 KV heads of 3 query heads: q, the selection/window keys and values
  [2,B,T,KV,*], and mean-pooled compressed keys/values."""
  from dsjax.config import NSAConfig
  cfg = NSAConfig(num_kv_heads=2, head_dim=16, v_head_dim=12, compress_block=8,
                  compress_stride=4, select_block=8, num_selected=3, window=10)
  q, k, v = _qkv(seed, 2, t, 2, 3)
  rng = np.random.default_rng(seed + 1)
  keys = jnp.asarray(np.stack([k, rng.normal(size=k.shape).astype(np.float32)]))
  values = jnp.asarray(np.stack([v, rng.normal(size=v.shape).astype(np.float32)]))
  k_cmp = nsa.block_windows(k, 8, 4).mean(axis=3)
  v_cmp = nsa.block_windows(v, 8, 4).mean(axis=3)
  return cfg, rng, (q, keys, values, k_cmp, v_cmp)


@pytest.mark.parametrize("chunk, stages", [(16, 2), (20, 16), (24, 1)])
def test_branches_in_query_chunks_equal_whole_sequence(chunk, stages):
  """branch_outputs over query chunks (scanned in stages, each chunk reading only the keys
  it can see, as long sequences are processed) equals one pass over the whole sequence, in
  value and in gradient. Chunks 16 and 24 split the window (10) into blocks of 2; 20 holds
  two whole windows; 2 and 1 stages scan several chunks per stage, 16 one per stage."""
  cfg, rng, (q, keys, values, k_cmp, v_cmp) = _branch_inputs(10, 70)

  def select(q, k, v, indices, offset, starts):
    return selected_attention_gather(q, k, v, indices, 8, 0.25, query_offset=offset,
                                     key_start=starts)
  whole, whole_idx = nsa.branch_outputs(q, keys, values, k_cmp, v_cmp, cfg, 0.25, select)
  parts, parts_idx = nsa.branch_outputs(q, keys, values, k_cmp, v_cmp, cfg, 0.25, select,
                                        query_chunk=chunk, stages=stages)
  np.testing.assert_array_equal(whole_idx, parts_idx)
  np.testing.assert_allclose(whole, parts, atol=1e-5)

  cotangent = jnp.asarray(rng.normal(size=whole.shape).astype(np.float32))
  def loss(q, keys, values, k_cmp, v_cmp, query_chunk):
    outs, _ = nsa.branch_outputs(q, keys, values, k_cmp, v_cmp, cfg, 0.25, select,
                                 query_chunk=query_chunk, stages=stages)
    return jnp.sum(outs * cotangent)
  grads = [jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, keys, values, k_cmp, v_cmp, c)
           for c in (None, chunk)]
  for g_whole, g_parts in zip(*grads):
    np.testing.assert_allclose(g_whole, g_parts, atol=1e-5)


@pytest.mark.parametrize("query_chunk, packed", [(None, False), (16, True)],
                         ids=["whole-one_doc", "chunked-packed"])
def test_branches_through_one_block_sparse_attention(query_chunk, packed):
  """attend_selected (the kernel's interface; here the gather path, which takes key_start
  and key_end too) computing all three branches, compression and window as block
  selections, with the selection scores in query chunks and no gradient, gives the XLA
  branches' outputs, indices and gradients (queries before the first compressed block
  included: their compression output is 0)."""
  cfg, rng, (q, keys, values, k_cmp, v_cmp) = _branch_inputs(13, 61)
  starts = _packed_starts(2, 61, (13, 30)) if packed else None

  def select(q, k, v, indices, offset, starts):
    return selected_attention_gather(q, k, v, indices, 8, 0.25, query_offset=offset,
                                     key_start=starts)

  def attend_selected(q, k, v, indices, key_start, key_end):
    return selected_attention_gather(q, k, v, indices, 8, 0.25, key_start=key_start,
                                     key_end=key_end)
  cotangent = jnp.asarray(rng.normal(size=(3, 2, 61, 6, 12)).astype(np.float32))

  def run(q, keys, values, k_cmp, v_cmp, through_selection):
    outs, indices = nsa.branch_outputs(
        q, keys, values, k_cmp, v_cmp, cfg, 0.25, select, starts=starts,
        query_chunk=query_chunk if through_selection else None,
        attend_selected=attend_selected if through_selection else None)
    return jnp.sum(outs * cotangent), (outs, indices)
  (_, (want, want_idx)), want_grads = jax.value_and_grad(run, (0, 1, 2, 3, 4), has_aux=True)(
      q, keys, values, k_cmp, v_cmp, False)
  (_, (got, got_idx)), got_grads = jax.value_and_grad(run, (0, 1, 2, 3, 4), has_aux=True)(
      q, keys, values, k_cmp, v_cmp, True)
  np.testing.assert_array_equal(got_idx, want_idx)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(np.asarray(got[0, :, :7]) == 0)  # no compressed block ends before position 7
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, atol=1e-4)
