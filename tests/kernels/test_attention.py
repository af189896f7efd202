"""The Pallas TPU flash attention kernel (pallas_kernels.attention): forward and gradients in
the TPU interpreter against the dense oracle, real ahead-of-time compiles (Mosaic included)
for TPU v5p and v6e at DeepSeek-V3 training shapes, and errors that name the problem."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.compile.topology import device_context, get_topology
from dsjax.parallel.mesh import BATCH_AXES
from dsjax.parallel.rules import MESH_AXES
from dsjax.ops.attention import AttentionMask, attention, dot_product_attention
from dsjax.ops.flash_attention import cudnn_supported
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention
from tests.model_fixtures import assert_close_at_scale
from tests.ops.test_flash_attention import packed, qkv

SCALE = 0.25


def _cases():
  """name -> (T, S, q/k positions and segment ids, BlockSizes): several query and key blocks
  (block_k is at least 128 lanes), lengths padded to whole blocks."""
  seg, pos = packed([[30, 100, 20], [5, 120]], 160)  # padding after 150 and 125 tokens
  late = jnp.arange(200 - 40, 200, dtype=jnp.int32).at[3].set(-1)[None]
  causal = jnp.arange(200, dtype=jnp.int32)[None]
  return {
      "packed": (160, 160, (pos, pos, seg, seg), BlockSizes(32, 128)),
      "queries_after_keys": (40, 200, (late, causal, None, None), BlockSizes(16, 128)),
  }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted_kernel_matches_reference(name):
  t, s, ids, blocks = CASES[name]
  q, k, v, w = qkv(0, ids[0].shape[0], t, s, n=2, hq=24, hv=16)

  def kernel(q, k, v):
    return flash_attention(q, k, v, *ids, scale=SCALE, block_sizes=blocks, interpret=True)

  def oracle(q, k, v):
    return attention_reference(q, k, v, *ids, scale=SCALE)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)
  got = jax.jit(kernel)(q, k, v)
  assert_close_at_scale(got, oracle(q, k, v), 1e-5)
  mask = AttentionMask(*ids)
  assert_close_at_scale(got, dot_product_attention(q, k, v, mask.dense(), SCALE), 1e-5)
  grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  for g, e in zip(grads, jax.grad(loss(oracle), argnums=(0, 1, 2))(q, k, v)):
    assert_close_at_scale(g, e, 1e-5)
  blind = ~np.asarray(mask.dense()[:, 0].any(-1))
  assert blind.any()
  np.testing.assert_array_equal(np.asarray(got)[blind], 0)


# DeepSeek-V3 training per device: 128 heads over tensor=8, q/k head dim 128 + 64, v 128.
B, T, N, HQ, HV = 1, 4096, 16, 192, 128


def _train_shapes():
  bf16, i32 = jnp.bfloat16, jnp.int32
  return (jax.ShapeDtypeStruct((B, T, N, HQ), bf16), jax.ShapeDtypeStruct((B, T, N, HQ), bf16),
          jax.ShapeDtypeStruct((B, T, N, HV), bf16), jax.ShapeDtypeStruct((B, T), i32),
          jax.ShapeDtypeStruct((B, T), i32))


def _train_step(impl: str):
  def loss(q, k, v, positions, segment_ids):
    o = attention(q, k, v, AttentionMask.self_attention(positions, segment_ids), 0.07, impl)
    return jnp.sum(o.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _compile(topology: str, impl: str, mesh_shape=(1, 1, 1, 1), batch: int = B):
  """(compiled forward + backward, its HLO text, seconds) on a dsjax mesh (data, fsdp,
  expert, tensor) of mesh_shape over `topology`'s first devices, set as the context mesh;
  operands split by rows over data/fsdp/expert and by heads over tensor."""
  topo = get_topology(topology)
  devices = np.asarray(topo.devices[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
  mesh = Mesh(devices, MESH_AXES)
  heads = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None, "tensor", None))
  rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
  shapes = [jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype) for x in _train_shapes()]
  with device_context(topo.devices), jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = jax.jit(_train_step(impl), in_shardings=(heads,) * 3 + (rows,) * 2,
                      out_shardings=(NamedSharding(mesh, PartitionSpec()), (heads,) * 3)
                      ).lower(*shapes)
    compiled = lowered.compile()
  return compiled, lowered.as_text(), time.perf_counter() - start


@pytest.fixture(scope="module", params=["v5p:2x2x1", "v6e:2x2"])
def tpu_compiled(request):
  return _compile(request.param, "auto")


def test_kernel_compiles_for_tpu_at_deepseek_v3_shapes(tpu_compiled):
  """`auto` picks the kernel for TPU under a context mesh; forward, dq and dk/dv are Mosaic
  calls that compile; the temporaries stay far below the dense path's [16,4096,4096] float32
  logits (1 GiB)."""
  compiled, hlo, seconds = tpu_compiled
  assert hlo.count("tpu_custom_call") == 3
  for name in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
    assert name in hlo
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30 // 4
  assert seconds < 60


def test_kernel_runs_per_device_on_its_rows_and_heads():
  """On 4 chips (2 ways by rows, 2 by heads) each device runs the kernels on its own batch
  row and 8 heads: the compiled step moves no attention operand between devices (its only
  collective is the loss's sum)."""
  compiled, hlo, _ = _compile("v5p:2x2x1", "pallas", mesh_shape=(2, 1, 1, 2), batch=2)
  text = compiled.as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert op not in text, op
  kernel_calls = [line for line in hlo.splitlines() if "tpu_custom_call" in line]
  assert len(kernel_calls) == 3
  for line in kernel_calls:  # the kernels' q operand: 1 row, 8 heads ([B,N,T,H] layout)
    assert "tensor<1x8x4096x192xbf16>" in line


@pytest.mark.skipif(not cudnn_supported(*_train_shapes()[:3]),
                    reason="cuDNN fused attention needs a CUDA GPU with cuDNN here (its checks "
                           "ask the local device; compile-only H100s do not qualify)")
def test_cudnn_matches_reference_on_gpu():
  t, s, ids, _ = CASES["packed"]
  q, k, v, w = qkv(0, ids[0].shape[0], t, s, n=2, hq=192, hv=128, dtype=jnp.bfloat16)
  mask = AttentionMask(*ids)

  def loss(impl):
    return lambda q, k, v: jnp.sum(attention(q, k, v, mask, SCALE, impl).astype(jnp.float32) * w)
  got = attention(q, k, v, mask, SCALE, "cudnn").astype(jnp.float32)
  assert_close_at_scale(got, attention(q, k, v, mask, SCALE, "dense").astype(jnp.float32), 2e-2)
  grads = jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)):
    assert_close_at_scale(g.astype(jnp.float32), e.astype(jnp.float32), 5e-2)


def test_bad_operands_name_the_problem():
  q, k, v, _ = qkv(0, 1, 8, 8, n=2, hq=8, hv=4)
  pos = jnp.arange(8, dtype=jnp.int32)[None]

  def call(*args, **kwargs):
    return flash_attention(*args, scale=SCALE, interpret=True, **kwargs)
  with pytest.raises(ValueError, match="differ in batch, heads or head dim"):
    call(q[..., :4], k, v, pos, pos)
  with pytest.raises(ValueError, match="cast them to one dtype"):
    call(q, k.astype(jnp.bfloat16), v, pos, pos)
  with pytest.raises(ValueError, match="or neither"):
    call(q, k, v, pos, pos, pos)
  with pytest.raises(ValueError, match="k_positions .* must be integers of shape"):
    call(q, k, v, pos, pos[:, :5])
  with pytest.raises(ValueError, match="scale must be a Python number"):
    flash_attention(q, k, v, pos, pos, scale=jnp.float32(0.5), interpret=True)
  with pytest.raises(ValueError, match="multiple of 128"):
    BlockSizes(block_q=64, block_k=96)
