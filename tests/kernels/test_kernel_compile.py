"""Every Pallas kernel compiles for real, not only lowers, at production shapes: XLA:TPU with
Mosaic for v5p, v6e and tpu7x, and XLA:GPU's deviceless compiler for H100 (Triton to PTX,
then ptxas to a cubin). Lowering only builds the kernel's IR; Mosaic's verifier and layout
passes, the scoped-VMEM allocation and Triton's shared-memory check run in `.compile()`.
The first tests show that on kernels built to fail there.

Shapes: DeepSeek-V3's routed experts (D=7168, F=2048, 256 experts; 32 local experts for
expert parallelism), and NSA's selected attention at 64k tokens with the paper's settings
(64 query heads over 4 kv heads, head dims 192 / 128, 16 selected blocks of 64 tokens).
Run with -s to see each kernel's scoped VMEM and the compile seconds (docs/kernels.md).
"""

import collections
import dataclasses
import pathlib
import re
import tempfile
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.compile import hlo
from dsjax.compile.topology import device_context, get_topology
from pallas_kernels import gmm as gmm_lib
from pallas_kernels import nsa
from pallas_kernels.nsa import metadata as nsa_metadata
from pallas_kernels.nsa import tpu as nsa_tpu
from pallas_kernels.nsa import tpu_common as nsa_tpu_common

TPUS = ["v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1"]
BF16 = jnp.bfloat16
Spec = jax.ShapeDtypeStruct

# DeepSeek-V3 experts: rows = tokens x top-k, sorted by expert.
ROWS, D_MODEL, D_FFN, EXPERTS, LOCAL_EXPERTS = 8192, 7168, 2048, 256, 32
# NSA (Yuan et al. 2025) at 64k tokens.
T, HQ, H, D_QK, D_V, SELECTED, BLOCK = 65536, 64, 4, 192, 128, 16, 64


@dataclasses.dataclass(frozen=True)
class Build:
  """A compiled program's kernel calls, (pallas_call name, on-chip bytes) each, and how long
  `.compile()` took. The bytes are the compiler's own figures: the scoped VMEM XLA:TPU
  allocated for the Mosaic call (`used_scoped_memory_configs` in its backend config), or the
  shared memory of the Triton kernel's launch (XLA:GPU's thunk sequence)."""
  kernels: tuple[tuple[str, int], ...]
  seconds: float

  def counts(self) -> collections.Counter:
    return collections.Counter(name for name, _ in self.kernels)


def _kernel_name(hlo_line: str) -> str:
  return hlo.kernel_calls(hlo_line)[0][0]


def _calls(hlo_text: str, target: str) -> list[str]:
  return [line for line in hlo_text.splitlines() if f'custom_call_target="{target}"' in line]


def _gpu_kernels(hlo_text: str, thunks: str) -> tuple:
  """Triton calls, named by their op_name, with the shared memory of their launch thunks
  (named after the kernel; a second kernel of the same name gets a suffix __1)."""
  names = {_kernel_name(line) for line in _calls(hlo_text, "__gpu$xla.gpu.triton")}
  launches = re.findall(r"kCustomKernel \[[^\]]*\] (\w+?)(?:__\d+)? grid: .*shared_memory: "
                        r"(\d+) bytes", thunks)
  return tuple((name, int(shared)) for name, shared in launches if name in names)


def compile_for(topology, fn, *args) -> Build:
  """fn jitted for one device of `topology`, lowered for `args` (ShapeDtypeStructs) and
  compiled by that platform's compiler."""
  mesh = Mesh(np.array(topology.devices[:1]), ("x",))
  replicated = NamedSharding(mesh, PartitionSpec())
  with device_context(topology.devices), tempfile.TemporaryDirectory() as dump:
    lowered = jax.jit(fn, in_shardings=replicated, out_shardings=replicated).lower(*args)
    # XLA:GPU reports a launch's shared memory only in its dumped thunk sequence.
    options = {"xla_dump_to": dump} if topology.platform == "gpu" else {}
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    seconds = time.perf_counter() - start
    if topology.platform == "tpu":
      return Build(tuple(hlo.kernel_calls(compiled.as_text())), seconds)
    thunks = "".join(path.read_text()
                     for path in pathlib.Path(dump).glob("*.thunk_sequence.txt"))
    return Build(_gpu_kernels(compiled.as_text(), thunks), seconds)


def report(what: str, topology, build: Build):
  print(f"\n{topology.name:12s} {what:32s} {build.seconds:6.2f} s  {list(build.kernels)}")


@pytest.fixture(scope="module", params=TPUS)
def tpu(request):
  return get_topology(request.param)


@pytest.fixture(scope="module")
def v5p():
  return get_topology("v5p:2x2x1")


# --- The harness is real: what lowers but does not compile. ---

def _misaligned_copy(x_hbm, o_ref, buf):
  """Copies 128 entries from HBM to SMEM at offset 3i+1: not a multiple of the 128-lane
  tile, the mistake the NSA dk/dv kernel made."""
  i = pl.program_id(0)
  pltpu.sync_copy(x_hbm.at[pl.ds(i * 3 + 1, 128)], buf)
  o_ref[0] = buf[0]


@pytest.mark.parametrize("name", TPUS)
def test_misaligned_copy_lowers_but_does_not_compile(name):
  topology = get_topology(name)
  kernel = pl.pallas_call(
      _misaligned_copy, grid=(2,), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec(memory_space=pltpu.SMEM),
      out_shape=Spec((1,), jnp.int32), scratch_shapes=[pltpu.SMEM((128,), jnp.int32)])
  with device_context(topology.devices):
    lowered = jax.jit(kernel).lower(Spec((4096,), jnp.int32))
  assert lowered.as_text().count("tpu_custom_call") == 1
  with pytest.raises(Exception, match="must be aligned to tiles"):
    compile_for(topology, kernel, Spec((4096,), jnp.int32))


def test_vmem_overflow_does_not_compile(v5p):
  """gmm tiles of 1024 x 2048 x 2048 need 40 MiB of VMEM; v5p's scoped limit is 16 MiB."""
  big = gmm_lib.BlockSizes(tm=1024, tk=2048, tn=2048)

  def fn(lhs, rhs, sizes):
    return gmm_lib.gmm(lhs, rhs, sizes, tiling=big, backend="tpu")
  with pytest.raises(Exception, match="CompileTimeScopedVmemOom"):
    compile_for(v5p, fn, Spec((2048, 2048), BF16), Spec((1, 2048, 2048), BF16),
                Spec((1,), jnp.int32))


# --- gmm and tgmm ---

def _gmm_operands(k, n, local_groups, transpose_rhs, dtype=BF16):
  rhs = (local_groups, n, k) if transpose_rhs else (local_groups, k, n)
  return Spec((ROWS, k), dtype), Spec(rhs, dtype), Spec((EXPERTS,), jnp.int32)


def _gmm_and_vjp(transpose_rhs, backend="tpu"):
  """(out, d lhs, d rhs): the forward kernel, gmm with the other rhs layout and tgmm."""
  def fn(lhs, rhs, sizes, offset, dout):
    out, vjp = jax.vjp(lambda a, b: gmm_lib.gmm(a, b, sizes, transpose_rhs=transpose_rhs,
                                                group_offset=offset, backend=backend), lhs, rhs)
    return out, *vjp(dout)
  return fn


def _tgmm(backend):
  def fn(lhs_t, dout, sizes):
    return gmm_lib.tgmm(lhs_t, dout, sizes, jnp.float32, backend=backend)
  return fn


TGMM_OPERANDS = (Spec((D_MODEL, ROWS), BF16), Spec((ROWS, D_FFN), BF16),
                 Spec((EXPERTS,), jnp.int32))


# (name, K, N, local groups, transpose_rhs): up / gate projection, the same with
# [G,N,K] weights on an expert-parallel shard (a traced group_offset), down projection.
GMM_CASES = [("up", D_MODEL, D_FFN, EXPERTS, False),
             ("up_rhs_t_ep32", D_MODEL, D_FFN, LOCAL_EXPERTS, True),
             ("down", D_FFN, D_MODEL, EXPERTS, False)]


@pytest.mark.parametrize("case", GMM_CASES, ids=lambda c: c[0])
def test_gmm_forward_and_gradient_compile(tpu, case):
  name, k, n, local, transpose_rhs = case
  build = compile_for(tpu, _gmm_and_vjp(transpose_rhs),
                      *_gmm_operands(k, n, local, transpose_rhs),
                      Spec((), jnp.int32), Spec((ROWS, n), BF16))
  report(f"gmm fwd+vjp {name}", tpu, build)
  assert build.counts() == {"gmm": 2, "tgmm": 1}


def test_tgmm_compiles(tpu):
  build = compile_for(tpu, _tgmm("tpu"), *TGMM_OPERANDS)
  report("tgmm", tpu, build)
  assert build.counts() == {"tgmm": 1}


# --- NSA selected attention ---

class Nsa(typing.NamedTuple):
  """B, T, HQ query heads over H kv heads, head dims D / Dv, S blocks of l' tokens."""
  b: int
  t: int
  hq: int
  h: int
  d: int
  dv: int
  s: int
  block: int

  def operands(self, dtype=BF16):
    """q, k, v, block_indices, key_start, key_end."""
    b, t, h = self.b, self.t, self.h
    return (Spec((b, t, self.hq, self.d), dtype), Spec((b, t, h, self.d), dtype),
            Spec((b, t, h, self.dv), dtype), Spec((b, t, h, self.s), jnp.int32),
            Spec((b, t), jnp.int32), Spec((b, t), jnp.int32))

  def residuals(self, dtype=BF16):
    """lse (forward_tpu's layout), delta, dO and the inverse index (metadata.QueryLists)."""
    b, t, h = self.b, self.t, self.h
    tc = nsa_tpu_common.query_chunk(t, nsa.BlockSizes())
    pairs, blocks = t * self.s, -(-t // self.block)
    lists = nsa_metadata.QueryLists(*(Spec((b, h, n), jnp.int32)
                                      for n in (pairs, blocks + 1, pairs, pairs)))
    return (Spec((b, h, -(-t // tc), self.hq // h, tc), jnp.float32),
            Spec((b, t, self.hq), jnp.float32), Spec((b, t, self.hq, self.dv), dtype), lists)


NSA_64K = Nsa(1, T, HQ, H, D_QK, D_V, SELECTED, BLOCK)
# Two batch rows, eight kv heads (G=1), T and S that fill no tile: the SMEM blocks' index maps
# over (b, h) and the padded step tables, which Mosaic checks and the interpreter does not.
NSA_ODD = Nsa(2, 1000, 8, 8, 128, 128, 5, 16)


def _nsa_kernels(shape: Nsa):
  """(forward, backward): the TPU kernels with the public layouts; the backward takes the
  inverse index as an input, so no XLA sort is compiled with it."""
  options = dict(block_size=shape.block, scale=shape.d ** -0.5, tiling=nsa.BlockSizes(),
                 interpret=False)

  def forward(q, k, v, idx, key_start, key_end):
    return nsa_tpu.forward_tpu(q, k, v, idx, (key_start, key_end), **options)

  def backward(q, k, v, idx, key_start, key_end, lse, delta, do, lists):
    return nsa_tpu.backward_tpu(q, k, v, idx, (key_start, key_end), lse, delta, do, lists,
                                **options)
  return forward, backward


def _compile_nsa_kernels(topology, shape: Nsa, dtype, what: str):
  forward, backward = _nsa_kernels(shape)
  build = compile_for(topology, forward, *shape.operands(dtype))
  report(f"nsa forward {what}", topology, build)
  assert build.counts() == {"nsa_selected_fwd": 1}
  build = compile_for(topology, backward, *shape.operands(dtype), *shape.residuals(dtype))
  report(f"nsa backward (dq, dk/dv) {what}", topology, build)
  assert build.counts() == {"nsa_selected_dq": 1, "nsa_selected_dkdv": 1}


def test_nsa_kernels_compile(tpu):
  _compile_nsa_kernels(tpu, NSA_64K, BF16, "64k")


def test_nsa_kernels_compile_at_odd_shapes(v5p):
  _compile_nsa_kernels(v5p, NSA_ODD, BF16, "odd")


def _nsa_and_vjp(backend):
  def fn(q, k, v, idx, key_start, do):
    out, vjp = jax.vjp(lambda *qkv: nsa.selected_attention(
        *qkv, idx, BLOCK, key_start=key_start, backend=backend), q, k, v)
    return out, *vjp(do)
  return fn


def _nsa_vjp_operands():
  q, k, v, idx, key_start, _ = NSA_64K.operands()
  return q, k, v, idx, key_start, Spec((1, T, HQ, D_V), BF16)


def test_nsa_gradient_compiles_with_all_three_kernels(v5p):
  """The public, differentiable function: forward, dq and dk/dv kernels in one program, with
  the inverse index's XLA sort (most of the compile time: 1M (query, slot) pairs per head)."""
  build = compile_for(v5p, _nsa_and_vjp("tpu"), *_nsa_vjp_operands())
  report("nsa fwd+vjp (public)", v5p, build)
  assert build.counts() == {
      "nsa_selected_fwd": 1, "nsa_selected_dq": 1, "nsa_selected_dkdv": 1}


def test_default_tiles_compile_for_f32_on_v5p(v5p):
  """f32 operands double every tile; the defaults still fit v5p's 16 MiB scoped VMEM."""
  build = compile_for(v5p, _gmm_and_vjp(False),
                      *_gmm_operands(D_MODEL, D_FFN, EXPERTS, False, jnp.float32),
                      Spec((), jnp.int32), Spec((ROWS, D_FFN), jnp.float32))
  report("gmm fwd+vjp up f32", v5p, build)
  assert build.counts() == {"gmm": 2, "tgmm": 1}
  _compile_nsa_kernels(v5p, NSA_64K, jnp.float32, "64k f32")


# --- H100: XLA:GPU's deviceless compiler ---

@pytest.fixture(scope="module")
def h100():
  """The compile-only H100. XLA:GPU assembles Triton's PTX with ptxas, a subprocess it looks
  for in --xla_gpu_cuda_data_dir, PATH, /usr/local/cuda and the nvidia-cuda-nvcc-cu12 wheel;
  without one no GPU program compiles, so the GPU tests skip."""
  topology = get_topology("h100:8")
  try:
    compile_for(topology, lambda x: x + 1, Spec((8,), jnp.float32))
  except Exception as error:  # only a missing assembler is a skip; the rest is a failure
    if "No PTX compilation provider" in str(error):
      pytest.skip("no ptxas for the deviceless CUDA compiler: pip install "
                  "nvidia-cuda-nvcc-cu12, or put CUDA's bin/ on PATH")
    raise
  return topology


def test_gpu_shared_memory_overflow_does_not_compile(h100):
  """256^3 bf16 tiles with 4 pipeline stages need 1 MiB of shared memory; an H100 block
  gets 227 KiB. Triton's check runs in compile(), not in lowering."""
  big = gmm_lib.BlockSizes(tm=256, tk=256, tn=256, num_warps=8, num_stages=4)

  def fn(lhs, rhs, sizes):
    return gmm_lib.gmm(lhs, rhs, sizes, tiling=big, backend="gpu")
  with pytest.raises(Exception, match="Shared memory size limit exceeded"):
    compile_for(h100, fn, Spec((512, 512), BF16), Spec((1, 512, 512), BF16),
                Spec((1,), jnp.int32))


@pytest.mark.parametrize("case", GMM_CASES, ids=lambda c: c[0])
def test_gpu_gmm_forward_and_gradient_compile(h100, case):
  name, k, n, local, transpose_rhs = case
  build = compile_for(h100, _gmm_and_vjp(transpose_rhs, "gpu"),
                      *_gmm_operands(k, n, local, transpose_rhs),
                      Spec((), jnp.int32), Spec((ROWS, n), BF16))
  report(f"gmm fwd+vjp {name}", h100, build)
  assert build.counts() == {"gmm_gpu": 2, "tgmm_gpu": 1}


def test_gpu_tgmm_compiles(h100):
  build = compile_for(h100, _tgmm("gpu"), *TGMM_OPERANDS)
  report("tgmm", h100, build)
  assert build.counts() == {"tgmm_gpu": 1}


def test_gpu_nsa_gradient_compiles_with_all_three_kernels(h100):
  build = compile_for(h100, _nsa_and_vjp("gpu"), *_nsa_vjp_operands())
  report("nsa fwd+vjp (public)", h100, build)
  assert build.counts() == {
      "nsa_selected_fwd_gpu": 1, "nsa_selected_dq_gpu": 1, "nsa_selected_dkdv_gpu": 1}
