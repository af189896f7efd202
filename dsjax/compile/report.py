"""Compiling a Program for a topology and what the compiled step needs per device: memory by
kind against the chip's HBM, analytic FLOPs, collectives and compile time. A program that
does not fit is reported with what dominates its memory and the knobs to turn."""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
import time
from typing import Any

from dsjax.compile import hlo
from dsjax.compile.steps import Program, per_device_bytes
from dsjax.compile.topology import Topology, device_context

# XLA:TPU's refusal: "... HLO temporaries (1.92T) exceeds available HBM (95.74G)" or "Ran out
# of memory in memory space hbm. Used 21.58G of 15.75G hbm."
_EXCEEDS = re.compile(r"\(([\d.]+)([KMGTP]?)\)\s+exceeds available HBM \(([\d.]+)([KMGTP]?)\)")
_USED = re.compile(r"Used ([\d.]+)([KMGTP]?) of ([\d.]+)([KMGTP]?) hbm")
_SCALE = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
# The deviceless CUDA compiler cannot autotune; XLA's Triton GEMM tiling then fails on some
# shapes ("Couldn't find output tile sizes"), so XLA's own dots go to cuBLAS here. Pallas
# kernels (Triton custom calls) are unaffected.
_GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def _bytes(amount: str, unit: str) -> int:
  return int(float(amount) * _SCALE[unit])


def gib(n: float) -> str:
  """Bytes as GiB (MiB below 1 GiB, so that small programs still show their sizes)."""
  return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class Report:
  """What one compile found. Memory figures are per device."""
  topology: str
  num_slices: int
  chip: str
  device_kind: str
  devices: int
  step: str
  mesh: dict[str, int]
  batch: int
  seq_len: int
  settings: dict[str, Any]
  fits: bool
  hbm_bytes_per_device: int
  bytes_per_device: int                 # arguments + unaliased outputs + temporaries + code
  memory: dict[str, int]                # by kind (parameters, optimizer state, ...)
  flops_per_step: float
  flops_per_token: float
  tokens_per_step: int
  collectives: dict[str, dict[str, int]]
  collective_bytes_per_device: int
  collectives_exact: bool
  compile_seconds: float
  largest_allocations: list[dict[str, Any]]
  kernels: dict[str, int]               # Mosaic / Triton kernel call sites, by name
  error: str | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def seconds_at_peak(self) -> float:
    """The step's FLOPs over the slice's peak: the step time at 100% MFU."""
    from dsjax.compile.topology import get_topology
    peak = get_topology(self.topology, self.num_slices).peak_flops_per_device * self.devices
    return self.flops_per_step / peak


def _dump_files(dump_dir: str) -> tuple[str, str]:
  def read(pattern):
    paths = sorted(glob.glob(os.path.join(dump_dir, pattern)))
    return open(paths[-1], encoding="utf-8", errors="replace").read() if paths else ""
  return (read("*after_optimizations-memory-usage-report.txt"),
          read("*after_optimizations-buffer-assignment-values.txt"))


def _memory_by_kind(program: Program, stats) -> dict[str, int]:
  memory = {name: per_device_bytes(tree) for name, tree in program.groups.items()}
  if stats is not None:
    memory["temporaries"] = int(stats.temp_size_in_bytes)
    memory["outputs (not aliased)"] = int(stats.output_size_in_bytes - stats.alias_size_in_bytes)
    memory["code"] = int(stats.generated_code_size_in_bytes)
  return memory


def _total(stats) -> int:
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes
             + stats.generated_code_size_in_bytes)


def _refusal(message: str, arguments: int) -> tuple[int, int] | None:
  """(bytes needed, bytes available) from XLA's out-of-memory message, or None if it is not
  one. The temporaries figure excludes the arguments, which are added."""
  match = _EXCEEDS.search(message)
  if match:
    return _bytes(*match.groups()[:2]) + arguments, _bytes(*match.groups()[2:])
  match = _USED.search(message)
  if match:
    return _bytes(*match.groups()[:2]), _bytes(*match.groups()[2:])
  return None


def compile_program(program: Program, topology: Topology) -> Report:
  """Lowers and compiles `program` for `topology` (XLA:TPU with Mosaic, or XLA:GPU with
  Triton), and reports. Raises the compiler's error unless it is an out-of-memory refusal,
  which gives a Report with fits=False."""
  options = dict(_GPU_OPTIONS) if topology.platform == "gpu" else {}
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="dsjax_compile_") as dump:
    options["xla_dump_to"] = dump
    stats = compiled = error = None
    try:
      with device_context(topology.devices):
        compiled = program.jitted.lower(*program.args).compile(compiler_options=options)
      stats = compiled.memory_analysis()
    except Exception as exc:  # XLA raises JaxRuntimeError / XlaRuntimeError
      if "RESOURCE_EXHAUSTED" not in str(exc) and "out of memory" not in str(exc).lower():
        raise
      error = str(exc).strip().splitlines()[0]
    seconds = time.perf_counter() - start
    usage, values = _dump_files(dump)
  memory = _memory_by_kind(program, stats)
  arguments = sum(per_device_bytes(a) for a in program.args)
  if stats is not None:
    total = _total(stats)
    text = compiled.as_text()
    collectives = hlo.collectives(text)
    kernels = collections.Counter(name for name, _ in hlo.kernel_calls(text))
  else:
    kernels = collections.Counter()
    total = (_refusal(error, arguments) or (0, 0))[0]
    collectives = hlo.Collectives({}, {}, False)
  fits = stats is not None and total <= topology.hbm_bytes_per_device
  return Report(
      topology=topology.name, num_slices=topology.num_slices, chip=topology.chip, device_kind=topology.device_kind,
      devices=topology.num_devices, step=program.step, mesh=dict(program.mesh.shape),
      batch=program.batch, seq_len=program.seq_len, settings=program.settings, fits=fits,
      hbm_bytes_per_device=topology.hbm_bytes_per_device, bytes_per_device=total,
      memory=memory, flops_per_step=program.flops,
      flops_per_token=program.flops / max(program.tokens, 1),
      tokens_per_step=program.tokens, collectives=collectives.to_dict(),
      collective_bytes_per_device=int(collectives.total_bytes),
      collectives_exact=collectives.exact, compile_seconds=round(seconds, 2),
      largest_allocations=[a.to_dict() for a in hlo.largest_allocations(usage, values)],
      kernels=dict(sorted(kernels.items())), error=error)


def knobs(report: Report) -> list[str]:
  """What to change when `report` does not fit, most effective first."""
  state = sum(report.memory.get(k, 0) for k in ("parameters", "optimizer state"))
  tips = []
  if state > 0.8 * report.hbm_bytes_per_device:
    tips.append(f"parameters and optimizer state alone take {gib(state)} per device: shard "
                "them over more chips (--config.mesh.fsdp/expert/tensor, a bigger slice)")
  if report.step == "train":
    if report.settings.get("remat_policy") != "full":
      tips.append("recompute activations in the backward pass (--config.model.remat_policy="
                  "full)")
    tips.append("split the batch into micro-batches (--config.train.grad_accum_steps)")
    tips.append("fewer sequences per step (--config.train.batch_size or batch_per_shard)")
  else:
    tips.append("a smaller --batch or --context")
  tips.append("a topology with more chips or more HBM per chip")
  return tips


def error_line(report: Report) -> str:
  """One line: what was needed vs available, what dominates, and the knobs to try."""
  top = report.largest_allocations[:1]
  dominant = (f"; the largest allocation is {gib(top[0]['bytes'])} ({top[0]['shapes']}"
              f"{', from ' + top[0]['source'] if top[0]['source'] else ''})" if top else "")
  return (f"the {report.step} step needs {gib(report.bytes_per_device)} per device on "
          f"{report.topology} ({report.devices} x {report.device_kind}, mesh {report.mesh}), "
          f"{gib(report.hbm_bytes_per_device)} available{dominant}. Try: "
          + "; ".join(knobs(report)) + ".")


def format_report(report: Report) -> str:
  """The human-readable report printed by `python -m dsjax.compile`."""
  slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
  lines = [f"{report.step} step, {report.batch} x {report.seq_len} tokens, on {report.topology}"
           f"{slices} ({report.devices} x {report.device_kind}), mesh {report.mesh}",
           f"  settings: {report.settings}",
           f"  compiled in {report.compile_seconds:.1f} s",
           "  memory per device:"]
  for kind, size in report.memory.items():
    lines.append(f"    {kind:<24}{gib(size):>14}")
  verdict = "fits" if report.fits else "does NOT fit"
  lines.append(f"    {'total':<24}{gib(report.bytes_per_device):>14}  of "
               f"{gib(report.hbm_bytes_per_device)} HBM: {verdict}")
  lines.append(f"  FLOPs: {report.flops_per_step:.3e} per step, {report.flops_per_token:.3e} "
               f"per token ({report.seconds_at_peak * 1e3:.1f} ms per step at peak)")
  exact = "" if report.collectives_exact else " (a loop's trip count unknown: counted once)"
  if report.error is None:
    lines.append(f"  collectives per step{exact}: "
                 f"{gib(report.collective_bytes_per_device)} per device")
  for kind, c in report.collectives.items():
    lines.append(f"    {kind:<24}{c['count']:>8} x  {gib(c['bytes_per_device']):>12}")
  if report.kernels:
    lines.append("  kernels (call sites): " + ", ".join(
        f"{name} x{count}" for name, count in report.kernels.items()))
  if report.largest_allocations:
    lines.append("  largest allocations per device:")
    for a in report.largest_allocations:
      source = f"  <- {a['source']}" if a["source"] else ""
      lines.append(f"    {gib(a['bytes']):>12}  {a['shapes'][:90]}{source[:140]}")
  return "\n".join(lines)
