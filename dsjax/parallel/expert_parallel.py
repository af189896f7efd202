"""Expert parallelism for DeepSeekMoE: each device routes its own tokens, sends each (token,
expert) row to the device of the `expert` mesh axis that holds the expert, runs its local
experts on what it received, and sends the results back (a shard_map over the mesh).

Per device (inside the shard_map; ep = the expert axis size, El = E / ep local experts):
  1. its m tokens' M = m*K rows sorted by expert; counts[E] all-gathered over the expert axis
     into c[src, dst, e]: what every device of the group sends every other, per local expert;
  2. the receive buffer of each device is laid out by local expert, then by source, so the
     received rows are already grouped for the grouped matmul; every device computes every
     offset from c (no second exchange of sizes);
  3. the rows move with `ragged_all_to_all` (TPU/GPU) or an exact fixed-size `all_to_all`
     emulation of it (XLA:CPU has no ragged all-to-all), the same offsets either way;
  4. local experts: the grouped matmul over the received rows (ragged_dot / the Pallas gmm on
     TPU/GPU, the blocked dispatch on CPU); w1/w2/w3 split on `fsdp` are all-gathered over it
     (FSDP), split on `tensor` they stay split and the output is summed over `tensor`;
  5. the reverse exchange returns each row to the slot it came from, and the rows are
     combined with the routing weights.
Dropless by default: a device may receive up to ep * m * min(K, El) rows (every token of the
group sending it all the rows it can). With a capacity factor the buffer holds
capacity_factor * m * K rows; rows past it are dropped (their expert adds nothing to the
token) and the dropped fraction is returned.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsjax.ops import moe_dispatch
from dsjax.ops.platform import target_platform
from dsjax.parallel.activations import BATCH_AXES

EXPERT_AXIS = "expert"
EXCHANGES = ("auto", "ragged", "emulated")


def context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def expert_parallelism(mesh, num_experts: int, tokens: int) -> int:
  """The expert axis size usable for `num_experts` experts and `tokens` tokens on `mesh`
  (None: no mesh), or 1 when expert parallelism does not apply (no expert axis, experts or
  tokens that the axes do not divide)."""
  if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return 1
  ep = mesh.shape[EXPERT_AXIS]
  shards = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
  return ep if num_experts % ep == 0 and tokens % shards == 0 else 1


def _exclusive_cumsum(x, axis):
  return jnp.cumsum(x, axis=axis) - x


class _Plan(NamedTuple):
  """One device's view of its expert-parallel group's exchange (int32 arrays).
  offset[s, j, e]: where source s's rows for expert e of device j start in j's receive
  buffer; allowed[s, j, e]: how many of them fit; start[s, j, e]: where they start in s's
  own expert-sorted rows."""
  offset: jax.Array
  allowed: jax.Array
  start: jax.Array
  counts: jax.Array      # c[s, j, e]


def _plan(counts: jax.Array, ep: int, capacity: int) -> _Plan:
  """From this device's counts[E] (rows per global expert), all-gathered over the group."""
  c = jax.lax.all_gather(counts, EXPERT_AXIS).reshape(ep, ep, -1)          # [src, dst, e]
  base = _exclusive_cumsum(c.sum(0), axis=1)                               # [dst, e]
  offset = base[None] + _exclusive_cumsum(c, axis=0)
  allowed = jnp.clip(capacity - offset, 0, c)
  start = _exclusive_cumsum(c.reshape(ep, -1), axis=1).reshape(c.shape)
  return _Plan(offset, allowed, start, c)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name: str, axis_size: int,
                                max_send: int):
  """jax.lax.ragged_all_to_all's semantics from a fixed-size all_to_all (XLA:CPU has no
  ragged one): each destination's slices travel in one [max_send, ...] block, padded, and
  the receiver writes them at the offsets their senders chose for them."""
  slices = send_sizes.shape[0] // axis_size
  positions = jnp.arange(max_send, dtype=jnp.int32)

  def locate(sizes):  # [axis, slices] -> each block position's slice and offset within it
    ends = jnp.cumsum(sizes, axis=1)
    piece = jax.vmap(lambda e: jnp.searchsorted(e, positions, side="right"))(ends)
    piece = jnp.minimum(piece, slices - 1)
    within = positions[None] - jnp.take_along_axis(ends - sizes, piece, axis=1)
    return piece, within, positions[None] < ends[:, -1:]

  sizes = send_sizes.reshape(axis_size, slices)
  piece, within, valid = locate(sizes)
  source = jnp.take_along_axis(input_offsets.reshape(axis_size, slices), piece, axis=1) + within
  blocks = jnp.where(valid[..., None], operand[jnp.where(valid, source, 0)], 0)
  received = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)
  local = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  piece, within, valid = locate(recv_sizes.reshape(axis_size, slices))
  target = jnp.take_along_axis(local.reshape(axis_size, slices), piece, axis=1) + within
  target = jnp.where(valid, target, output.shape[0])  # out of range: dropped
  return output.at[target.reshape(-1)].set(received.reshape(-1, *operand.shape[1:]),
                                           mode="drop")


def _empty_buffer(rows: int, like: jax.Array) -> jax.Array:
  """Zeros [rows, ...] that vary over the batch axes like `like` (the exchange's output
  operand). Cast explicitly and cut from autodiff: an implicit cast of constant zeros would
  transpose into an all-reduce of the whole buffer's cotangent in the backward pass."""
  zeros = jnp.zeros((rows, *like.shape[1:]), like.dtype)
  cast = getattr(jax.lax, "pcast", None)
  zeros = (cast(zeros, BATCH_AXES, to="varying") if cast is not None
           else jax.lax.pvary(zeros, BATCH_AXES))
  return jax.lax.stop_gradient(zeros)


def _exchange(kind: str, ep: int, max_send: int):
  if kind == "ragged":
    return functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT_AXIS)
  return functools.partial(_emulated_ragged_all_to_all, axis_name=EXPERT_AXIS, axis_size=ep,
                           max_send=max_send)


def _local_experts(rows, group_sizes, w1, w3, w2, local: str, swiglu_limit: float = 0.0):
  """The local experts' SwiGLU (clamped at swiglu_limit > 0) on rows [R,D] grouped by local
  expert (group_sizes [El]); rows past sum(group_sizes) give zeros."""
  if local in ("ragged", "pallas"):
    matmul = moe_dispatch.pallas_gmm if local == "pallas" else moe_dispatch.ragged_dot
    return moe_dispatch.grouped_ffn(rows, group_sizes, w1, w3, w2, matmul,
                                    swiglu_limit=swiglu_limit)
  r = rows.shape[0]
  ends = jnp.cumsum(group_sizes)
  ids = jnp.minimum(jnp.searchsorted(ends, jnp.arange(r), side="right"), w1.shape[0] - 1)
  valid = (jnp.arange(r) < ends[-1]).astype(jnp.float32)
  dispatch = moe_dispatch.experts_dense if local == "dense" else moe_dispatch.experts_blocked
  return dispatch(rows, ids[:, None].astype(jnp.int32), valid[:, None], w1, w3, w2,
                  swiglu_limit=swiglu_limit)


def _device_moe(x, expert_ids, weights, w1, w3, w2, *, ep: int, capacity_factor: float,
                exchange: str, local: str, gather_fsdp: bool, sum_tensor: bool,
                swiglu_limit: float = 0.0):
  """One device's share: x [m,D], expert_ids/weights [m,K], its experts' w1/w3 [El,D',F'],
  w2 [El,F',D'] -> (y [m,D], rows sent to this device's experts that it dropped, all rows
  sent to them)."""
  m, k = expert_ids.shape
  rows_out = m * k
  if gather_fsdp:  # FSDP: this layer's local experts, whole along the model dim
    w1, w3 = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (w1, w3))
    w2 = jax.lax.all_gather(w2, "fsdp", axis=2, tiled=True)
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rows = x[order // k]
  local_experts = w1.shape[0]
  counts = jnp.bincount(flat, length=ep * local_experts).astype(jnp.int32)
  # A token's K experts are distinct, so it sends at most min(K, El) rows to one device.
  max_send = m * min(k, local_experts)
  capacity = ep * max_send
  if capacity_factor:
    capacity = min(capacity, max(8, -(-math.ceil(capacity_factor * rows_out) // 8) * 8))
  p = _plan(counts, ep, capacity)
  me = jax.lax.axis_index(EXPERT_AXIS)
  send = _exchange(exchange, ep, max_send)
  received = send(rows, _empty_buffer(capacity, rows), p.start[me].reshape(-1),
                  p.allowed[me].reshape(-1), p.offset[me].reshape(-1),
                  p.allowed[:, me].reshape(-1))
  y = _local_experts(received, p.allowed[:, me].sum(0), w1, w3, w2, local, swiglu_limit)
  back = send(y, _empty_buffer(rows_out, rows), p.offset[:, me].reshape(-1),
              p.allowed[:, me].reshape(-1), p.start[:, me].reshape(-1),
              p.allowed[me].reshape(-1))
  out = moe_dispatch.unsort_and_combine(back, order, weights)
  if sum_tensor:
    out = jax.lax.psum(out, "tensor")
  # What this device dropped and was sent: summed over the batch axes, the global counts.
  return out, jnp.sum(p.counts[:, me] - p.allowed[:, me]), jnp.sum(p.counts[:, me])


def _weight_specs(mesh, w1, w2):
  """The specs w1/w3 [E,D,F] and w2 [E,F,D] are stored with (dsjax.parallel.rules: experts on
  `expert`, the model dim on `fsdp`, the hidden dim on `tensor`, where they divide)."""
  def axis(name, size):
    n = mesh.shape.get(name, 1)
    return name if n > 1 and size % n == 0 else None
  e, d, f = w1.shape
  up = PartitionSpec(EXPERT_AXIS, axis("fsdp", d), axis("tensor", f))
  down = PartitionSpec(EXPERT_AXIS, axis("tensor", f), axis("fsdp", d))
  return up, down


def expert_parallel_moe(x, expert_ids, weights, w1, w3, w2, *, capacity_factor: float = 0.0,
                        exchange: str = "auto", local: str | None = None, mesh=None,
                        swiglu_limit: float = 0.0):
  """The routed experts of tokens x [M,D] with expert_ids / weights [M,K] and w1/w3 [E,D,F],
  w2 [E,F,D], expert-parallel over the context mesh's `expert` axis (see the module
  docstring). Returns (y [M,D], fraction of the (token, expert) rows dropped by the capacity
  factor, a float32 scalar; 0 when dropless).

  exchange: "ragged" (jax.lax.ragged_all_to_all, TPU/GPU), "emulated" (fixed-size
  all_to_all, any backend) or "auto" (ragged on TPU/GPU, emulated on CPU); local: the local
  experts' dispatch ("ragged", "pallas", "blocked", "dense"; default per platform);
  swiglu_limit: the experts' SwiGLU clamp (0: none, dsjax.ops.swiglu)."""
  mesh = mesh or context_mesh()
  ep = expert_parallelism(mesh, w1.shape[0], x.shape[0])
  if ep == 1:
    raise ValueError(f"moe impl 'ep' needs a mesh with an expert axis > 1 that divides the "
                     f"{w1.shape[0]} experts, and tokens that the batch axes divide; set "
                     "--config.mesh.expert or use another --config.model.moe.impl.")
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange={exchange!r}; use one of {EXCHANGES}.")
  platform = target_platform()
  if exchange == "auto":
    exchange = "emulated" if platform == "cpu" else "ragged"
  local = local or ("blocked" if platform == "cpu" else "ragged")
  up, down = _weight_specs(mesh, w1, w2)
  tokens = PartitionSpec(BATCH_AXES, None)
  body = functools.partial(_device_moe, ep=ep, capacity_factor=capacity_factor,
                           exchange=exchange, local=local, gather_fsdp=up[1] is not None,
                           sum_tensor=up[2] is not None, swiglu_limit=swiglu_limit)

  def device(x, expert_ids, weights, w1, w3, w2):
    y, dropped, routed = body(x, expert_ids, weights, w1, w3, w2)
    dropped, routed = (jax.lax.psum(v, BATCH_AXES) for v in (dropped, routed))
    return y, dropped.astype(jnp.float32) / jnp.maximum(routed, 1).astype(jnp.float32)

  return jax.shard_map(device, mesh=mesh, in_specs=(tokens, tokens, tokens, up, up, down),
                       out_specs=(tokens, PartitionSpec()))(x, expert_ids, weights, w1, w3, w2)
