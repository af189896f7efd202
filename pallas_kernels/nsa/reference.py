"""Selected-block attention of Native Sparse Attention (Yuan et al. 2025) in plain XLA.

Semantics (the kernels are tested against these; they match fla-core's
`naive_nsa_selection`, except that a query with no allowed key gives 0, not NaN):
  - q [B,T,HQ,D], k [B,T,H,D], v [B,T,H,Dv], HQ = H*G: query heads h*G .. h*G+G-1 share
    kv head h (GQA) and with it the row block_indices[b,t,h,:] of S selected key blocks.
  - Block j holds the tokens [j*l', (j+1)*l') (l' = block_size; the last block of a sequence
    whose length is not a multiple of l' is shorter). Index -1 selects nothing.
  - Query t attends to the tokens of its selected blocks at positions <= t (causal at token
    level, so a selected block past t adds nothing), softmax in float32, scale D**-0.5 by
    default. A query with no allowed key gives 0 and log-sum-exp -inf.
  - key_start int[B,T] (optional; None = 0): query t's first allowed key, e.g. the start of
    its document in a packed row; tokens of a selected block before it are masked.
  - key_end int[B,T] (optional; None = t): query t's last allowed key, in place of its own
    position (e.g. compressed keys, whose index is not a token position); key_end < T.
  - Indices in a row are distinct apart from -1 (they come from a top-n). A repeated index
    counts once in the dense oracle but twice in the gather path and the kernels.

`selected_attention_reference` is the O(T^2) dense-mask oracle; `selected_attention_gather`
gathers the S*l' selected keys of every query, O(T*S*l'), and is the fast path on CPU, which
plain JAX autodiff differentiates.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def default_scale(head_dim: int) -> float:
  return head_dim ** -0.5


def allowed_keys(block_indices: jax.Array, block_size: int, seq_len: int,
                 key_start: jax.Array | None = None, key_end: jax.Array | None = None
                 ) -> jax.Array:
  """block_indices [B,T,H,S] (key_start, key_end int[B,T] or None) -> bool [B,T,H,T]: key s
  is allowed for query t."""
  keys = jnp.arange(seq_len, dtype=jnp.int32)
  selected = jnp.any(block_indices[..., :, None] == keys // block_size, axis=-2)
  if key_end is None:
    allowed = selected & (keys[None, :] <= keys[:, None])[None, :, None, :]
  else:
    allowed = selected & (keys <= key_end[:, :, None, None])
  if key_start is not None:
    allowed = allowed & (keys >= key_start[:, :, None, None])
  return allowed


def masked_softmax(scores, mask):
  """scores [..., N] (f32), mask broadcastable to it -> (probabilities, lse [...]).

  Rows with no allowed key give all-zero probabilities and lse -inf, with finite gradients:
  the shift is a stop_gradient (softmax does not depend on it) and log/division only ever
  see a positive denominator."""
  scores = jnp.where(mask, scores, -jnp.inf)
  shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.)
  unnormalised = jnp.where(mask, jnp.exp(scores - shift), 0.)
  denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
  nonempty = denom > 0
  safe_denom = jnp.where(nonempty, denom, 1.)
  lse = jnp.where(nonempty, shift + jnp.log(safe_denom), -jnp.inf)
  return unnormalised / safe_denom, lse[..., 0]


def _split_heads(q, num_kv_heads: int):
  b, t, hq, d = q.shape
  return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d).astype(jnp.float32)


def selected_attention_reference(q, k, v, block_indices, block_size: int, scale=None,
                                 return_lse: bool = False, key_start=None, key_end=None):
  """The dense-mask oracle: -> o [B,T,HQ,Dv] (q's dtype), and lse [B,T,HQ] (f32) when
  return_lse. Computed in float32 at HIGHEST precision."""
  b, t, hq, d = q.shape
  h = k.shape[2]
  scale = default_scale(d) if scale is None else scale
  qg = _split_heads(q, h)
  scores = jnp.einsum("bthgd,bshd->bthgs", qg, k.astype(jnp.float32), precision=_HIGHEST)
  mask = allowed_keys(block_indices, block_size, t, key_start, key_end)[:, :, :, None, :]
  p, lse = masked_softmax(scores * scale, mask)
  o = jnp.einsum("bthgs,bshe->bthge", p, v.astype(jnp.float32), precision=_HIGHEST)
  o = o.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
  return (o, lse.reshape(b, t, hq)) if return_lse else o


def gather_selected(x: jax.Array, block_indices: jax.Array, block_size: int,
                    query_offset: int = 0, key_start=None, key_end=None):
  """x [B,T,H,E], block_indices [B,Tq,H,S] of the queries at positions query_offset ..
  query_offset+Tq-1 -> (the selected tokens [B,Tq,H,S*l',E], whether each is an allowed key
  [B,Tq,H,S*l']). Positions of -1 blocks and past the query are clipped into range (and
  marked not allowed), so the gather never reads out of bounds. key_start, key_end
  int[B,Tq] (or None): each query's first allowed key (packed documents) and last (None:
  its position)."""
  b, t, h, _ = x.shape
  tq, s = block_indices.shape[1], block_indices.shape[-1]
  offsets = jnp.arange(block_size, dtype=jnp.int32)
  pos = (block_indices[..., None] * block_size + offsets).reshape(b, tq, h, s * block_size)
  if key_end is None:
    last = query_offset + jnp.arange(tq, dtype=jnp.int32)[None, :, None, None]
  else:
    last = key_end[:, :, None, None]
  valid = jnp.repeat(block_indices >= 0, block_size, axis=-1) & (pos <= last) & (pos < t)
  if key_start is not None:
    valid = valid & (pos >= key_start[:, :, None, None])
  pos = jnp.clip(pos, 0, t - 1)
  batch = jnp.arange(b)[:, None, None, None]
  head = jnp.arange(h)[None, None, :, None]
  return x[batch, pos, head], valid


def selected_attention_gather(q, k, v, block_indices, block_size: int, scale=None,
                              return_lse: bool = False, query_offset: int = 0,
                              key_start=None, key_end=None):
  """The gather path: same result as the oracle (up to rounding), memory O(T*S*l'*D).
  q and block_indices may cover only the queries query_offset .. query_offset+Tq-1 (k and v
  all keys), so long sequences can be processed in query chunks. key_start int[B,Tq]: each
  query's first allowed key (packed documents; None: every key up to the query); key_end
  int[B,Tq]: its last (None: its position)."""
  b, t, hq, d = q.shape
  h = k.shape[2]
  scale = default_scale(d) if scale is None else scale
  k_sel, valid = gather_selected(k.astype(jnp.float32), block_indices, block_size,
                                 query_offset, key_start, key_end)
  v_sel, _ = gather_selected(v.astype(jnp.float32), block_indices, block_size, query_offset)
  scores = jnp.einsum("bthgd,bthnd->bthgn", _split_heads(q, h), k_sel, precision=_HIGHEST)
  p, lse = masked_softmax(scores * scale, valid[:, :, :, None, :])
  o = jnp.einsum("bthgn,bthne->bthge", p, v_sel, precision=_HIGHEST)
  o = o.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
  return (o, lse.reshape(b, t, hq)) if return_lse else o
