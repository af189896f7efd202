"""DeepSeek-V4 checkpoint quantisation formats in pure numpy: decoders, and encoders for tests
and for writing tiny quantised checkpoints.

DeepSeek-V4 checkpoints (DeepSeek's native layout) hold three kinds of quantised tensor:

* dense Linear weights as float8_e4m3fn ``[out, in]`` (safetensors "F8_E4M3") with a companion
  ``<prefix>.scale`` (``<prefix>.weight`` minus ``.weight``) holding one multiplier per 128x128
  block, shape ``[ceil(out/128), ceil(in/128)]``; e8m0 ("F8_E8M0") in the FP4-expert releases,
  float32 in some others (``scale_fmt`` unset);
* routed-expert weights in FP4 e2m1, two values per byte along the input dimension, stored as
  int8 ``[out, in/2]`` ("I8"): the low nibble is the even element, the high nibble the odd one;
  their ``<prefix>.scale`` is e8m0 with one multiplier per 1x32 block along the input dimension,
  shape ``[out, in/32]``.

An e8m0 byte ``b`` is the power of two ``2**(b - 127)`` (``b = 255`` is NaN).  An e2m1 nibble is
sign (bit 3), two exponent bits and one mantissa bit: codes 0..7 are the magnitudes
``0, .5, 1, 1.5, 2, 3, 4, 6`` and codes 8..15 their negatives.  A weight is ``value * scale``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from dsjax.checkpoint.safetensors_io import dequantize_fp8_blockwise

__all__ = [
  "E2M1_VALUES",
  "FP4_MAX",
  "FP8_E4M3_MAX",
  "dequantize_fp4_blockwise",
  "dequantize_fp8_e8m0_blockwise",
  "e8m0_to_float32",
  "quantize_fp4_blockwise",
  "quantize_fp8_e8m0_blockwise",
  "unpack_fp4_e2m1",
]

FP4_MAX = 6.0  # largest e2m1 magnitude
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn magnitude
# The 16 e2m1 codes' values, indexed by nibble.
E2M1_VALUES = np.array(
  [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
  dtype=np.float32,
)
# Byte -> (even element, odd element): the low nibble comes first.
_FP4_PAIRS = np.stack([E2M1_VALUES[np.arange(256) & 0xF], E2M1_VALUES[np.arange(256) >> 4]], -1)
# Rounding boundaries between consecutive magnitudes 0 .. 6 (0.25, 0.75, ..., 5).
_E2M1_MIDPOINTS = ((E2M1_VALUES[1:8] + E2M1_VALUES[:7]) / 2).astype(np.float32)

_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_E8M0_BIAS = 127
_E8M0_TABLE = np.ldexp(1.0, np.arange(256) - _E8M0_BIAS)  # float64: 2**128 would overflow
_E8M0_TABLE[255] = np.nan
_E8M0_TABLE = _E8M0_TABLE.astype(np.float32)
_FLOAT_SCALE_DTYPES = tuple(
  np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
)
_SCALE_OUT_DTYPES = (_E8M0, np.dtype(np.uint8), np.dtype(np.float32))
_FP8_WEIGHT = np.dtype(ml_dtypes.float8_e4m3fn)
# Rows decoded or encoded per step: bounds the float32 temporaries to a block of rows.
_ROW_CHUNK = 128


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def e8m0_to_float32(scale) -> np.ndarray:
  """Scale multipliers as float32, same shape as ``scale``.

  ``scale`` is e8m0 (uint8 exponent bytes or ml_dtypes.float8_e8m0fnu: byte ``b`` ->
  ``2**(b - 127)``, 255 -> NaN) or already-float multipliers (float16 / bfloat16 / float32 /
  float64, returned as a float32 copy).
  """
  a = np.asarray(scale)
  if a.dtype == _E8M0 or a.dtype == np.uint8:
    return _E8M0_TABLE[a.view(np.uint8).reshape(-1)].reshape(a.shape)
  if a.dtype in _FLOAT_SCALE_DTYPES:
    return a.astype(np.float32)
  raise ValueError(
    f"scale dtype {a.dtype} is neither e8m0 nor a float multiplier: pass e8m0 as uint8 "
    f"exponent bytes or ml_dtypes.float8_e8m0fnu (safetensors F8_E8M0), or float16 / bfloat16 / "
    f"float32 / float64 values" + ("; view int8 e8m0 bytes as uint8 first (scale.view(np.uint8))"
                                   if a.dtype == np.int8 else "")
  )


def _packed_bytes(packed, what: str = "packed") -> np.ndarray:
  """Validate a packed FP4 tensor ``[..., in/2]`` (int8 or uint8) and view it as uint8."""
  a = np.asarray(packed)
  if a.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
    hint = (" (float4_e2m1fn holds one value per byte; pack two per byte along the last "
            "dimension)" if a.dtype == np.dtype(ml_dtypes.float4_e2m1fn) else "")
    raise ValueError(
      f"{what} FP4 weight must be int8 or uint8 bytes holding two e2m1 values each, got dtype "
      f"{a.dtype}{hint}; DeepSeek-V4 stores routed experts as I8 [out, in/2]"
    )
  if a.ndim < 1:
    raise ValueError(f"{what} FP4 weight must be at least 1-D [..., in/2], got a 0-d array")
  return a.view(np.uint8)


def _check_fp4_block(block) -> int:
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
    raise ValueError(f"block must be a positive int (DeepSeek-V4's FP4 block is 32), got {block!r}")
  return int(block)


def _check_fp8_block(block) -> tuple[int, int]:
  ok = (isinstance(block, (tuple, list)) and len(block) == 2
        and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
                for b in block))
  if not ok:
    raise ValueError(
      f"block must be two positive ints (rows, cols), e.g. (128, 128), got {block!r}"
    )
  return int(block[0]), int(block[1])


def unpack_fp4_e2m1(packed) -> np.ndarray:
  """Unpack FP4 e2m1 bytes ``[..., n]`` (int8 or uint8) into float32 ``[..., 2n]``.

  Element ``2k`` comes from byte ``k``'s low nibble, element ``2k + 1`` from its high nibble;
  no scale is applied.
  """
  codes = _packed_bytes(packed)
  return _FP4_PAIRS[codes].reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def _fp4_rows_view(codes: np.ndarray, scale: np.ndarray, block: int):
  """Check ``scale`` against packed ``codes [..., in/2]``; returns (in, n_blocks, 2-D views)."""
  in_dim = 2 * codes.shape[-1]
  n_blocks = _ceil_div(in_dim, block)
  expected = codes.shape[:-1] + (n_blocks,)
  if scale.shape != expected:
    raise ValueError(
      f"scale shape {scale.shape} does not match packed FP4 weight shape {codes.shape} "
      f"(in = {in_dim} values) with block={block}: expected {expected}, one scale per 1x{block} "
      f"block along the input (last) dimension"
    )
  rows = math.prod(codes.shape[:-1])
  return in_dim, n_blocks, codes.reshape(rows, codes.shape[-1]), scale.reshape(rows, n_blocks)


def dequantize_fp4_blockwise(packed, scale, block: int = 32, out_dtype=np.float32) -> np.ndarray:
  """Dequantize DeepSeek-V4 block-scaled FP4 weights.

  ``packed`` is int8/uint8 ``[..., in/2]`` (two e2m1 values per byte, low nibble first);
  ``scale`` is e8m0 (or float) ``[..., ceil(in/block)]``.  Returns
  ``e2m1[..., j] * scale[..., j // block]`` (computed in float32) as ``out_dtype [..., in]``.
  The last block may be partial.
  """
  block = _check_fp4_block(block)
  codes = _packed_bytes(packed)
  scale = np.asarray(scale)
  in_dim, n_blocks, codes2, scale2 = _fp4_rows_view(codes, scale, block)
  out = np.empty(codes.shape[:-1] + (in_dim,), dtype=out_dtype)
  out2 = out.reshape(codes2.shape[0], in_dim)
  exact_blocks = n_blocks * block == in_dim
  # A block of rows at a time: peak extra memory is a few float32 copies of those rows.
  for r0 in range(0, codes2.shape[0], _ROW_CHUNK):
    r1 = min(r0 + _ROW_CHUNK, codes2.shape[0])
    values = _FP4_PAIRS[codes2[r0:r1]].reshape(r1 - r0, in_dim)
    s = e8m0_to_float32(scale2[r0:r1])
    if exact_blocks:
      values = (values.reshape(r1 - r0, n_blocks, block) * s[:, :, None]).reshape(r1 - r0, in_dim)
    else:
      values *= np.repeat(s, block, axis=1)[:, :in_dim]
    out2[r0:r1] = values
  return out


def dequantize_fp8_e8m0_blockwise(
  weight, scale, block: tuple[int, int] = (128, 128), out_dtype=np.float32
) -> np.ndarray:
  """Dequantize a block-scaled FP8 weight whose scales are e8m0 (or float32).

  ``weight`` is float8_e4m3fn ``[out, in]``; ``scale`` is ``[ceil(out/bo), ceil(in/bi)]`` e8m0
  (uint8 / float8_e8m0fnu) or float multipliers.  Returns
  ``weight[i, j] * scale[i // bo, j // bi]`` (float32 math) as ``out_dtype``.
  """
  bo, bi = _check_fp8_block(block)
  weight = np.asarray(weight)
  if weight.dtype != _FP8_WEIGHT:
    hint = ("; int8/uint8 weights are packed FP4, use dequantize_fp4_blockwise"
            if weight.dtype in (np.dtype(np.int8), np.dtype(np.uint8)) else "")
    raise ValueError(f"FP8 weight must be float8_e4m3fn, got dtype {weight.dtype}{hint}")
  if weight.ndim != 2:
    raise ValueError(f"FP8 weight must be 2-D [out, in], got shape {weight.shape}")
  scale = np.asarray(scale)
  expected = (_ceil_div(weight.shape[0], bo), _ceil_div(weight.shape[1], bi))
  if scale.shape != expected:
    raise ValueError(
      f"scale shape {scale.shape} does not match FP8 weight shape {weight.shape} with block "
      f"{(bo, bi)}: expected {expected}, one scale per {bo}x{bi} block (edge blocks partial)"
    )
  return dequantize_fp8_blockwise(weight, e8m0_to_float32(scale), (bo, bi), out_dtype)


def _pow2_exponents(amax: np.ndarray, qmax: float) -> np.ndarray:
  """Smallest ``e`` (int32, clipped to e8m0's [-127, 127]) with ``amax <= qmax * 2**e``; 0 for
  all-zero blocks."""
  mant, exp = np.frexp(amax.astype(np.float64) / qmax)
  e = exp - (mant == 0.5)  # an exact power of two needs no extra doubling
  e = np.where(amax > np.ldexp(qmax, e), e + 1, e)  # guard against rounding in the division
  return np.clip(e, -_E8M0_BIAS, _E8M0_BIAS).astype(np.int32)


def _scale_from_exponents(e: np.ndarray, scale_dtype) -> np.ndarray:
  """Power-of-two scales ``2**e`` as e8m0 (float8_e8m0fnu / uint8 bytes) or float32."""
  if scale_dtype == np.float32:
    return np.ldexp(np.float32(1), e).astype(np.float32)
  b = (e + _E8M0_BIAS).astype(np.uint8)
  return b.view(_E8M0) if scale_dtype == _E8M0 else b


def _check_scale_dtype(scale_dtype) -> np.dtype:
  dt = np.dtype(scale_dtype)
  if dt not in _SCALE_OUT_DTYPES:
    raise ValueError(
      f"scale_dtype must be ml_dtypes.float8_e8m0fnu, np.uint8 (e8m0 bytes) or np.float32, "
      f"got {dt}"
    )
  return dt


def _float_rows(w, what: str) -> np.ndarray:
  a = np.asarray(w)
  if not (np.issubdtype(a.dtype, np.floating) or a.dtype in _FLOAT_SCALE_DTYPES):
    raise ValueError(f"{what} must be a float array, got dtype {a.dtype}")
  return a


def _check_finite(rows: np.ndarray, what: str) -> None:
  if not np.isfinite(rows).all():
    raise ValueError(f"{what} contains NaN or inf, which the quantised formats cannot store")


def _encode_e2m1(x: np.ndarray) -> np.ndarray:
  """e2m1 codes (uint8 0..15) of float32 ``x`` rounded to nearest, ties to even, |x| <= 6."""
  mag = np.abs(x)
  code = np.searchsorted(_E2M1_MIDPOINTS, mag, side="left").astype(np.uint8)
  on_tie = mag == _E2M1_MIDPOINTS[np.minimum(code, len(_E2M1_MIDPOINTS) - 1)]
  code += on_tie & (code % 2 == 1)  # an odd code on a midpoint rounds up to the even one
  return code | (((x < 0) & (code != 0)).astype(np.uint8) << 3)


def quantize_fp4_blockwise(
  w, block: int = 32, scale_dtype=ml_dtypes.float8_e8m0fnu
) -> tuple[np.ndarray, np.ndarray]:
  """Quantize float ``w [..., in]`` (``in`` even) to DeepSeek-V4's block-scaled FP4.

  Each 1x``block`` block along the last dimension gets the smallest power-of-two scale with
  ``max|w| / scale <= 6``; values round to nearest e2m1, ties to even.  Returns
  ``(packed int8 [..., in/2], scale [..., ceil(in/block)])`` with the scale as ``scale_dtype``
  (float8_e8m0fnu, uint8 e8m0 bytes, or float32).
  """
  block = _check_fp4_block(block)
  scale_dtype = _check_scale_dtype(scale_dtype)
  w = _float_rows(w, "w")
  if w.ndim < 1 or w.shape[-1] % 2:
    raise ValueError(
      f"w must be at least 1-D with an even last (input) dimension to pack two FP4 values per "
      f"byte, got shape {w.shape}; pad the input dimension to an even size"
    )
  in_dim = w.shape[-1]
  n_blocks = _ceil_div(in_dim, block)
  rows = math.prod(w.shape[:-1])
  w2 = w.reshape(rows, in_dim)
  packed = np.empty((rows, in_dim // 2), dtype=np.uint8)
  exps = np.empty((rows, n_blocks), dtype=np.int32)
  starts = np.arange(0, in_dim, block)
  for r0 in range(0, rows if in_dim else 0, _ROW_CHUNK):
    r1 = min(r0 + _ROW_CHUNK, rows)
    x = w2[r0:r1].astype(np.float32)
    _check_finite(x, "w")
    e = _pow2_exponents(np.maximum.reduceat(np.abs(x), starts, axis=1), FP4_MAX)
    exps[r0:r1] = e
    codes = _encode_e2m1(np.ldexp(x, -np.repeat(e, block, axis=1)[:, :in_dim]))
    packed[r0:r1] = codes[:, 0::2] | (codes[:, 1::2] << 4)
  lead = w.shape[:-1]
  scale = _scale_from_exponents(exps, scale_dtype).reshape(lead + (n_blocks,))
  return packed.view(np.int8).reshape(lead + (in_dim // 2,)), scale


def quantize_fp8_e8m0_blockwise(
  w, block: tuple[int, int] = (128, 128), scale_dtype=ml_dtypes.float8_e8m0fnu
) -> tuple[np.ndarray, np.ndarray]:
  """Quantize float ``w [out, in]`` to float8_e4m3fn with power-of-two block scales.

  Each ``bo x bi`` block (edge blocks partial) gets the smallest power-of-two scale with
  ``max|w| / scale <= 448``; values round to nearest e4m3, ties to even.  Returns
  ``(weight float8_e4m3fn [out, in], scale [ceil(out/bo), ceil(in/bi)])`` with the scale as
  ``scale_dtype`` (float8_e8m0fnu, uint8 e8m0 bytes, or float32).
  """
  bo, bi = _check_fp8_block(block)
  scale_dtype = _check_scale_dtype(scale_dtype)
  w = _float_rows(w, "w")
  if w.ndim != 2:
    raise ValueError(f"w must be 2-D [out, in] for 2-D block scales, got shape {w.shape}")
  rows, cols = w.shape
  out = np.empty((rows, cols), dtype=_FP8_WEIGHT)
  exps = np.zeros((_ceil_div(rows, bo), _ceil_div(cols, bi)), dtype=np.int32)
  starts = np.arange(0, cols, bi)
  # One row-block at a time: peak extra memory is a float32 block of rows.
  for b in range(exps.shape[0] if cols else 0):
    r0, r1 = b * bo, min((b + 1) * bo, rows)
    x = w[r0:r1].astype(np.float32)
    _check_finite(x, "w")
    e = _pow2_exponents(np.maximum.reduceat(np.abs(x).max(axis=0), starts), FP8_E4M3_MAX)
    exps[b] = e
    out[r0:r1] = np.ldexp(x, -np.repeat(e, bi)[:cols]).astype(_FP8_WEIGHT)
  return out, _scale_from_exponents(exps, scale_dtype)
