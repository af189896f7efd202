"""pallas_kernels.nsa: NSA's selected-block attention. A per-query numpy loop, the dense-mask
oracle and the gather path agree; the TPU (Mosaic) and GPU (Triton) kernels, run in Pallas'
interpreter on CPU, equal them forward and in all three gradients. The TPU interpreter costs
about 1 ms per DMA, so its shapes are small; that the kernels compile for TPUs and H100s at
64k tokens is tests/kernels/test_kernel_compile.py's part."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.nsa import (BlockSizes, block_query_lists, selected_attention,
                                selected_attention_gather, selected_attention_reference)

BACKENDS = ["tpu", "gpu"]
# Small TPU steps so that a sequence spans several grid steps and the dk/dv lists several
# SMEM chunks.
TILING = BlockSizes(queries_per_step=16, list_chunk=8)


def nsa_selection(rng, b, t, h, s, block_size, future=False):
  """Top-n-like rows: distinct blocks <= t // block_size (or any block, even past the end,
  with `future`), -1 in the unused slots, in random slot order. Some rows hold the query's
  own block, some omit it, and the last query of (batch 0, head 0) selects nothing."""
  idx = np.full((b, t, h, s), -1, np.int32)
  num_blocks = -(-t // block_size)
  for bi, ti, hi in np.ndindex(b, t, h):
    pool = num_blocks + 2 if future else ti // block_size + 1
    n = rng.integers(0, min(s, pool) + 1)
    idx[bi, ti, hi, rng.permutation(s)[:n]] = rng.permutation(pool)[:n]
  idx[0, t - 1, 0] = -1
  return jnp.asarray(idx)


def _assert_rows_with_and_without_own_block(idx, block_size):
  idx = np.asarray(idx)
  own = (idx == (np.arange(idx.shape[1]) // block_size)[None, :, None, None]).any(-1)
  assert own.any() and (~own & (idx >= 0).any(-1)).any()


def document_starts(rng, b, t):
  """Packed rows: int32 [B,T], each query's document start, at drawn boundaries (most not on a
  block boundary), and -1 for a padded tail on row 0."""
  starts = np.zeros((b, t), np.int32)
  for bi in range(b):
    bounds = np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False))
    for boundary in bounds:
      starts[bi, boundary:] = boundary
  starts[0, t - t // 8:] = -1
  return jnp.asarray(starts)


def loop_oracle(q, k, v, idx, block_size, scale, key_start=None, key_end=None):
  """Query by query in float64: the allowed keys are listed explicitly (an oracle that shares
  no code with reference.py)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  idx = np.asarray(idx)
  b, t, hq, _ = q.shape
  first = np.zeros((b, t), int) if key_start is None else np.asarray(key_start)
  last = np.broadcast_to(np.arange(t), (b, t)) if key_end is None else np.asarray(key_end)
  g = hq // k.shape[2]
  out = np.zeros((b, t, hq, v.shape[-1]))
  for bi, ti, qh in np.ndindex(b, t, hq):
    keys = sorted({p for j in idx[bi, ti, qh // g] if j >= 0
                   for p in range(j * block_size, (j + 1) * block_size)
                   if first[bi, ti] <= p <= last[bi, ti]})
    if keys:
      logits = k[bi, keys, qh // g] @ q[bi, ti, qh] * scale
      w = np.exp(logits - logits.max())
      out[bi, ti, qh] = w @ v[bi, keys, qh // g] / w.sum()
  return out


def _operands(seed, b, t, h, g, d, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h * g, h, h))
  # A bf16-exact cotangent, so a bf16 backward sees the oracle's numbers.
  cot = jnp.asarray(rng.normal(size=(b, t, h * g, d)), jnp.bfloat16).astype(jnp.float32)
  return rng, q, k, v, cot


def _value_and_grads(fn, q, k, v, idx, cot, key_start=None, key_end=None):
  @jax.jit
  def run(q, k, v, idx, cot, key_start, key_end):
    extra = {name: x for name, x in (("key_start", key_start), ("key_end", key_end))
             if x is not None}
    o, vjp = jax.vjp(lambda *qkv: fn(*qkv, idx, **extra), q, k, v)
    return o, vjp(cot.astype(o.dtype))
  return run(q, k, v, idx, cot, key_start, key_end)


def _f32(x):
  return np.asarray(x, np.float32)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 40), block_size=st.sampled_from([4, 8, 16]), s=st.integers(1, 6),
       g=st.sampled_from([1, 2, 4]), future=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
def test_oracles_agree(packed, t, block_size, s, g, future, seed):
  """The dense-mask oracle and the gather path equal the per-query loop, including blocks
  past the query or past the end (which add nothing) and, in packed rows, blocks before the
  query's document; their autodiff gradients agree."""
  rng, q, k, v, cot = _operands(seed, 1, t, 2, g, 8)
  idx = nsa_selection(rng, 1, t, 2, s, block_size, future)
  starts = document_starts(rng, 1, t) if packed else None
  dense, gathered = (
      _value_and_grads(lambda *a, f=f, **kw: f(*a, block_size, **kw), q, k, v, idx, cot, starts)
      for f in (selected_attention_reference, selected_attention_gather))
  want = loop_oracle(q, k, v, idx, block_size, 8 ** -0.5, starts)
  np.testing.assert_allclose(_f32(dense[0]), want, atol=1e-5)
  np.testing.assert_allclose(_f32(gathered[0]), want, atol=1e-5)
  for got, ref in zip(gathered[1], dense[1]):
    assert np.all(np.isfinite(_f32(got)))
    np.testing.assert_allclose(_f32(got), _f32(ref), atol=1e-5)


# (B, T, H, G, D, block_size, S, tiling): T not a multiple of block_size, S beyond the
# available blocks (40 tokens hold 5 blocks of 8), G in {1, 4, 16}; the default tiling once
# (on TPU one grid step of 64 queries, 27 of them padding).
CONFIGS = [(1, 40, 2, 1, 16, 8, 8, TILING), (2, 45, 1, 4, 32, 16, 3, TILING),
           (1, 37, 1, 16, 16, 8, 4, None)]


@pytest.mark.parametrize("config", CONFIGS,
                         ids=lambda c: "B{}T{}H{}G{}D{}l{}S{}".format(*c[:7]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_matches_oracles_f32(backend, config):
  b, t, h, g, d, block_size, s, tiling = config
  rng, q, k, v, cot = _operands(sum(config[:7]), b, t, h, g, d)
  idx = nsa_selection(rng, b, t, h, s, block_size)
  _assert_rows_with_and_without_own_block(idx, block_size)

  _check_kernel_against_oracles(backend, q, k, v, idx, cot, block_size, tiling)


def _check_kernel_against_oracles(backend, q, k, v, idx, cot, block_size, tiling,
                                  key_start=None, key_end=None):
  """Kernel == loop oracle == dense oracle == gather path (f32 1e-5), and the kernel's three
  gradients == the dense oracle's autodiff gradients (1e-4)."""
  t, g, d = q.shape[1], q.shape[2] // k.shape[2], q.shape[-1]

  def kernel(q, k, v, idx, **key_range):
    return selected_attention(q, k, v, idx, block_size, tiling=tiling, interpret=True,
                              backend=backend, **key_range)
  o, grads = _value_and_grads(kernel, q, k, v, idx, cot, key_start, key_end)
  o_ref, grads_ref = _value_and_grads(
      lambda *a, **kw: selected_attention_reference(*a, block_size, **kw), q, k, v, idx, cot,
      key_start, key_end)
  np.testing.assert_allclose(
      _f32(o), loop_oracle(q, k, v, idx, block_size, d ** -0.5, key_start, key_end),
      atol=1e-5)
  np.testing.assert_allclose(_f32(o), _f32(o_ref), atol=1e-5)
  gathered = selected_attention_gather(q, k, v, idx, block_size, key_start=key_start,
                                       key_end=key_end)
  np.testing.assert_allclose(_f32(o), _f32(gathered), atol=1e-5)
  if np.all(np.asarray(idx)[0, t - 1, 0] < 0):  # a query that selected nothing
    assert np.all(_f32(o)[0, t - 1, :g] == 0)
  for got, want in zip(grads, grads_ref):
    assert np.all(np.isfinite(_f32(got)))
    np.testing.assert_allclose(_f32(got), _f32(want), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_with_document_starts_matches_oracles(backend):
  """Packed rows (key_start): documents starting mid-block, selected blocks wholly or partly
  before the query's document (skipped or cut at its start), a padded tail (-1); values and
  all three gradients."""
  b, t, h, g, d, block_size, s = 2, 45, 1, 4, 16, 8, 4
  rng, q, k, v, cot = _operands(11, b, t, h, g, d)
  idx = nsa_selection(rng, b, t, h, s, block_size)
  starts = document_starts(rng, b, t)
  np_idx, np_starts = np.asarray(idx), np.asarray(starts)
  before = (np_idx >= 0) & ((np_idx + 1) * block_size <= np_starts[:, :, None, None])
  cut = (np_idx >= 0) & (np_idx * block_size < np_starts[:, :, None, None]) & ~before
  assert before.any() and cut.any()
  _check_kernel_against_oracles(backend, q, k, v, idx, cot, block_size, TILING, starts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_with_key_ends_matches_oracles(backend):
  """key_end in place of the query's position, as for NSA's compressed keys (key i = block
  i*d .. i*d+l-1, visible from position i*d+l-1 on; l=8, d=4): query t reads keys up to
  (t-7)//4, every block selected; the first 7 queries read none. Document starts mapped to
  compressed keys (ceil(start/4)) are the key starts, some past the key end (no key);
  values and all three gradients."""
  b, t, h, g, d, block_size = 2, 40, 1, 4, 16, 8
  rng, q, k, v, cot = _operands(12, b, t, h, g, d)
  num_blocks = -(-t // block_size)
  idx = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32), (b, t, h, num_blocks))
  key_end = jnp.broadcast_to((jnp.arange(t) - 7) // 4, (b, t)).astype(jnp.int32)
  starts = (jnp.maximum(document_starts(rng, b, t), 0) + 3) // 4
  assert bool(jnp.any(starts > key_end)) and bool(jnp.any((starts > 0) & (starts <= key_end)))
  _check_kernel_against_oracles(backend, q, k, v, idx, cot, block_size, TILING, starts,
                                key_end)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_bf16_close_to_f32_oracle(backend):
  """bf16 operands: output and gradients within 5e-3 relative RMSE of the f32 oracle on the
  same (bf16-valued) numbers. block_size 16: a whole bf16 sublane tile on TPU."""
  b, t, h, g, d, block_size, s = 1, 48, 1, 4, 32, 16, 3
  rng, q, k, v, cot = _operands(7, b, t, h, g, d, jnp.bfloat16)
  idx = nsa_selection(rng, b, t, h, s, block_size)
  got = _value_and_grads(
      lambda *a: selected_attention(*a, block_size, tiling=TILING, interpret=True,
                                    backend=backend), q, k, v, idx, cot)
  want = _value_and_grads(lambda *a: selected_attention_reference(*a, block_size),
                          *(x.astype(jnp.float32) for x in (q, k, v)), idx, cot)
  assert got[0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = _f32(x), _f32(y)
    assert np.sqrt(np.mean((x - y) ** 2) / np.mean(y ** 2)) < 5e-3


@settings(max_examples=5, deadline=None)
@given(t=st.integers(2, 40), block_size=st.sampled_from([8, 16]), s=st.integers(1, 6),
       g=st.sampled_from([1, 2, 8]), future=st.booleans(), seed=st.integers(0, 2**16))
def test_gpu_kernel_forward_over_drawn_shapes(t, block_size, s, g, future, seed):
  """The Triton kernel (its interpreter is cheap) over drawn shapes, including selected
  blocks past the query or past the end of the sequence."""
  rng, q, k, v, _ = _operands(seed, 1, t, 2, g, 16)
  idx = nsa_selection(rng, 1, t, 2, s, block_size, future)
  o = selected_attention(q, k, v, idx, block_size, interpret=True, backend="gpu")
  np.testing.assert_allclose(_f32(o), loop_oracle(q, k, v, idx, block_size, 0.25), atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(t=st.integers(1, 60), block_size=st.sampled_from([4, 8, 16]), s=st.integers(1, 8),
       future=st.booleans(), packed=st.booleans(), seed=st.integers(0, 2**16))
def test_block_query_lists_invert_the_selection(t, block_size, s, future, packed, seed):
  """Block j's list holds, ascending, exactly the queries t whose row selects j with a token
  in t's allowed range: at or before t (or, packed, a drawn key_end <= t) and at or after
  its document start; each entry carries that range. Every other (query, slot) pair is left
  out."""
  rng = np.random.default_rng(seed)
  idx = np.asarray(nsa_selection(rng, 2, t, 3, s, block_size, future))
  first = last = None
  first_np, last_np = np.zeros((2, t), int), np.broadcast_to(np.arange(t), (2, t))
  if packed:
    first = document_starts(rng, 2, t)
    last = jnp.asarray(last_np - rng.integers(0, 3, (2, t)), jnp.int32)
    first_np, last_np = np.asarray(first), np.asarray(last)
  num_blocks = -(-t // block_size)
  lists = map(np.asarray, block_query_lists(jnp.asarray(idx), block_size, num_blocks, first,
                                            last))
  queries, starts, key_starts, key_ends = lists
  for b, h in np.ndindex(2, 3):
    assert starts[b, h, 0] == 0 and np.all(np.diff(starts[b, h]) >= 0)
    for j in range(num_blocks):
      want = [ti for ti in range(t) if j in idx[b, ti, h]
              and max(j * block_size, first_np[b, ti]) <= min((j + 1) * block_size - 1,
                                                              last_np[b, ti])]
      run = slice(starts[b, h, j], starts[b, h, j + 1])
      np.testing.assert_array_equal(queries[b, h, run], want)
      np.testing.assert_array_equal(key_starts[b, h, run], first_np[b, want])
      np.testing.assert_array_equal(key_ends[b, h, run], last_np[b, want])


def test_bad_operands_name_the_problem():
  _, q, k, v, _ = _operands(0, 1, 16, 2, 2, 8)
  idx = jnp.zeros((1, 16, 2, 2), jnp.int32)

  def call(*args, **kwargs):
    return selected_attention(*args, interpret=True, **kwargs)
  with pytest.raises(ValueError, match="not a multiple of"):
    call(q[:, :, :3], k, v, idx, 8)
  with pytest.raises(ValueError, match="block_indices .* must be"):
    call(q, k, v, idx[:, :, :1], 8)
  with pytest.raises(ValueError, match="must be integers"):
    call(q, k, v, idx.astype(jnp.float32), 8)
  with pytest.raises(ValueError, match="key_start .* must be integers of shape"):
    call(q, k, v, idx, 8, key_start=jnp.zeros((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="key_end .* must be integers of shape"):
    call(q, k, v, idx, 8, key_end=jnp.zeros((1, 16), jnp.float32))
  with pytest.raises(ValueError, match="cast them to one dtype"):
    call(q, k.astype(jnp.bfloat16), v, idx, 8)
  with pytest.raises(ValueError, match="use a multiple of 16"):
    call(*(x.astype(jnp.bfloat16) for x in (q, k, v)), idx, 8, backend="tpu")
  with pytest.raises(ValueError, match="backend="):
    call(q, k, v, idx, 8, backend="cpu")
  with pytest.raises(ValueError, match="scale must be a Python number"):
    call(q, k, v, idx, 8, jnp.float32(0.5))
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(queries_per_step=24)
  with pytest.raises(ValueError, match="list_chunk=8 on TPU; use a multiple of 128"):
    selected_attention(q, k, v, idx, 8, tiling=BlockSizes(list_chunk=8), backend="tpu")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="pass interpret=True"):
      selected_attention(q, k, v, idx, 8)
