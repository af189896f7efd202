"""Token-sparse MLA kernels for GPUs (Pallas' Triton backend).

A program owns one query token t and block_h of its N heads ([block_h, D] of q, the matmuls'
M dimension), and walks its index list in chunks of block_k rows, gathered from the latent
with array-indexed (masked) loads. Triton tiles are powers of two, so D = C + R is handled
as two tiles: the value channels [0, C) and the rope channels [C, D), each padded to a
power of two >= 16 (tl.dot's minimum) and masked; -1 rows are masked out of the softmax.

  forward: grid (N/block_h, T, B); online softmax, f32 accumulation; saves lse.
  dq:      the same walk, recomputing P from lse.
  rows:    grid (K/block_k, T, B); a program takes one chunk of one query's rows, loops over
           the head blocks and atomically adds the rows' latent gradients (key and value
           roles) into an f32 [B, S + block_k, D'] accumulator: no T*K*D buffer, no XLA
           scatter. Invalid rows are sent to the block_k dump rows past S, so every atomic
           of a program has distinct targets. The sum order is not deterministic.
The grids' first dim varies fastest, so the programs of one query run side by side and share
its gathered rows (forward, dq) or its q and dO (rows) through L2.
In Pallas' interpreter an atomic add is a gather-then-set, so there a row repeated within
one chunk adds its gradient once (compiled, twice, as documented in reference.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _tile(n: int) -> int:
  """Triton tile for a dimension of n: a power of two, at least 16 (tl.dot's minimum)."""
  return max(16, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class _Dims:
  heads: int
  dim: int
  v_dim: int
  num_keys: int
  block_k: int
  block_h: int
  scale: float

  @property
  def rope(self) -> int:
    return self.dim - self.v_dim

  @property
  def c_tile(self) -> int:
    return _tile(self.v_dim)

  @property
  def r_tile(self) -> int:
    return _tile(self.rope) if self.rope else 0

  @property
  def head_blocks(self) -> int:
    return pl.cdiv(self.heads, self.block_h)


def _dot(a, b, **transposes):
  """f32 accumulation. Triton lowers a DEFAULT-precision f32 dot to TF32, so f32 operands ask
  for HIGHEST (IEEE, like the oracles); bf16 stays on the tensor cores' native path."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return plgpu.dot(a.astype(dtype), b.astype(dtype), precision=precision, **transposes)


def _head_rows(h0, dims: _Dims):
  return h0 + jnp.arange(dims.block_h) < dims.heads


def _parts(dims: _Dims):
  """(first channel, width, tile) of the value part and (when R > 0) the rope part."""
  parts = [(0, dims.v_dim, dims.c_tile)]
  if dims.rope:
    parts.append((dims.c_tile, dims.rope, dims.r_tile))
  return parts


def _to_tiles(x, dims: _Dims):
  """[..., D] (or dO's [..., C]) -> [..., C' + R'] (or [..., C']): each part zero-padded to
  its tile, so that every tile load is in bounds (Pallas rejects a static slice past the
  end). Free when C and R are powers of two >= 16, as DeepSeek's 512 and 64 are."""
  widths = [(dims.v_dim, dims.c_tile)]
  if x.shape[-1] > dims.v_dim:
    widths.append((dims.rope, dims.r_tile))
  if all(width == tile for width, tile in widths):
    return x
  pieces = (x[..., :dims.v_dim], x[..., dims.v_dim:])
  return jnp.concatenate([jnp.pad(piece, [(0, 0)] * (x.ndim - 1) + [(0, tile - width)])
                          for piece, (width, tile) in zip(pieces, widths)], axis=-1)


def _from_tiles(x, dims: _Dims):
  """The inverse of _to_tiles for [..., C' + R'] -> [..., D]."""
  if x.shape[-1] == dims.dim:
    return x
  return jnp.concatenate([x[..., :dims.v_dim], x[..., dims.c_tile:dims.c_tile + dims.rope]],
                         axis=-1)


def _load_heads(ref, b, t, h0, dims: _Dims, parts):
  """[block_h, tile] tiles of heads h0 .. h0+block_h-1 of a [B,T,N,*] ref, one per part."""
  rows_ok = _head_rows(h0, dims)
  return [plgpu.load(ref.at[b, t, pl.ds(h0, dims.block_h), pl.ds(start, tile)],
                     mask=rows_ok[:, None] & (jnp.arange(tile) < width)[None, :], other=0.)
          for start, width, tile in parts]


def _store_heads(ref, values, b, t, h0, dims: _Dims, parts):
  rows_ok = _head_rows(h0, dims)
  for value, (start, width, tile) in zip(values, parts):
    plgpu.store(ref.at[b, t, pl.ds(h0, dims.block_h), pl.ds(start, tile)],
                value.astype(ref.dtype),
                mask=rows_ok[:, None] & (jnp.arange(tile) < width)[None, :])


def _chunk_rows(idx_ref, b, t, c, dims: _Dims):
  """Query t's chunk c of its (block_k-padded) index list: (rows, valid) [block_k]."""
  rows = plgpu.load(idx_ref.at[b, t, pl.ds(c * dims.block_k, dims.block_k)])
  return rows, rows >= 0


def _gather(lat_ref, b, rows, valid, dims: _Dims):
  """The chunk's latent rows, [block_k, tile] per part (invalid rows 0)."""
  safe = jnp.where(valid, rows, 0)
  tiles = []
  for start, width, tile in _parts(dims):
    # All-array indices: the interpreter gathers those (a mix with slices it does not).
    shape = (dims.block_k, tile)
    at = (b, jnp.broadcast_to(safe[:, None], shape),
          jnp.broadcast_to(start + jnp.arange(tile)[None, :], shape))
    tiles.append(plgpu.load(lat_ref.at[at],
                            mask=valid[:, None] & (jnp.arange(tile) < width)[None, :],
                            other=0.))
  return tiles


def _logits(q, kv, dims: _Dims):
  return sum(_dot(a, x, trans_b=True) for a, x in zip(q, kv)) * dims.scale


def _any(valid):
  return jnp.sum(valid.astype(jnp.int32)) > 0


def _fwd_kernel(idx_ref, q_ref, lat_ref, o_ref, lse_ref, *, dims: _Dims, num_chunks: int):
  h0, t, b = pl.program_id(0) * dims.block_h, pl.program_id(1), pl.program_id(2)
  parts = _parts(dims)
  q = _load_heads(q_ref, b, t, h0, dims, parts)

  def chunk(c, carry):
    rows, valid = _chunk_rows(idx_ref, b, t, c, dims)

    def attend(carry):
      m, denom, acc = carry
      kv = _gather(lat_ref, b, rows, valid, dims)
      scores = jnp.where(valid[None, :], _logits(q, kv, dims), -jnp.inf)
      # The chunk has a valid row, so m_new is finite on every head.
      m_new = jnp.maximum(m, jnp.max(scores, axis=1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(scores - m_new[:, None])
      acc = acc * alpha[:, None] + _dot(p.astype(kv[0].dtype), kv[0])
      return m_new, denom * alpha + jnp.sum(p, axis=1), acc
    return lax.cond(_any(valid), attend, lambda carry: carry, carry)

  bh = dims.block_h
  init = (jnp.full((bh,), -jnp.inf, jnp.float32), jnp.zeros((bh,), jnp.float32),
          jnp.zeros((bh, dims.c_tile), jnp.float32))
  m, denom, acc = lax.fori_loop(0, num_chunks, chunk, init)
  # A query with no valid index gives 0 and lse -inf, not NaN.
  nonempty = denom > 0
  safe = jnp.where(nonempty, denom, 1.)
  _store_heads(o_ref, [acc / safe[:, None]], b, t, h0, dims, parts[:1])
  plgpu.store(lse_ref.at[b, t, pl.ds(h0, bh)], jnp.where(nonempty, m + jnp.log(safe), -jnp.inf),
              mask=_head_rows(h0, dims))


def _row_stats(ref, b, t, h0, dims: _Dims):
  return plgpu.load(ref.at[b, t, pl.ds(h0, dims.block_h)], mask=_head_rows(h0, dims),
                    other=0.)


def _probabilities_and_dscores(q, do, lse, delta, kv, valid, h0, dims: _Dims):
  """P = exp(scale q k^T - lse) on the valid rows (and real heads), dS = P * (dO v^T -
  delta)."""
  allowed = _head_rows(h0, dims)[:, None] & valid[None, :]
  p = jnp.where(allowed, jnp.exp(_logits(q, kv, dims) - lse[:, None]), 0.)
  return p, p * (_dot(do, kv[0], trans_b=True) - delta[:, None])


def _dq_kernel(idx_ref, q_ref, lat_ref, do_ref, lse_ref, delta_ref, dq_ref, *, dims: _Dims,
               num_chunks: int):
  h0, t, b = pl.program_id(0) * dims.block_h, pl.program_id(1), pl.program_id(2)
  parts = _parts(dims)
  q = _load_heads(q_ref, b, t, h0, dims, parts)
  (do,) = _load_heads(do_ref, b, t, h0, dims, parts[:1])
  lse, delta = _row_stats(lse_ref, b, t, h0, dims), _row_stats(delta_ref, b, t, h0, dims)

  def chunk(c, acc):
    rows, valid = _chunk_rows(idx_ref, b, t, c, dims)

    def grad(acc):
      kv = _gather(lat_ref, b, rows, valid, dims)
      _, ds = _probabilities_and_dscores(q, do, lse, delta, kv, valid, h0, dims)
      ds = ds.astype(kv[0].dtype)
      return tuple(a + _dot(ds, x) for a, x in zip(acc, kv))
    return lax.cond(_any(valid), grad, lambda acc: acc, acc)

  init = tuple(jnp.zeros((dims.block_h, tile), jnp.float32) for _, _, tile in parts)
  acc = lax.fori_loop(0, num_chunks, chunk, init)
  _store_heads(dq_ref, [a * dims.scale for a in acc], b, t, h0, dims, parts)


def _rows_kernel(idx_ref, q_ref, lat_ref, do_ref, lse_ref, delta_ref, _, acc_ref, *,
                 dims: _Dims):
  c, t, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  parts = _parts(dims)
  rows, valid = _chunk_rows(idx_ref, b, t, c, dims)

  @pl.when(_any(valid))
  def _():
    kv = _gather(lat_ref, b, rows, valid, dims)
    dtype = kv[0].dtype

    def heads(hb, acc):
      h0 = hb * dims.block_h
      q = _load_heads(q_ref, b, t, h0, dims, parts)
      (do,) = _load_heads(do_ref, b, t, h0, dims, parts[:1])
      lse, delta = _row_stats(lse_ref, b, t, h0, dims), _row_stats(delta_ref, b, t, h0, dims)
      p, ds = _probabilities_and_dscores(q, do, lse, delta, kv, valid, h0, dims)
      ds = ds.astype(dtype)
      keys = [a + _dot(ds, x, trans_a=True) * dims.scale for a, x in zip(acc, q)]
      keys[0] = keys[0] + _dot(p.astype(dtype), do, trans_a=True)
      return tuple(keys)

    init = tuple(jnp.zeros((dims.block_k, tile), jnp.float32) for _, _, tile in parts)
    acc = lax.fori_loop(0, dims.head_blocks, heads, init)
    # Invalid rows go to distinct dump rows past S; the tiles' padded columns to padded
    # accumulator columns (they hold zeros).
    target = jnp.where(valid, rows, dims.num_keys + jnp.arange(dims.block_k))
    offset = 0
    for value, (_, _, tile) in zip(acc, parts):
      shape = (dims.block_k, tile)
      cols = jnp.broadcast_to(offset + jnp.arange(tile)[None, :], shape)
      plgpu.atomic_add(acc_ref, (b, jnp.broadcast_to(target[:, None], shape), cols), value)
      offset += tile


def _call(kernel, out_shape, grid, tiling, interpret: bool, name: str, **kwargs):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps,
                                           num_stages=tiling.num_stages), **kwargs)


def _setup(q, latent, indices, scale: float, v_dim: int, tiling):
  """(dims, indices padded with -1 to whole chunks [B,T,Kp])."""
  block_k = tiling.gpu_block_k
  k = indices.shape[-1]
  indices = jnp.pad(indices, ((0, 0), (0, 0), (0, pl.cdiv(k, block_k) * block_k - k)),
                    constant_values=-1)
  dims = _Dims(q.shape[2], q.shape[3], v_dim, latent.shape[1], block_k, tiling.gpu_block_h,
               float(scale))
  return dims, indices


def forward_gpu(q, latent, indices, scale: float, v_dim: int, *, tiling, interpret: bool):
  """q [B,T,N,D], latent [B,S,D], indices int32 [B,T,K] (< 0: none; < S) -> (out [B,T,N,C]
  in q's dtype, lse f32 [B,T,N])."""
  dims, indices = _setup(q, latent, indices, scale, v_dim, tiling)
  b, t, n, _ = q.shape
  kernel = functools.partial(_fwd_kernel, dims=dims,
                             num_chunks=indices.shape[-1] // dims.block_k)
  o, lse = _call(kernel, (jax.ShapeDtypeStruct((b, t, n, dims.c_tile), q.dtype),
                          jax.ShapeDtypeStruct((b, t, n), jnp.float32)),
                 (dims.head_blocks, t, b), tiling, interpret, "dsa_sparse_mla_fwd_gpu")(
                     indices, _to_tiles(q, dims), _to_tiles(latent, dims))
  return o[..., :v_dim], lse


def backward_gpu(q, latent, indices, lse, delta, do, scale: float, v_dim: int, *, tiling,
                 interpret: bool):
  """(dq [B,T,N,D] in q's dtype, dlatent [B,S,D] in latent's dtype). lse, delta f32
  [B,T,N] (delta = rowsum(dO * O) - dlse); do [B,T,N,C]."""
  dims, indices = _setup(q, latent, indices, scale, v_dim, tiling)
  b, t, _, _ = q.shape
  num_chunks = indices.shape[-1] // dims.block_k
  operands = (indices, _to_tiles(q, dims), _to_tiles(latent, dims), _to_tiles(do, dims),
              lse, delta)
  dq = _call(functools.partial(_dq_kernel, dims=dims, num_chunks=num_chunks),
             jax.ShapeDtypeStruct(operands[1].shape, q.dtype), (dims.head_blocks, t, b), tiling,
             interpret, "dsa_sparse_mla_dq_gpu")(*operands)
  width = dims.c_tile + dims.r_tile
  acc = jnp.zeros((b, dims.num_keys + dims.block_k, width), jnp.float32)
  acc = _call(functools.partial(_rows_kernel, dims=dims),
              jax.ShapeDtypeStruct(acc.shape, jnp.float32), (num_chunks, t, b), tiling,
              interpret, "dsa_sparse_mla_rows_gpu", input_output_aliases={6: 0})(
                  *operands, acc)
  dlatent = _from_tiles(acc[:, :dims.num_keys], dims)
  return _from_tiles(dq, dims), dlatent.astype(latent.dtype)
