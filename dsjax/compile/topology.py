"""Compile-only devices for TPU slices and GPU clusters, from libtpu's and the CUDA plugin's
deviceless compilers (`jax.experimental.topologies`). Nothing here needs the hardware.

Names:
  TPU  `v5p:2x2x1`, `v5e:2x2`, `v6e:16x16`, `tpu7x:2x2x1`, ... (libtpu's topology names: the
       chip generation and the slice's chip grid), with `num_slices` for multi-slice.
  GPU  `h100:8` (one host with 8 GPUs) or `h100:8x4` (4 hosts of 8), also `h200:...`; the
       target description (XLA's GpuTargetConfigProto) is in gpu_targets.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

# Per-chip HBM (bytes) and dense bf16 peak FLOP/s, by generation (vendor figures). The HBM
# figure is what XLA:TPU reports as available (a little under the nominal size).
_TPU_CHIPS = {
    "v4": dict(hbm=int(31.25 * 2**30), flops=275e12),
    "v5e": dict(hbm=int(15.75 * 2**30), flops=197e12),
    "v5p": dict(hbm=int(95.74 * 2**30), flops=459e12),
    "v6e": dict(hbm=int(31.25 * 2**30), flops=918e12),
    "tpu7x": dict(hbm=int(192 * 2**30 * 0.98), flops=2307e12),
}
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v7x": "tpu7x"}


class TopologyError(ValueError):
  """A topology name that cannot be built; the message says what to use instead."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice (or cluster) of compile-only devices."""
  name: str                 # as given, e.g. "v5p:8x8x8" or "h100:8x4"
  platform: str             # "tpu" or "gpu"
  chip: str                 # "v5p", "v6e", "h100", ...
  devices: tuple            # jax compile-only devices
  hbm_bytes_per_device: int
  peak_flops_per_device: float
  num_slices: int = 1

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind


def _tpu_chip(generation: str) -> str:
  chip = _TPU_ALIASES.get(generation, generation)
  if chip not in _TPU_CHIPS:
    raise TopologyError(f"Unknown TPU generation {generation!r} in the topology name; use one "
                        f"of {sorted(_TPU_CHIPS)} (e.g. v5p:2x2x1, v6e:4x4, tpu7x:2x2x1).")
  return chip


@functools.lru_cache(maxsize=None)
def _tpu_devices(name: str, num_slices: int) -> tuple:
  from jax.experimental import topologies
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  grid = tuple(int(x) for x in name.split(":")[1].split("x"))
  if math.prod(grid) < 4:  # smaller than one host (2x2 chips): the host is the slice
    kwargs["chips_per_host_bounds"] = grid + (1,) * (3 - len(grid))
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as error:  # libtpu's own message names the problem (bad grid, no libtpu)
    hint = ("" if _libtpu_installed() else " libtpu is not installed: pip install "
            "'jax[tpu]' (the [test] extra has it).")
    raise TopologyError(f"Cannot build TPU topology {name!r}: {_first_line(error)}.{hint} "
                        "Use a libtpu name such as v5p:2x2x1, v5e:2x2, v6e:4x4, "
                        "tpu7x:2x2x1.") from None
  return tuple(topo.devices)


@functools.lru_cache(maxsize=None)
def _gpu_devices(chip: str, per_host: int, hosts: int, num_slices: int) -> tuple:
  from jax.experimental import topologies

  from dsjax.compile.gpu_targets import target_config
  try:
    topo = topologies.get_topology_desc(
        "", "cuda", target_config=target_config(chip),
        topology=f"{num_slices}x{hosts}x{per_host}")
  except Exception as error:
    raise TopologyError(f"Cannot build GPU topology {chip}:{per_host}x{hosts}: "
                        f"{_first_line(error)}. The deviceless CUDA compiler needs "
                        "jax-cuda12-plugin and jax-cuda12-pjrt (the [test] extra has "
                        "them).") from None
  return tuple(topo.devices)


def _libtpu_installed() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


_GPU_NAME = re.compile(r"^(h100|h200):(\d+)(?:x(\d+))?$")
_TPU_NAME = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+)*)$")


def get_topology(name: str, num_slices: int = 1) -> Topology:
  """The compile-only devices of topology `name` (see the module docstring)."""
  from dsjax.compile.gpu_targets import GPU_CHIPS
  if num_slices < 1:
    raise TopologyError(f"num_slices={num_slices}; use >= 1.")
  gpu = _GPU_NAME.match(name.lower())
  if gpu:
    chip, per_host, hosts = gpu.group(1), int(gpu.group(2)), int(gpu.group(3) or 1)
    if per_host < 1 or hosts < 1:
      raise TopologyError(f"Topology {name!r}: GPUs per host and hosts must be >= 1.")
    devices = _gpu_devices(chip, per_host, hosts, num_slices)
    spec = GPU_CHIPS[chip]
    return Topology(name, "gpu", chip, devices, spec["hbm"], spec["flops"], num_slices)
  tpu = _TPU_NAME.match(name.lower())
  if not tpu:
    raise TopologyError(f"Topology {name!r} is not a TPU slice (e.g. v5p:2x2x1, v6e:4x4) or "
                        f"a GPU cluster (e.g. h100:8 for one host of 8, h100:8x4 for 4 "
                        "hosts).")
  chip = _tpu_chip(tpu.group(1))
  canonical = f"{chip}:{tpu.group(2)}"
  devices = _tpu_devices(canonical, num_slices)
  spec = _TPU_CHIPS[chip]
  return Topology(name, "tpu", chip, devices, spec["hbm"], spec["flops"], num_slices)


def chips_in(name: str) -> int:
  """The device count a topology name describes, without building it (h100:8x4 -> 32)."""
  gpu = _GPU_NAME.match(name.lower())
  if gpu:
    return int(gpu.group(2)) * int(gpu.group(3) or 1)
  tpu = _TPU_NAME.match(name.lower())
  if not tpu:
    raise TopologyError(f"Topology {name!r} is not a TPU or GPU topology name.")
  return math.prod(int(x) for x in tpu.group(2).split("x"))


def device_context(devices: Sequence):
  """A context in which Pallas kernels lower for `devices`' platform (Mosaic TPU reads the
  target chip from the default device; without it: 'Unsupported TPU device kind: cpu')."""
  import jax
  return jax.default_device(devices[0])
