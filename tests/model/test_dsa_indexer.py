"""The lightning indexer against independent implementations: a NumPy port of DeepSeek's
Indexer.forward (rotate-half RoPE on the first dims, LayerNorm with bias, the H^-0.5 and
D^-0.5 scales), its FP8 mode against a NumPy e4m3 / ue8m0 quantiser written from the format's
definition and DeepSeek's kernel (bit-level power-of-two scales, round-to-nearest-even,
saturation, zero blocks), the blocked top-k against the dense one, and the KL loss."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dsjax.config import DSAConfig
from dsjax.model.dsa import Indexer
from dsjax.ops import dsa as ops
from dsjax.ops.attention import AttentionMask
from dsjax.ops.rope import rope_cos_sin
from tests.model_fixtures import tiny_config


# ---- NumPy references ----

def _e4m3_grid() -> np.ndarray:
  """Every non-negative finite float8_e4m3fn value, in bit-pattern order (bias 7, no inf,
  S.1111.111 is NaN): subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e-7)."""
  values = [m / 8 * 2.0 ** -6 for m in range(8)]
  values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)]
  return np.asarray(values[:-1])  # drop the NaN pattern; max 448


def _round_e4m3(x: np.ndarray) -> np.ndarray:
  """Round to the nearest e4m3 value, ties to the even bit pattern; |x| <= 448 given."""
  grid = _e4m3_grid()
  mag = np.abs(x)
  hi = np.clip(np.searchsorted(grid, mag), 1, len(grid) - 1)
  lo = hi - 1
  d_lo, d_hi = mag - grid[lo], grid[hi] - mag
  pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
  return np.sign(x) * grid[pick]


def _ue8m0(scale: np.ndarray) -> np.ndarray:
  """DeepSeek's fast_round_scale: 2^(exponent - 127 + (mantissa != 0)) from the float32 bits."""
  bits = np.asarray(scale, np.float32).view(np.uint32)
  exponent = ((bits >> 23) & 0xFF).astype(np.int64) - 127
  return np.ldexp(np.float32(1.0), exponent + ((bits & 0x7FFFFF) != 0)).astype(np.float32)


def _act_quant(x: np.ndarray, block: int, power_of_two=True):
  """DeepSeek's act_quant in NumPy: (dequantised values, scales)."""
  xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, block)
  amax = np.maximum(np.abs(xb).max(-1), np.float32(1e-4))
  scale = (amax * np.float32(1 / 448)).astype(np.float32)
  scale = _ue8m0(scale) if power_of_two else scale
  q = _round_e4m3(np.clip(xb / scale[..., None], -448, 448))
  return (q * scale[..., None]).reshape(x.shape), scale


def _sylvester(n: int) -> np.ndarray:
  i = np.arange(n)
  return np.where(np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :]), -1.0, 1.0)


def _rope_half(x, positions, theta, dim):
  """Non-interleaved (rotate-half) rotary on x[..., :dim] with freqs theta^(-2i/dim)."""
  freqs = theta ** (-np.arange(0, dim, 2) / dim)
  angles = positions[..., None] * freqs  # [B,T,dim/2]
  while angles.ndim < x.ndim:
    angles = angles[..., None, :]
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2, rest = x[..., :dim // 2], x[..., dim // 2:dim], x[..., dim:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _deepseek_index_scores(p, x, q_latent, positions, cfg, fp8):
  """DeepSeek-V3.2-Exp inference/model.py Indexer.forward (as fixed), in float64/NumPy."""
  h, d = p["wq_b"].shape[1:]
  r = cfg.mla.qk_rope_head_dim
  q = np.einsum("btq,qhd->bthd", q_latent, p["wq_b"])
  q = _rope_half(q, positions, cfg.rope.theta, r)
  k = x @ p["wk"]
  mu, var = k.mean(-1, keepdims=True), k.var(-1, keepdims=True)
  k = (k - mu) / np.sqrt(var + 1e-6) * p["k_norm/weight"] + p["k_norm/bias"]
  k = _rope_half(k, positions, cfg.rope.theta, r)
  weights = x @ p["weights_proj"] * h ** -0.5
  if not fp8:
    logits = np.maximum(np.einsum("bthd,bsd->bths", q, k), 0) * d ** -0.5
    return np.einsum("bths,bth->bts", logits, weights)
  bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64)
  hadamard = _sylvester(d) * d ** -0.5
  q, k = bf16(bf16(q) @ hadamard), bf16(bf16(k) @ hadamard)
  (q8, q_s), (k8, k_s) = _act_quant(q, min(128, d)), _act_quant(k, min(128, d))
  q8, k8 = q8 / np.repeat(q_s, d // q_s.shape[-1], -1), k8 / np.repeat(k_s, d // k_s.shape[-1], -1)
  # fp8_index: relu(q8 . k8) * (weights * q_scale * softmax_scale), summed over heads, * k_scale
  w = weights * q_s[..., 0] * d ** -0.5
  logits = np.maximum(np.einsum("bthd,bsd->bths", q8, k8), 0)
  return np.einsum("bths,bth->bts", logits, w) * k_s[:, None, :, 0]


# ---- tests ----

def test_quantiser_matches_numpy_e4m3_ue8m0():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 1, (6, 256)) * np.exp(rng.normal(0, 3, (6, 1)))  # blocks of any magnitude
  x[1, :128] = 0.0  # a zero block: amax floors at 1e-4
  x[2, 5] = 1e3  # one large value: the rest of its block goes subnormal
  x = x.astype(np.float32)
  values, scales = ops.quantize_e4m3(jnp.asarray(x), 128)
  want, want_scales = _act_quant(x, 128)
  np.testing.assert_array_equal(np.asarray(scales), want_scales)
  assert np.all(np.log2(want_scales) == np.round(np.log2(want_scales)))  # powers of two
  np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)) * np.repeat(
      np.asarray(scales), 128, -1), want)
  np.testing.assert_array_equal(ops.fp8_round_trip(jnp.asarray(x), 128), want)
  # ties round to even: 1 + 1/16 lies halfway between 1 and 1.125 -> 1; 1 + 3/16 -> 1.25
  tie = np.zeros((1, 128), np.float32)
  tie[0, :3] = [448.0, 1 + 1 / 16, 1 + 3 / 16]  # amax 448 -> scale 1 (exactly a power of two)
  got = np.asarray(ops.fp8_round_trip(jnp.asarray(tie), 128))[0, :3]
  np.testing.assert_array_equal(got, [448.0, 1.0, 1.25])


def test_non_power_of_two_scales_saturate_at_448():
  x = np.zeros((1, 128), np.float32)
  x[0, :2] = [3.0, -3.0]
  values, scales = ops.quantize_e4m3(jnp.asarray(x), 128, power_of_two=False)
  assert float(scales[0, 0]) == np.float32(3.0) * np.float32(1 / 448)
  got = np.asarray(values.astype(jnp.float32))[0, :2]
  np.testing.assert_array_equal(got, [448.0, -448.0])  # clipped, not NaN
  want, _ = _act_quant(x, 128, power_of_two=False)
  np.testing.assert_allclose(got * float(scales[0, 0]), want[0, :2])


def test_hadamard_is_sylvesters_orthonormal_matrix():
  x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
  np.testing.assert_allclose(ops.hadamard(jnp.asarray(x)), x @ _sylvester(64) / 8.0, atol=1e-5)
  np.testing.assert_allclose(ops.hadamard(ops.hadamard(jnp.asarray(x))), x, atol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    ops.hadamard(jnp.zeros((2, 48)))


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_matches_deepseeks_reference(fp8):
  dsa = DSAConfig(index_n_heads=8, index_head_dim=32, index_topk=4,
                  index_precision="fp8" if fp8 else "exact")
  cfg = tiny_config(attention="dsa", dsa=dsa)
  indexer = Indexer(cfg, dsa, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(4)
  indexer.k_norm.weight.set_value(jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32))
  indexer.k_norm.bias.set_value(jnp.asarray(rng.normal(0, 0.3, 32), jnp.float32))
  b, t = 2, 10
  x = rng.normal(size=(b, t, cfg.hidden_size)).astype(np.float32)
  q_latent = rng.normal(size=(b, t, cfg.mla.q_lora_rank)).astype(np.float32)
  positions = np.broadcast_to(np.arange(t), (b, t)) + np.asarray([[0], [5]])
  cos, sin = rope_cos_sin(jnp.asarray(positions), cfg.rope, cfg.mla.qk_rope_head_dim)
  q, weights = indexer.queries(jnp.asarray(x), jnp.asarray(q_latent), cos, sin)
  got = np.asarray(ops.index_scores(q, indexer.keys(jnp.asarray(x), cos, sin), weights))
  params = {"/".join(map(str, p)): np.asarray(v.get_value(), np.float64)
            for p, v in nnx.to_flat_state(nnx.state(indexer))}
  want = _deepseek_index_scores(params, x.astype(np.float64), q_latent.astype(np.float64),
                                positions.astype(np.float64), cfg, fp8)
  # exact: float32 vs float64; fp8: bf16 roundings may land on the other side of a tie
  scale = np.abs(want).max()
  err = np.abs(got - want) / scale
  assert (np.max(err) if not fp8 else np.quantile(err, 0.95)) < (1e-5 if not fp8 else 1e-3), (
      np.max(err))
  causal = np.tril(np.ones((t, t), bool))[None]
  idx, valid = ops.top_k(jnp.asarray(got), jnp.asarray(causal), 4)
  idx_ref, _ = ops.top_k(jnp.asarray(want.astype(np.float32)), jnp.asarray(causal), 4)
  agree = np.mean([set(np.asarray(a)[np.asarray(v)]) == set(np.asarray(r)[np.asarray(v)])
                   for a, r, v in zip(idx.reshape(-1, 4), idx_ref.reshape(-1, 4),
                                      valid.reshape(-1, 4))])
  assert agree >= (1.0 if not fp8 else 0.9), agree


def test_fp8_mode_changes_scores_only_by_the_quantisation():
  exact = DSAConfig(index_n_heads=8, index_head_dim=32, index_topk=4)
  fp8 = dataclasses.replace(exact, index_precision="fp8")
  cfg = tiny_config(attention="dsa", dsa=exact)
  a, b = Indexer(cfg, exact, rngs=nnx.Rngs(0)), Indexer(cfg, fp8, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, cfg.hidden_size)), jnp.float32)
  cos, sin = rope_cos_sin(jnp.arange(6)[None], cfg.rope, cfg.mla.qk_rope_head_dim)
  ka, kb = a.keys(x, cos, sin), b.keys(x, cos, sin)
  # the Hadamard rotation preserves dot products: scores differ by bf16 + e4m3 rounding only
  gram = jnp.einsum("bsd,btd->bst", ka, ka)
  np.testing.assert_allclose(jnp.einsum("bsd,btd->bst", kb, kb), gram,
                             atol=0.06 * float(jnp.abs(gram).max()))
  assert float(jnp.abs(kb - ops.hadamard(ka)).max()) > 0  # and it does quantise
  with pytest.raises(ValueError, match="power-of-two"):
    DSAConfig(index_head_dim=48, index_precision="fp8")


@pytest.mark.parametrize("packed", [False, True])
def test_blocked_top_k_equals_dense(packed):
  rng = np.random.default_rng(5)
  b, t, h, d, top, block = 2, 37, 3, 8, 6, 8
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 15 + [0] * 2], b, 0)) if packed else None
  mask = AttentionMask.self_attention(positions, segments)
  visible = mask.dense()[:, 0]
  want_idx, want_valid = ops.top_k(ops.index_scores(q, k, w), visible, top)
  got_idx, got_valid = ops.blocked_top_k(q, k, w, ops.mask_block(mask, block, 2 * block), top,
                                         block, 2 * block)
  np.testing.assert_array_equal(jnp.sum(got_valid, -1), jnp.sum(want_valid, -1))
  key_sets = lambda idx, ok: np.sort(np.where(ok, idx, -1), axis=-1)  # sets, any order
  np.testing.assert_array_equal(key_sets(got_idx, got_valid), key_sets(want_idx, want_valid))
  assert int(jnp.sum(~want_valid)) > 0  # early queries see fewer than `top` keys


def test_threshold_top_k_keeps_top_ks_sets_with_ties():
  rng = np.random.default_rng(8)
  scores = rng.integers(-3, 4, (4, 6, 50)).astype(np.float32)  # many ties
  scores[0, 0, 3:] = -np.inf  # only 3 visible keys
  scores[1, 2] = -0.0
  scores[1, 3, :10] = 0.0  # -0.0 and 0.0 tie
  for k in (1, 7, 50):
    got_idx, got_valid = ops.threshold_top_k(jnp.asarray(scores), k)
    values, want_idx = jax.lax.top_k(jnp.asarray(scores), k)
    np.testing.assert_array_equal(np.sort(got_idx, -1), np.sort(want_idx, -1))
    np.testing.assert_array_equal(np.sort(got_valid, -1), np.sort(values > -np.inf, -1))


def test_indexer_kl_matches_numpy():
  rng = np.random.default_rng(6)
  valid = rng.uniform(size=(2, 5, 7)) > 0.3
  valid[0, 0] = False  # a query without keys contributes 0
  target = np.where(valid, rng.uniform(size=valid.shape), 0)
  target = target / np.maximum(target.sum(-1, keepdims=True), 1e-30)
  scores = rng.normal(size=valid.shape) * 3
  got = ops.indexer_kl(jnp.asarray(target, jnp.float32), jnp.asarray(scores, jnp.float32),
                       jnp.asarray(valid))
  for (i, j), value in np.ndenumerate(np.asarray(got)):
    v = valid[i, j]
    if not v.any():
      assert value == 0
      continue
    q = np.exp(scores[i, j, v] - scores[i, j, v].max())
    q /= q.sum()
    p = target[i, j, v]
    want = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0))
    np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-6)


def test_query_chunks_change_nothing():
  """The gather path in chunks of 8 queries (a ragged last one) equals one piece: outputs,
  the sparse stage's target and the gradients."""
  rng = np.random.default_rng(7)
  b, t, n, hn, hv, r, c, k = 2, 21, 3, 4, 5, 2, 6, 5
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q_nope, q_pe, c_kv, k_pe, wkv_b = f(b, t, n, hn), f(b, t, n, r), f(b, t, c), f(b, t, r), f(
      c, n, hn + hv)
  visible = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
  indices, valid = ops.top_k(f(b, t, t), visible, k)
  cot = f(b, t, n, hv)

  def loss(block, *args):
    out, target = ops.sparse_latent_attention(*args, indices, valid, wkv_b, 0.3,
                                              query_block=block, with_target=True)
    return jnp.sum(out * cot), (out, target)

  grad = lambda block: jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)(
      block, q_nope, q_pe, c_kv, k_pe)
  (g_chunked, (out_c, target_c)), (g_whole, (out_w, target_w)) = grad(8), grad(64)
  np.testing.assert_allclose(out_c, out_w, atol=1e-5)
  np.testing.assert_allclose(target_c, target_w, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(target_w, -1), jnp.ones((b, t)), atol=1e-5)
  for a, w in zip(g_chunked, g_whole):
    np.testing.assert_allclose(a, w, atol=1e-5)
