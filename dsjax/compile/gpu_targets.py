"""Target descriptions for the deviceless CUDA compiler: XLA's GpuTargetConfigProto (text
format), written from NVIDIA's published figures for each part (SXM, 80 / 141 GB).

The compiler reads the device's compute capability, SM count, shared memory and register
limits (kernel and fusion choices, Triton's code generation) and memory size and bandwidth
(its cost model); the cuDNN version gates which fused attention kernels it may emit.
"""

from __future__ import annotations

# HBM as the compiler sees it (the part's memory minus the driver's reservation, as CUDA
# reports it) and dense bf16 peak FLOP/s.
GPU_CHIPS = {
    "h100": dict(hbm=84_978_434_048, flops=989e12, name="NVIDIA H100 80GB HBM3",
                 bandwidth=3_352_320_000_000),
    "h200": dict(hbm=150_754_820_096, flops=989e12, name="NVIDIA H200",
                 bandwidth=4_800_000_000_000),
}

# Hopper (sm_90) per-SM resources: 132 SMs at 1.98 GHz boost, 128 FP32 lanes, 228 KiB of
# shared memory per SM (227 KiB opt-in per block, 48 KiB by default), 64 Ki registers,
# 2048 resident threads, 50 MiB of L2.
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {hbm}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""


def target_config(chip: str) -> str:
  """The GpuTargetConfigProto text of `chip` ("h100" or "h200")."""
  if chip not in GPU_CHIPS:
    raise ValueError(f"No GPU target description for {chip!r}; use one of {sorted(GPU_CHIPS)}.")
  return _HOPPER.format(**GPU_CHIPS[chip])
