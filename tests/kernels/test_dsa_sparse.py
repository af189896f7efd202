"""pallas_kernels.dsa: DeepSeek-V3.2's token-sparse MLA. A per-query float64 numpy loop, the
dense-mask oracle and the gather oracle agree; the TPU (Mosaic) and GPU (Triton) kernels, run
in Pallas' interpreter on CPU, equal them in the output, the log-sum-exp and both gradients.
The TPU interpreter also checks every DMA and SMEM read for bounds. That the kernels compile
for TPUs and H100 at V3.2's shapes is tests/kernels/test_dsa_kernel_compile.py's part."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dsa import (BlockSizes, selection_mask, sparse_mla, sparse_mla_gather,
                                sparse_mla_reference)
from pallas_kernels.dsa import tpu_common

BACKENDS = ["tpu", "gpu"]
# Small chunks, steps and backward calls: an index list spans several chunks (TPU 8 rows,
# GPU 16), a sequence several TPU grid steps and backward kernel calls.
TILING = BlockSizes(block_k=8, queries_per_step=8, gpu_block_k=16, gpu_block_h=16,
                    backward_queries=8)


def causal_indices(rng, b, t, s, k, doc_starts=None, mixed=False):
  """int32 [B,T,K]: query t (at key position t + S - T) picks min(K, visible) distinct keys,
  in random order, among the positions of its document up to its own; -1 after them
  (trailing, as dsa.top_k leaves them when K exceeds the visible keys) or, with `mixed`,
  scattered among them. doc_starts int [B,T] (None: one document per row)."""
  idx = np.full((b, t, k), -1, np.int32)
  offset = s - t
  for bi, ti in np.ndindex(b, t):
    first = 0 if doc_starts is None else doc_starts[bi, ti]
    keys = rng.permutation(np.arange(first, ti + offset + 1))[:k]
    slots = rng.permutation(k)[:len(keys)] if mixed else np.arange(len(keys))
    idx[bi, ti, slots] = keys
  return idx


def document_starts(rng, b, t):
  """int [B,T]: each query's document start, at drawn boundaries."""
  starts = np.zeros((b, t), np.int32)
  for bi in range(b):
    for boundary in np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False)):
      starts[bi, boundary:] = boundary
  return starts


def loop_oracle(q, latent, idx, scale, v_dim):
  """Query by query in float64, over the listed keys (shares no code with reference.py) ->
  (out [B,T,N,C], lse [B,T,N])."""
  q, latent, idx = np.asarray(q, np.float64), np.asarray(latent, np.float64), np.asarray(idx)
  b, t, n, _ = q.shape
  out, lse = np.zeros((b, t, n, v_dim)), np.full((b, t, n), -np.inf)
  for bi, ti in np.ndindex(b, t):
    keys = [j for j in idx[bi, ti] if 0 <= j < latent.shape[1]]
    if keys:
      rows = latent[bi, keys]
      logits = q[bi, ti] @ rows.T * scale
      top = logits.max(-1, keepdims=True)
      w = np.exp(logits - top)
      out[bi, ti] = w @ rows[:, :v_dim] / w.sum(-1, keepdims=True)
      lse[bi, ti] = top[:, 0] + np.log(w.sum(-1))
  return out, lse


def _operands(seed, b, t, s, n, d, c, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, d)), dtype)
  latent = jnp.asarray(rng.normal(size=(b, s, d)), dtype)
  # bf16-exact weights, so that a bf16 backward sees the oracle's numbers.
  w = jnp.asarray(rng.normal(size=(b, t, n, c)), jnp.bfloat16).astype(jnp.float32)
  w_lse = jnp.asarray(rng.normal(size=(b, t, n)), jnp.bfloat16).astype(jnp.float32)
  return rng, q, latent, w, w_lse


def _run(fn, q, latent, w, w_lse=None):
  """fn(q, latent) -> (out, lse); -> (out, lse, dq, dlatent), the gradients of sum(w * out)
  (+ sum(w_lse * lse) when given)."""
  @jax.jit
  def run(q, latent, w, w_lse):
    (out, lse), vjp = jax.vjp(fn, q, latent)
    return out, lse, *vjp((w.astype(out.dtype), w_lse))
  if w_lse is None:
    w_lse = jnp.zeros(w.shape[:-1], jnp.float32)
  return run(q, latent, w, w_lse)


def _f32(x):
  return np.asarray(x, np.float32)


def kernel_fn(backend, idx, scale, v_dim, tiling=TILING):
  def fn(q, latent):
    return sparse_mla(q, latent, idx, scale, v_dim, backend=backend, interpret=True,
                      block_sizes=tiling, return_lse=True)
  return fn


def _dense(idx, scale, v_dim):
  return lambda q, latent: sparse_mla_reference(q, latent, idx, scale, v_dim, return_lse=True)


def check_against_oracles(fn, q, latent, idx, w, scale, v_dim, w_lse=None):
  """fn's output and lse == loop oracle == dense oracle == gather oracle (f32 1e-5); its
  gradients == the dense oracle's autodiff (1e-4), finite; queries with no key give exactly
  0, lse -inf and dq 0. -> fn's (out, lse, dq, dlatent)."""
  out, lse, dq, dlat = _run(fn, q, latent, w, w_lse)
  want_out, want_lse = loop_oracle(q, latent, idx, scale, v_dim)
  dense = _run(_dense(idx, scale, v_dim), q, latent, w, w_lse)
  gathered = sparse_mla_gather(q, latent, idx, scale, v_dim)
  for got in (out, dense[0], gathered):
    np.testing.assert_allclose(_f32(got), want_out, atol=1e-5)
  np.testing.assert_allclose(_f32(lse), want_lse, atol=1e-5)
  empty = ~np.any(np.asarray(idx) >= 0, axis=-1)
  assert empty.any() and np.all(_f32(out)[empty] == 0) and np.all(_f32(dq)[empty] == 0)
  assert np.all(np.isneginf(_f32(lse)[empty]))
  for got, ref in ((dq, dense[2]), (dlat, dense[3])):
    assert np.all(np.isfinite(_f32(got)))
    np.testing.assert_allclose(_f32(got), _f32(ref), atol=1e-4)
  return out, lse, dq, dlat


def _with_empty_rows(idx):
  """Queries (0, 3) and (last batch row, 0) select nothing."""
  idx = idx.copy()
  idx[0, 3] = -1
  idx[-1, 0] = -1
  return idx


# (name, B, T, S, N, D, C, K, mixed): S = T and S > T (a cached prefix); K beyond the keys a
# query sees (trailing -1s) or -1s scattered; N not a multiple of the GPU's 16-head block;
# C and R = D - C odd (padded planes / tiles); no rope part (D = C).
CONFIGS = [("causal", 2, 20, 20, 4, 24, 16, 20, False),
           ("prefix_mixed", 1, 12, 17, 8, 40, 32, 12, True),
           ("odd_heads_dims", 1, 10, 10, 20, 20, 13, 9, True),
           ("no_rope", 1, 9, 9, 2, 16, 16, 6, False)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_matches_oracles_f32(backend, config):
  _, b, t, s, n, d, c, k, mixed = config
  rng, q, latent, w, _ = _operands(sum(config[1:8]), b, t, s, n, d, c)
  idx = _with_empty_rows(causal_indices(rng, b, t, s, k, mixed=mixed))
  assert np.any(np.asarray(idx)[..., -1] < 0) and np.any(np.asarray(idx)[..., -1] >= 0)
  scale = 0.7 * d ** -0.5
  check_against_oracles(kernel_fn(backend, idx, scale, c), q, latent, idx, w, scale, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_with_packed_documents(backend):
  """Packed rows: each query selects only keys of its own document (some documents shorter
  than K, so -1s trail); rows of keys no query selected get exactly zero gradient."""
  b, t, n, d, c, k = 2, 16, 4, 24, 16, 6
  rng, q, latent, w, _ = _operands(3, b, t, t, n, d, c)
  starts = document_starts(rng, b, t)
  idx = _with_empty_rows(causal_indices(rng, b, t, t, k, doc_starts=starts))
  valid = idx >= 0
  assert np.all(~valid | ((idx >= starts[..., None]) & (idx <= np.arange(t)[:, None])))
  dlat = check_against_oracles(kernel_fn(backend, idx, 0.3, c), q, latent, idx, w, 0.3, c)[3]
  unselected = ~np.asarray(selection_mask(jnp.asarray(idx), t))
  unselected = unselected.all(axis=1)  # [B,S]: no query of the row selected the key
  assert unselected.any() and np.all(_f32(dlat)[unselected] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_lse(backend):
  """return_lse: a loss on the log-sum-exp too (its cotangent enters dS as + dlse * P)."""
  b, t, n, d, c, k = 1, 10, 4, 24, 16, 8
  rng, q, latent, w, w_lse = _operands(5, b, t, t, n, d, c)
  idx = causal_indices(rng, b, t, t, k, mixed=True)
  got = _run(kernel_fn(backend, idx, 0.25, c), q, latent, w, w_lse)
  want = _run(_dense(idx, 0.25, c), q, latent, w, w_lse)
  for x, y in zip(got[2:], want[2:]):
    np.testing.assert_allclose(_f32(x), _f32(y), atol=1e-4)
  without = _run(_dense(idx, 0.25, c), q, latent, w)
  assert np.abs(_f32(without[2]) - _f32(got[2])).max() > 1e-2  # the lse term matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_bf16_close_to_f32_oracle(backend):
  """bf16 operands: output, lse and both gradients within 5e-3 relative RMSE of the f32
  oracle on the same (bf16-valued) numbers."""
  b, t, s, n, d, c, k = 1, 16, 16, 8, 40, 32, 12
  rng, q, latent, w, _ = _operands(7, b, t, s, n, d, c, jnp.bfloat16)
  idx = causal_indices(rng, b, t, s, k, mixed=True)
  got = _run(kernel_fn(backend, idx, d ** -0.5, c), q, latent, w)
  want = _run(_dense(idx, d ** -0.5, c), q.astype(jnp.float32), latent.astype(jnp.float32), w)
  assert got[0].dtype == got[2].dtype == got[3].dtype == jnp.bfloat16
  for x, y in zip(got, want):
    x, y = _f32(x), _f32(y)
    finite = np.isfinite(y)
    assert np.all(x[~finite] == y[~finite])
    x, y = x[finite], y[finite]
    assert np.sqrt(np.mean((x - y) ** 2) / np.mean(y ** 2)) < 5e-3


def test_repeated_index_counts_twice():
  """A row listing a key twice gives it twice the weight, in the forward, dq and (TPU)
  dlatent, as the gather oracle does and the dense-mask oracle does not. (The GPU's rows
  kernel adds a repeated row twice when compiled; its interpreter's atomics add once.)"""
  b, t, n, d, c = 1, 8, 4, 24, 16
  rng, q, latent, w, _ = _operands(9, b, t, t, n, d, c)
  idx = causal_indices(rng, b, t, t, 4)
  idx[:, 2:, 3] = idx[:, 2:, 0]
  gathered = _run(lambda q, l: sparse_mla_gather(q, l, idx, 0.3, c, return_lse=True), q,
                  latent, w)
  dense = _run(_dense(idx, 0.3, c), q, latent, w)
  assert np.abs(_f32(gathered[0]) - _f32(dense[0])).max() > 1e-2
  for backend, outputs in (("tpu", 4), ("gpu", 3)):
    got = _run(kernel_fn(backend, idx, 0.3, c), q, latent, w)
    for x, y in list(zip(got, gathered))[:outputs]:
      np.testing.assert_allclose(_f32(x), _f32(y), atol=1e-4)


def _shifted(idx, num_keys):
  return np.where(idx >= 0, np.minimum(idx + 1, num_keys - 1), idx)


@pytest.mark.parametrize("mistake", ["scale", "off_by_one", "channel_shift", "grad_scale"])
def test_the_checks_catch_mistakes(mistake):
  """check_against_oracles fails on a deliberately wrong implementation (the gather oracle
  with the scale 1% off, every index one row later, the latent's channels rolled by one,
  or its latent gradient 1% off): the tolerances are tight enough to see each."""
  b, t, n, d, c, k = 1, 10, 4, 24, 16, 8
  rng, q, latent, w, _ = _operands(11, b, t, t, n, d, c)
  idx = _with_empty_rows(causal_indices(rng, b, t, t, k))

  @jax.custom_vjp
  def scaled_grad(latent):
    return latent

  scaled_grad.defvjp(lambda x: (x, None), lambda _, g: (g * 1.01,))
  wrong = {
      "scale": lambda q, l: sparse_mla_gather(q, l, idx, 0.3 * 1.01, c, return_lse=True),
      "off_by_one": lambda q, l: sparse_mla_gather(q, l, _shifted(idx, t), 0.3, c,
                                                   return_lse=True),
      "channel_shift": lambda q, l: (
          sparse_mla_gather(q, jnp.roll(l, -1, axis=-1), idx, 0.3, c, return_lse=True)[0],
          sparse_mla_gather(q, l, idx, 0.3, c, return_lse=True)[1]),
      "grad_scale": lambda q, l: sparse_mla_gather(q, scaled_grad(l), idx, 0.3, c,
                                                   return_lse=True),
  }[mistake]
  check_against_oracles(lambda q, l: sparse_mla_gather(q, l, idx, 0.3, c, return_lse=True),
                        q, latent, idx, w, 0.3, c)  # the right one passes
  with pytest.raises(AssertionError):
    check_against_oracles(wrong, q, latent, idx, w, 0.3, c)


@pytest.mark.parametrize("dim,v_dim", [(24, 16), (20, 13), (16, 16), (576, 512)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_planes_round_trip(dim, v_dim, dtype):
  """The TPU layout: to_planes / from_planes are inverse, and the packed 32-bit words unpack
  bit-exactly to the planes (two bf16 channels per word)."""
  planes = tpu_common.planes_for(dim, v_dim, dtype)
  x = jnp.asarray(np.random.default_rng(dim).normal(size=(2, 5, dim)), dtype)
  np.testing.assert_array_equal(tpu_common.from_planes(tpu_common.to_planes(x, planes), planes),
                                x)
  values = x[..., :v_dim]
  np.testing.assert_array_equal(
      tpu_common.from_planes(tpu_common.to_planes(values, planes, True), planes, True), values)
  words = tpu_common.to_words(x, planes)
  assert words.dtype.itemsize == 4 and words.shape == (2, 5, planes.width)
  unpacked = jnp.stack(tpu_common.from_words(words, planes, dtype), axis=-2)
  np.testing.assert_array_equal(unpacked, tpu_common.to_planes(x, planes))


def test_bad_operands_name_the_problem():
  _, q, latent, _, _ = _operands(0, 1, 8, 8, 2, 24, 16)
  idx = jnp.zeros((1, 8, 4), jnp.int32)

  def call(q=q, latent=latent, idx=idx, scale=0.5, v_dim=16, **kwargs):
    return sparse_mla(q, latent, idx, scale, v_dim, interpret=True, **kwargs)
  with pytest.raises(ValueError, match=r"must be \[B,T,N,D\], \[B,S,D\], \[B,T,K\]"):
    call(q=q[0])
  with pytest.raises(ValueError, match="differ in batch or channels"):
    call(latent=latent[..., :20])
  with pytest.raises(ValueError, match="differ in batch or channels"):
    call(latent=jnp.concatenate([latent, latent]))
  with pytest.raises(ValueError, match=r"indices \(1, 7, 4\) must be \[B,T,K\]"):
    call(idx=idx[:, :7])
  with pytest.raises(ValueError, match="must be integers"):
    call(idx=idx.astype(jnp.float32))
  with pytest.raises(ValueError, match="cast both to bfloat16 or both to float32"):
    call(latent=latent.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="cast both to bfloat16 or both to float32"):
    call(q=q.astype(jnp.float16), latent=latent.astype(jnp.float16))
  for v_dim in (0, 25, 16.0):
    with pytest.raises(ValueError, match="v_dim="):
      call(v_dim=v_dim)
  with pytest.raises(ValueError, match="scale must be a Python number"):
    call(scale=jnp.float32(0.5))
  with pytest.raises(ValueError, match="backend="):
    call(backend="cpu")
  with pytest.raises(ValueError, match="block_k=12; use a multiple of 8"):
    BlockSizes(block_k=12)
  with pytest.raises(ValueError, match="queries_per_step=12; use a power of two >= 8"):
    BlockSizes(queries_per_step=12)
  with pytest.raises(ValueError, match="gpu_block_h=8; use a power of two >= 16"):
    BlockSizes(gpu_block_h=8)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="pass interpret=True"):
      sparse_mla(q, latent, idx, 0.5, 16)
