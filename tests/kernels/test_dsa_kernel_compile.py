"""The sparse MLA kernels (pallas_kernels.dsa) compile for real, not only lower, with
test_kernel_compile.py's harness: XLA:TPU with Mosaic for v5p, v6e and tpu7x, XLA:GPU's
deviceless compiler (Triton, then ptxas) for H100. The compiled program is the public,
differentiable `sparse_mla`: the forward kernel and the backward kernel(s) with the XLA around
them (layouts, the backward's query-chunk loop and its scatter-add).

Shapes: DeepSeek-V3.2's sparse attention, 128 heads over the 576-channel latent (512 values
+ 64 rope), 2048 selected keys, at T = S = 4096 in bf16; an odd shape (two batch rows, T, S,
K and the head / channel counts off every tile) on v5p and H100; f32 on v5p. Run with -s to
see each kernel's scoped VMEM (TPU) or shared memory (H100) and the compile seconds
(docs/kernels.md).
"""

import typing

import jax
import jax.numpy as jnp

from pallas_kernels.dsa import BlockSizes, sparse_mla
from tests.kernels.test_kernel_compile import (  # noqa: F401 (h100, tpu, v5p: fixtures)
    BF16, Spec, compile_for, h100, report, tpu, v5p)

TPU_KERNELS = {"dsa_sparse_mla_fwd": 1, "dsa_sparse_mla_bwd": 1}
GPU_KERNELS = {"dsa_sparse_mla_fwd_gpu": 1, "dsa_sparse_mla_dq_gpu": 1,
               "dsa_sparse_mla_rows_gpu": 1}


class Dsa(typing.NamedTuple):
  """B, T queries, S keys, N heads, D latent channels of which C are values, K indices."""
  b: int
  t: int
  s: int
  n: int
  d: int
  c: int
  k: int

  def operands(self, dtype=BF16):
    """q, latent, indices, and the output's cotangent."""
    return (Spec((self.b, self.t, self.n, self.d), dtype), Spec((self.b, self.s, self.d), dtype),
            Spec((self.b, self.t, self.k), jnp.int32),
            Spec((self.b, self.t, self.n, self.c), dtype))


V32 = Dsa(1, 4096, 4096, 128, 576, 512, 2048)
ODD = Dsa(2, 1000, 777, 20, 200, 136, 100)


def _sparse_mla_and_vjp(shape: Dsa, backend: str, tiling: BlockSizes | None = None):
  def fn(q, latent, indices, do):
    out, vjp = jax.vjp(lambda q, latent: sparse_mla(
        q, latent, indices, shape.d ** -0.5, shape.c, backend=backend, block_sizes=tiling),
        q, latent)
    return out, *vjp(do)
  return fn


def _compile(topology, shape: Dsa, backend: str, what: str, dtype=BF16, tiling=None):
  build = compile_for(topology, _sparse_mla_and_vjp(shape, backend, tiling),
                      *shape.operands(dtype))
  report(f"dsa sparse_mla fwd+vjp {what}", topology, build)
  return build


def test_dsa_forward_and_gradient_compile(tpu):
  assert _compile(tpu, V32, "tpu", "V3.2 4k").counts() == TPU_KERNELS


def test_dsa_compiles_at_odd_shapes(v5p):
  """Mosaic's tile rules at shapes that fill no tile: C/2 = 68 and R/2 = 32 lane planes,
  20 heads, K = 100 (padded to the chunk), T = 1000 (padded to the step)."""
  assert _compile(v5p, ODD, "tpu", "odd").counts() == TPU_KERNELS


def test_dsa_f32_compiles_on_v5p_with_a_raised_vmem_limit(v5p):
  """f32 doubles the blocks: the backward needs 16.2 MiB of scoped VMEM, just over v5p's
  16 MiB default, so BlockSizes.vmem_limit_mib raises it."""
  build = _compile(v5p, V32, "tpu", "V3.2 4k f32", jnp.float32, BlockSizes(vmem_limit_mib=32))
  assert build.counts() == TPU_KERNELS


def test_gpu_dsa_forward_and_gradient_compile(h100):
  assert _compile(h100, V32, "gpu", "V3.2 4k").counts() == GPU_KERNELS


def test_gpu_dsa_compiles_at_odd_shapes(h100):
  assert _compile(h100, ODD, "gpu", "odd").counts() == GPU_KERNELS
