"""pallas_kernels.gmm: the TPU (Mosaic) and GPU (Triton) kernels, run in Pallas' interpreter on
CPU, equal gmm_reference and lax.ragged_dot, forward and both gradients; the work-item
metadata keeps its invariants. That both kernels compile for TPUs and H100s at DeepSeek-V3's
shapes is tests/kernels/test_kernel_compile.py's part."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.gmm import (BlockSizes, gmm, gmm_reference, make_group_metadata, tgmm,
                                tgmm_reference)

BACKENDS = ["tpu", "gpu"]
# Small tiles so that straddling row tiles, several K steps and N tiles all occur. The TPU
# tiles keep Mosaic's (8, 128) rule; K=200 and N=136 leave ragged last blocks.
TILES = {"tpu": BlockSizes(tm=16, tk=128, tn=128), "gpu": BlockSizes(tm=16, tk=64, tn=64)}
K, N = 200, 136
TOL = {jnp.float32: dict(atol=1e-4, rtol=1e-4), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@st.composite
def group_sizes(draw, max_rows=70):
  """(M, sizes): empty groups, a group holding every row, and rows past sum(sizes)."""
  m = draw(st.integers(1, max_rows))
  g = draw(st.integers(1, 6))
  kind = draw(st.sampled_from(["random", "one_group", "short"]))
  if kind == "one_group":
    sizes = [0] * g
    sizes[draw(st.integers(0, g - 1))] = m
  else:
    cuts = sorted(draw(st.lists(st.integers(0, m), min_size=g - 1, max_size=g - 1)))
    total = m if kind == "random" else draw(st.integers(0, m))
    sizes = np.diff([0] + [min(c, total) for c in cuts] + [total]).tolist()
  return m, sizes


def _operands(seed, m, sizes, dtype, transpose_rhs=False):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, K)) / np.sqrt(K), dtype)
  rhs_shape = (len(sizes), N, K) if transpose_rhs else (len(sizes), K, N)
  rhs = jnp.asarray(rng.normal(size=rhs_shape), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _close(got, want, dtype):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **TOL[dtype])


@settings(max_examples=30, deadline=None)
@given(problem=group_sizes(max_rows=300), tm=st.sampled_from([8, 16, 128]),
       offset=st.integers(0, 5), local=st.integers(1, 6))
def test_metadata_invariants(problem, tm, offset, local):
  m, sizes = problem
  offset, local = min(offset, len(sizes) - 1), min(local, len(sizes) - min(offset, len(sizes) - 1))
  meta = jax.tree.map(np.asarray, make_group_metadata(jnp.asarray(sizes), m, tm, offset, local))
  tiles = -(-m // tm)
  assert len(meta.group_ids) == tiles + local - 1
  assert np.all(np.diff(meta.tile_ids) >= 0) and np.all(np.diff(meta.group_ids) >= 0)
  assert set(meta.tile_ids) == set(range(tiles)) and set(meta.group_ids) == set(range(local))
  # Owned rows: inside the item's tile, and together exactly the local groups' rows, once.
  ends = np.cumsum(sizes)
  starts = ends - np.asarray(sizes)
  owner = np.full(m, -1)
  for g, t, lo, hi in zip(meta.group_ids, meta.tile_ids, meta.row_starts, meta.row_ends):
    assert t * tm <= lo <= hi <= (t + 1) * tm
    assert np.all(owner[lo:hi] == -1)
    owner[lo:hi] = g
  expected = np.full(m, -1)
  for g in range(local):
    expected[starts[offset + g]:min(ends[offset + g], m)] = g
  np.testing.assert_array_equal(owner, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None)
@given(problem=group_sizes(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       transpose_rhs=st.booleans(), seed=st.integers(0, 2**16))
def test_gmm_matches_reference_and_ragged_dot(backend, problem, dtype, transpose_rhs, seed):
  m, sizes = problem
  lhs, rhs, group_sizes_ = _operands(seed, m, sizes, dtype, transpose_rhs)
  got = gmm(lhs, rhs, group_sizes_, jnp.float32, transpose_rhs=transpose_rhs,
            tiling=TILES[backend], interpret=True, backend=backend)
  _close(got, gmm_reference(lhs, rhs, group_sizes_, jnp.float32, transpose_rhs), dtype)
  plain_rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  ragged = jax.lax.ragged_dot(lhs, plain_rhs, group_sizes_,
                              preferred_element_type=jnp.float32)
  _close(got, ragged, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None)
@given(problem=group_sizes(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 2**16))
def test_tgmm_matches_reference(backend, problem, dtype, seed):
  m, sizes = problem
  lhs, _, group_sizes_ = _operands(seed, m, sizes, dtype)
  rhs = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(m, N)), dtype)
  got = tgmm(lhs.T, rhs, group_sizes_, jnp.float32, tiling=TILES[backend], interpret=True,
             backend=backend)
  _close(got, tgmm_reference(lhs.T, rhs, group_sizes_, jnp.float32), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None)
@given(problem=group_sizes(), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       transpose_rhs=st.booleans(), offset=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_gmm_gradients_match_reference(backend, problem, dtype, transpose_rhs, offset, seed):
  """Both gradients, including expert parallelism's view when offset > 0: only groups
  offset.. are local (rhs holds those), so rows of other groups get zero lhs gradient."""
  m, sizes = problem
  offset = min(offset, len(sizes) - 1)
  lhs, rhs, group_sizes_ = _operands(seed, m, sizes, dtype, transpose_rhs)
  rhs = rhs[offset:]

  # A random cotangent that bf16 represents exactly, so that the kernels' bf16 backward
  # (which casts the cotangent to the operands' dtype) sees the same numbers as the oracle.
  cotangent = jnp.asarray(np.random.default_rng(seed + 2).normal(size=(m, N)), jnp.bfloat16)

  def loss(fn, **kwargs):
    return lambda a, b: jnp.sum(cotangent.astype(jnp.float32) * fn(
        a, b, group_sizes_, jnp.float32, transpose_rhs=transpose_rhs, group_offset=offset,
        **kwargs))
  want = jax.grad(loss(gmm_reference), argnums=(0, 1))(lhs, rhs)
  got = jax.grad(loss(gmm, tiling=TILES[backend], interpret=True, backend=backend),
                 argnums=(0, 1))(lhs, rhs)
  for g, w in zip(got, want):
    _close(g, w, dtype)


def test_bad_operands_name_the_problem():
  lhs, rhs, sizes = _operands(0, 10, [4, 6], jnp.float32)
  with pytest.raises(ValueError, match="contracted dims differ"):
    gmm(lhs[:, :5], rhs, sizes, interpret=True)
  with pytest.raises(ValueError, match="group_sizes must be a 1-D integer"):
    gmm(lhs, rhs, sizes.astype(jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="rhs has 2 groups but group_sizes only 1"):
    gmm(lhs, rhs, sizes[:1], interpret=True)
  with pytest.raises(ValueError, match="powers of two"):
    gmm(lhs, rhs, sizes, tiling=BlockSizes(tm=24), interpret=True, backend="gpu")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="pass interpret=True"):
      gmm(lhs, rhs, sizes)
