"""DeepSeek-V4 quantisation formats: FP4 e2m1 unpacking, e8m0 scales, block-scaled FP4 / FP8
dequantisation and their inverse writers, and F8_E8M0 / I8 tensors through safetensors."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from dsjax.checkpoint.quant_formats import (
  dequantize_fp4_blockwise,
  dequantize_fp8_e8m0_blockwise,
  e8m0_to_float32,
  quantize_fp4_blockwise,
  quantize_fp8_e8m0_blockwise,
  unpack_fp4_e2m1,
)
from dsjax.checkpoint.safetensors_io import SafetensorsReader, write_safetensors

E8M0 = ml_dtypes.float8_e8m0fnu


def e2m1_value(nibble: int) -> float:
  """e2m1 from its definition: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0;
  exponent 0 is subnormal (0.5 * mantissa)."""
  sign = -1.0 if nibble & 0b1000 else 1.0
  exp, man = (nibble >> 1) & 0b11, nibble & 1
  mag = 0.5 * man if exp == 0 else 2.0 ** (exp - 1) * (1 + 0.5 * man)
  return sign * mag


# byte -> [even element (low nibble), odd element (high nibble)], written out independently.
BYTE_TABLE = np.array([[e2m1_value(b & 0xF), e2m1_value(b >> 4)] for b in range(256)])
REPRESENTABLE = np.array(sorted({e2m1_value(n) for n in range(16)}), dtype=np.float32)


def test_e2m1_definition_magnitudes():
  assert [e2m1_value(n) for n in range(8)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
  assert [e2m1_value(n) for n in range(9, 16)] == [-0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize(
  "byte, expected",
  [(0x21, [0.5, 1.0]), (0x00, [0.0, 0.0]), (0xA9, [-0.5, -1.0]), (0x7F, [-6.0, 6.0]),
   (0x8E, [-4.0, -0.0])],
)
def test_unpack_known_bytes(byte, expected):
  for dtype in (np.uint8, np.int8):
    got = unpack_fp4_e2m1(np.array([byte], dtype=np.uint8).view(dtype))
    assert got.dtype == np.float32 and got.shape == (2,)
    np.testing.assert_array_equal(got, expected)


def test_unpack_all_256_bytes_and_leading_dims():
  codes = np.arange(256, dtype=np.uint8)
  got = unpack_fp4_e2m1(codes.view(np.int8))
  np.testing.assert_array_equal(got.reshape(256, 2), BYTE_TABLE)
  assert np.array_equal(np.signbit(got.reshape(256, 2)), np.signbit(BYTE_TABLE))
  # Leading dimensions are kept; the last one doubles, pairs stay adjacent.
  got3 = unpack_fp4_e2m1(codes.reshape(2, 4, 32))
  assert got3.shape == (2, 4, 64)
  np.testing.assert_array_equal(got3.reshape(256, 2), BYTE_TABLE)


def test_e8m0_known_values():
  got = e8m0_to_float32(np.array([127, 128, 0, 126, 254, 255], dtype=np.uint8))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got[:5], [1.0, 2.0, 2.0**-127, 0.5, 2.0**127])
  assert got[0] == 1.0 and got[2] == np.float32(2.0**-127) and got[2] > 0
  assert np.isnan(got[5])


def test_e8m0_all_bytes_and_input_kinds():
  b = np.arange(256, dtype=np.uint8)
  ref = np.array([2.0 ** (i - 127) for i in range(255)], dtype=np.float32)
  from_u8, from_e8 = e8m0_to_float32(b), e8m0_to_float32(b.view(E8M0))
  np.testing.assert_array_equal(from_u8[:255], ref)
  np.testing.assert_array_equal(from_e8, from_u8)
  np.testing.assert_array_equal(from_u8, b.view(E8M0).astype(np.float32))  # ml_dtypes agrees
  assert e8m0_to_float32(np.uint8(128)).shape == ()
  for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
    s = np.array([[0.25, 3.0]], dtype=dtype)
    got = e8m0_to_float32(s)
    assert got.dtype == np.float32 and got.shape == (1, 2)
    np.testing.assert_array_equal(got, [[0.25, 3.0]])
  with pytest.raises(ValueError, match="view int8 e8m0 bytes as uint8"):
    e8m0_to_float32(np.zeros(3, np.int8))
  with pytest.raises(ValueError, match="neither e8m0 nor a float"):
    e8m0_to_float32(np.zeros(3, np.int32))


def _representable_fp4(rng, shape, exps, block=32):
  """w [out, in] of e2m1 values times 2**exps [out, ceil(in/block)]; every block holds a +-6
  so the quantizer must pick exactly 2**exps."""
  v = rng.choice(REPRESENTABLE, size=shape)
  v[:, ::block] = rng.choice([-6.0, 6.0], size=v[:, ::block].shape)
  return v * np.repeat(np.ldexp(1.0, exps), block, axis=1)[:, : shape[1]]


@pytest.mark.parametrize("in_dim", [64, 80])  # 80: a partial last block of 16
def test_fp4_round_trip_exact_for_representable(in_dim):
  rng = np.random.default_rng(0)
  exps = rng.integers(-20, 20, size=(9, -(-in_dim // 32)))
  w = _representable_fp4(rng, (9, in_dim), exps).astype(np.float32)
  packed, scale = quantize_fp4_blockwise(w)
  assert packed.dtype == np.int8 and packed.shape == (9, in_dim // 2)
  assert scale.dtype == E8M0 and scale.shape == exps.shape
  np.testing.assert_array_equal(scale.view(np.uint8), exps + 127)
  np.testing.assert_array_equal(dequantize_fp4_blockwise(packed, scale), w)
  # The same bytes decode identically with uint8 / float32 scales.
  for s in (scale.view(np.uint8), quantize_fp4_blockwise(w, scale_dtype=np.float32)[1]):
    np.testing.assert_array_equal(dequantize_fp4_blockwise(packed.view(np.uint8), s), w)


def test_fp4_small_blocks_still_exact():
  # A block whose max is below 4 gets a smaller scale; representable values stay exact.
  w = np.array([[0.5, -1.5, 3.0, 0.0], [0.25, 0.75, 0.0, -0.5]], dtype=np.float32)
  packed, scale = quantize_fp4_blockwise(w, block=4)
  np.testing.assert_array_equal(e8m0_to_float32(scale), [[0.5], [0.125]])
  np.testing.assert_array_equal(dequantize_fp4_blockwise(packed, scale, block=4), w)


def test_fp4_ties_round_to_even_and_match_ml_dtypes():
  mids = np.array([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]], dtype=np.float32)
  for sign in (1, -1):
    packed, scale = quantize_fp4_blockwise(sign * mids, block=8)
    assert e8m0_to_float32(scale)[0, 0] == 1.0
    np.testing.assert_array_equal(dequantize_fp4_blockwise(packed, scale, block=8),
                                  sign * np.array([[0, 1, 1, 2, 2, 4, 4, 6]]))
  # Random data: the codes equal ml_dtypes' float4_e2m1fn rounding of w / scale.
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((130, 96)) * rng.uniform(0.01, 100, (130, 1))).astype(np.float32)
  packed, scale = quantize_fp4_blockwise(w)
  x = w / np.repeat(e8m0_to_float32(scale), 32, axis=1)
  ref = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
  np.testing.assert_array_equal(unpack_fp4_e2m1(packed), ref)


def test_fp4_random_within_format_error():
  rng = np.random.default_rng(2)
  w = (rng.standard_normal((260, 200)) * rng.uniform(1e-3, 1e3, (260, 1))).astype(np.float32)
  packed, scale = quantize_fp4_blockwise(w)
  s = np.repeat(e8m0_to_float32(scale), 32, axis=1)[:, :200]
  assert (np.abs(w) <= 6 * s).all()  # max|w| / scale <= 6 ...
  blk_max = np.maximum.reduceat(np.abs(w), np.arange(0, 200, 32), axis=1)
  assert (blk_max > 3 * e8m0_to_float32(scale)).all()  # ... and the scale is the smallest such
  err = np.abs(dequantize_fp4_blockwise(packed, scale) - w)
  # Half a step: 25% of |w| in the normal range, a quarter of the scale in the subnormal one.
  assert (err <= np.maximum(0.25 * np.abs(w), 0.25 * s)).all()


def test_fp4_non_uniform_scales_hit_the_right_blocks():
  rows, in_dim = 5, 80  # 3 blocks, the last one partial (16 values)
  packed = np.full((rows, in_dim // 2), 0x22, dtype=np.int8)  # every value 1.0
  b = (110 + 3 * np.arange(rows)[:, None] + 7 * np.arange(3)[None, :]).astype(np.uint8)
  got = dequantize_fp4_blockwise(packed, b.view(E8M0))
  for i in range(rows):
    for j in range(in_dim):
      assert got[i, j] == 2.0 ** (int(b[i, j // 32]) - 127)
  # Expert stacks [E, out, in/2] with scales [E, out, in/32] work too.
  stack = dequantize_fp4_blockwise(np.stack([packed, packed]), np.stack([b, b + 1]))
  np.testing.assert_array_equal(stack[0], got)
  np.testing.assert_array_equal(stack[1], 2 * got)


def test_fp4_out_dtype_and_many_row_chunks():
  rng = np.random.default_rng(3)
  w = rng.standard_normal((300, 64)).astype(np.float32)  # more rows than one chunk
  packed, scale = quantize_fp4_blockwise(w)
  f32 = dequantize_fp4_blockwise(packed, scale)
  bf16 = dequantize_fp4_blockwise(packed, scale, out_dtype=ml_dtypes.bfloat16)
  assert bf16.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(bf16.astype(np.float32), f32)  # e2m1 * 2**k is exact in bf16
  ref = unpack_fp4_e2m1(packed) * np.repeat(e8m0_to_float32(scale), 32, axis=1)
  np.testing.assert_array_equal(f32, ref)


def _fp8_values(rng, shape):
  return rng.standard_normal(shape).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (7, 5)])
def test_fp8_round_trip_exact_for_representable(shape):
  rng = np.random.default_rng(4)
  n_rb, n_cb = -(-shape[0] // 128), -(-shape[1] // 128)
  exps = rng.integers(-30, 30, size=(n_rb, n_cb))
  v = _fp8_values(rng, shape)
  for i in range(n_rb):
    for j in range(n_cb):
      v[i * 128, j * 128] = 448.0  # pins each block's scale to 2**exps
  full = np.ldexp(1.0, exps).repeat(128, 0).repeat(128, 1)[: shape[0], : shape[1]]
  w = (v * full).astype(np.float32)
  weight, scale = quantize_fp8_e8m0_blockwise(w)
  assert weight.dtype == ml_dtypes.float8_e4m3fn and weight.shape == shape
  assert scale.dtype == E8M0 and scale.shape == (n_rb, n_cb)
  np.testing.assert_array_equal(scale.view(np.uint8), exps + 127)
  np.testing.assert_array_equal(weight.astype(np.float32), v)
  np.testing.assert_array_equal(dequantize_fp8_e8m0_blockwise(weight, scale), w)
  np.testing.assert_array_equal(dequantize_fp8_e8m0_blockwise(weight, scale.view(np.uint8)), w)


def test_fp8_random_within_format_error_and_float32_scales():
  rng = np.random.default_rng(5)
  w = (rng.standard_normal((300, 260)) * rng.uniform(1e-3, 1e3, (300, 1))).astype(np.float32)
  weight, scale = quantize_fp8_e8m0_blockwise(w)
  s = e8m0_to_float32(scale).repeat(128, 0).repeat(128, 1)[:300, :260]
  assert (np.abs(w) <= 448 * s).all()
  err = np.abs(dequantize_fp8_e8m0_blockwise(weight, scale) - w)
  # e4m3: 3 mantissa bits -> half a step is 2**-4 relative; subnormal step is 2**-9 * scale.
  assert (err <= np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * s)).all()
  weight32, scale32 = quantize_fp8_e8m0_blockwise(w, scale_dtype=np.float32)
  assert scale32.dtype == np.float32
  np.testing.assert_array_equal(scale32, e8m0_to_float32(scale))
  np.testing.assert_array_equal(weight32.view(np.uint8), weight.view(np.uint8))
  np.testing.assert_array_equal(dequantize_fp8_e8m0_blockwise(weight32, scale32),
                                dequantize_fp8_e8m0_blockwise(weight, scale))


def test_fp8_non_uniform_scales_hit_the_right_blocks():
  rows, cols = 300, 200  # 3 x 2 blocks, partial at both edges
  weight = np.ones((rows, cols), dtype=ml_dtypes.float8_e4m3fn)
  b = np.array([[100, 140], [127, 128], [90, 200]], dtype=np.uint8)
  got = dequantize_fp8_e8m0_blockwise(weight, b.view(E8M0), out_dtype=np.float32)
  expected = np.ldexp(1.0, b.astype(int) - 127).repeat(128, 0).repeat(128, 1)[:rows, :cols]
  np.testing.assert_array_equal(got, expected)
  assert got[127, 127] == 2.0**-27 and got[128, 128] == 2.0 and got[299, 199] == 2.0**73
  bf16 = dequantize_fp8_e8m0_blockwise(weight, b, out_dtype=ml_dtypes.bfloat16)
  assert bf16.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(bf16.astype(np.float32), expected)


def _header(path) -> dict:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n))


def test_safetensors_round_trip_f8_e8m0_and_i8(tmp_path):
  rng = np.random.default_rng(6)
  dense, dense_scale = quantize_fp8_e8m0_blockwise(rng.standard_normal((130, 140)))
  expert, expert_scale = quantize_fp4_blockwise(rng.standard_normal((6, 64)))
  tensors = {
    "layers.0.attn.wq_a.weight": dense,
    "layers.0.attn.wq_a.scale": dense_scale,
    "layers.0.ffn.experts.0.w1.weight": expert,
    "layers.0.ffn.experts.0.w1.scale": expert_scale,
    "layers.0.ffn.experts.0.w2.scale": expert_scale.view(np.uint8),
  }
  path = tmp_path / "model.safetensors"
  write_safetensors(path, tensors)
  tags = {k: v["dtype"] for k, v in _header(path).items() if k != "__metadata__"}
  assert tags == {
    "layers.0.attn.wq_a.weight": "F8_E4M3",
    "layers.0.attn.wq_a.scale": "F8_E8M0",
    "layers.0.ffn.experts.0.w1.weight": "I8",
    "layers.0.ffn.experts.0.w1.scale": "F8_E8M0",
    "layers.0.ffn.experts.0.w2.scale": "U8",
  }
  with SafetensorsReader(tmp_path) as r:
    for name, ref in tensors.items():
      got = r.get(name)
      assert got.dtype == ref.dtype and got.shape == ref.shape and r.dtype(name) == ref.dtype
      assert got.tobytes() == ref.tobytes()
    np.testing.assert_array_equal(
      dequantize_fp4_blockwise(r.get("layers.0.ffn.experts.0.w1.weight"),
                               r.get("layers.0.ffn.experts.0.w1.scale")),
      dequantize_fp4_blockwise(expert, expert_scale))
    np.testing.assert_array_equal(
      dequantize_fp8_e8m0_blockwise(r.get("layers.0.attn.wq_a.weight"),
                                    r.get("layers.0.attn.wq_a.scale")),
      dequantize_fp8_e8m0_blockwise(dense, dense_scale))


def test_f8_e8m0_tag_matches_the_safetensors_library(tmp_path):
  torch = pytest.importorskip("torch")
  if not hasattr(torch, "float8_e8m0fnu"):
    pytest.skip("torch without float8_e8m0fnu")
  from safetensors.torch import load_file, save_file

  b = np.arange(256, dtype=np.uint8).reshape(16, 16)
  # The library's file reads here ...
  (tmp_path / "a").mkdir()
  save_file({"s": torch.from_numpy(b.copy()).view(torch.float8_e8m0fnu)},
            tmp_path / "a" / "model.safetensors")
  with SafetensorsReader(tmp_path / "a") as r:
    assert r.dtype("s") == E8M0 and r.get("s").view(np.uint8).tobytes() == b.tobytes()
  # ... and ours reads there.
  (tmp_path / "b").mkdir()
  write_safetensors(tmp_path / "b" / "model.safetensors", {"s": b.view(E8M0)})
  t = load_file(tmp_path / "b" / "model.safetensors")["s"]
  assert t.dtype == torch.float8_e8m0fnu and t.view(torch.uint8).numpy().tobytes() == b.tobytes()


def test_errors_for_bad_shapes_and_dtypes():
  packed = np.zeros((4, 32), np.int8)  # in = 64 -> scale (4, 2)
  with pytest.raises(ValueError, match=r"expected \(4, 2\)"):
    dequantize_fp4_blockwise(packed, np.zeros((4, 3), np.uint8))
  with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
    dequantize_fp4_blockwise(packed, np.zeros((4, 2), np.uint8), block=16)
  with pytest.raises(ValueError, match="int8 or uint8"):
    dequantize_fp4_blockwise(packed.astype(np.float32), np.zeros((4, 2), np.uint8))
  with pytest.raises(ValueError, match="one value per byte"):
    unpack_fp4_e2m1(np.zeros(4, ml_dtypes.float4_e2m1fn))
  with pytest.raises(ValueError, match="0-d"):
    unpack_fp4_e2m1(np.uint8(3))
  with pytest.raises(ValueError, match="view int8 e8m0 bytes as uint8"):
    dequantize_fp4_blockwise(packed, np.zeros((4, 2), np.int8))
  with pytest.raises(ValueError, match="positive int"):
    dequantize_fp4_blockwise(packed, np.zeros((4, 2), np.uint8), block=0)
  weight = np.zeros((130, 140), ml_dtypes.float8_e4m3fn)
  with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
    dequantize_fp8_e8m0_blockwise(weight, np.zeros((1, 1), np.uint8))
  with pytest.raises(ValueError, match="use dequantize_fp4_blockwise"):
    dequantize_fp8_e8m0_blockwise(packed, np.zeros((1, 1), np.uint8))
  with pytest.raises(ValueError, match="2-D"):
    dequantize_fp8_e8m0_blockwise(np.zeros((2, 2, 2), ml_dtypes.float8_e4m3fn),
                                  np.zeros((1, 1), np.uint8))
  with pytest.raises(ValueError, match="two positive ints"):
    dequantize_fp8_e8m0_blockwise(weight, np.zeros((2, 2), np.uint8), block=128)
  with pytest.raises(ValueError, match="even last"):
    quantize_fp4_blockwise(np.zeros((4, 31), np.float32))
  with pytest.raises(ValueError, match="NaN or inf"):
    quantize_fp4_blockwise(np.array([[1.0, np.nan]], np.float32))
  with pytest.raises(ValueError, match="NaN or inf"):
    quantize_fp8_e8m0_blockwise(np.array([[np.inf, 1.0]], np.float32))
  with pytest.raises(ValueError, match="float array"):
    quantize_fp4_blockwise(np.zeros((2, 4), np.int32))
  with pytest.raises(ValueError, match="2-D"):
    quantize_fp8_e8m0_blockwise(np.zeros(8, np.float32))
  with pytest.raises(ValueError, match="scale_dtype"):
    quantize_fp8_e8m0_blockwise(np.zeros((2, 2), np.float32), scale_dtype=np.float16)


def test_zero_blocks_and_edge_sizes():
  packed, scale = quantize_fp4_blockwise(np.zeros((3, 64), np.float32))
  assert not packed.any() and (scale.view(np.uint8) == 127).all()
  np.testing.assert_array_equal(dequantize_fp4_blockwise(packed, scale), np.zeros((3, 64)))
  weight, scale = quantize_fp8_e8m0_blockwise(np.zeros((1, 1), np.float32))
  assert scale.shape == (1, 1) and dequantize_fp8_e8m0_blockwise(weight, scale)[0, 0] == 0
  # Tiny and huge magnitudes keep within e8m0's range (the tiny block's scale clips to 2**-127).
  w = np.array([[1e-38, -1e-38], [1e38, 2.0**127]], np.float32)
  packed, scale = quantize_fp4_blockwise(w, block=2)
  np.testing.assert_array_equal(scale.view(np.uint8)[:, 0], [0, 125 + 127])
  got = dequantize_fp4_blockwise(packed, scale, block=2)
  np.testing.assert_array_equal(got, [[1.5 * 2.0**-127, -1.5 * 2.0**-127], [2.0**126, 2.0**127]])
