"""Reading a compiled program's optimised HLO text: the collectives it runs per step (loop
bodies counted once per iteration) and, from XLA's buffer-assignment dump, the allocations
that dominate its memory."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5, "f4e2m1fn": 0.5}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_CONSTANT = re.compile(r"s32\[\]\S*\s+constant\((\d+)\)")


def array_bytes(shape_text: str) -> list[float]:
  """Bytes of each array in an HLO shape string ("(f32[8,128]{1,0}, bf16[4]{0})" -> [4096, 8])."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _BYTES:
      count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      sizes.append(count * _BYTES[dtype])
  return sizes


@dataclasses.dataclass
class _Computation:
  name: str
  lines: list[str]
  entry: bool = False


def _computations(text: str) -> dict[str, _Computation]:
  comps, current = {}, None
  for line in text.splitlines():
    if current is None:
      match = _HEADER.match(line)
      if match and "=" not in line.split("(")[0]:
        current = _Computation(match.group(2), [], bool(match.group(1)))
      continue
    if line.startswith("}"):
      comps[current.name] = current
      current = None
    else:
      current.lines.append(line)
  return comps


def _trip_count(condition: _Computation | None) -> int | None:
  """A scan's trip count: the s32 constant its loop condition compares against (`i < N`)."""
  if condition is None:
    return None
  constants = [int(c) for line in condition.lines for c in _TRIP_CONSTANT.findall(line)]
  compares = any(" compare(" in line and "direction=LT" in line for line in condition.lines)
  return constants[0] if len(constants) == 1 and compares else None


def _multiplicities(comps: dict[str, _Computation]) -> tuple[dict[str, int], bool]:
  """How many times each computation runs per call of the entry (while bodies times their trip
  count), and whether every loop's trip count was known."""
  runs: dict[str, int] = collections.defaultdict(int)
  exact = True
  entry = next((c for c in comps.values() if c.entry), None)
  if entry is None:
    return runs, False
  stack = [(entry.name, 1)]
  while stack:
    name, times = stack.pop()
    runs[name] += times
    for line in comps[name].lines:
      calls = dict((k, v) for k, v in _CALLS.findall(line))
      if "body" in calls:
        trips = _trip_count(comps.get(calls.get("condition", "")))
        exact &= trips is not None
        stack.append((calls["body"], times * (trips or 1)))
        calls.pop("body")
        calls.pop("condition", None)
      for target in calls.values():
        if target in comps:
          stack.append((target, times))
      for group in _BRANCHES.findall(line):
        for target in re.findall(r"%?([\w.\-]+)", group):
          if target in comps:
            stack.append((target, times))
  return runs, exact


def _collective_kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def _collective_bytes(kind: str, opcode: str, shape_text: str) -> float:
  """Bytes a collective produces per device. Async starts return (operand, result, context)
  tuples: the result is the largest array there (all-gather, permute)."""
  sizes = [s for s in array_bytes(shape_text) if s > 8] or array_bytes(shape_text)
  if opcode.endswith("-start") and kind != "all-reduce":
    return max(sizes, default=0)
  return sum(sizes)


@dataclasses.dataclass
class Collectives:
  """Per collective kind: how many run per step, and the bytes they produce per device."""
  count: dict[str, int]
  bytes: dict[str, float]
  exact: bool          # every enclosing loop's trip count was read off the HLO

  @property
  def total_bytes(self) -> float:
    return sum(self.bytes.values())

  def to_dict(self) -> dict:
    return {kind: {"count": self.count[kind], "bytes_per_device": int(self.bytes[kind])}
            for kind in sorted(self.count)}


def collectives(hlo_text: str) -> Collectives:
  """The collectives of a compiled (SPMD-partitioned) HLO module, per step."""
  comps = _computations(hlo_text)
  runs, exact = _multiplicities(comps)
  count: dict[str, int] = collections.defaultdict(int)
  size: dict[str, float] = collections.defaultdict(float)
  for name, times in runs.items():
    shapes = {}
    for line in comps[name].lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      result, shape_text, opcode, operands = match.groups()
      shapes[result] = shape_text
      kind = _collective_kind(opcode)
      if kind == "ragged-all-to-all":
        # Its result is the whole receive buffer (sized for the worst case); what it moves
        # is at most its operand, the rows this device sends.
        first = re.match(r"\s*%?([\w.\-]+)", operands)
        shape_text = shapes.get(first.group(1), shape_text) if first else shape_text
      if kind:
        count[kind] += times
        size[kind] += times * _collective_bytes(kind, opcode, shape_text)
  return Collectives(dict(count), dict(size), exact)


@dataclasses.dataclass
class Allocation:
  """One of the program's largest buffers: its size on one device, the values (shapes) that
  share it, and the JAX operation that produced the largest of them."""
  bytes: int
  shapes: str
  source: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_USAGE_LINE = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*\d+;\s*(.*)$")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def largest_allocations(usage_report: str, values_text: str = "", top: int = 5
                        ) -> list[Allocation]:
  """The `top` largest allocations of XLA's memory-usage report (a buffer-assignment dump;
  written even when the program does not fit), each with the op_name of an instruction that
  produces its first shape (from the buffer-assignment values dump)."""
  found = []
  for line in usage_report.splitlines():
    match = _USAGE_LINE.match(line)
    if match:
      amount, unit, shapes = match.groups()
      found.append(Allocation(int(float(amount) * _UNITS.get(unit, 1)), shapes.strip(), ""))
  found.sort(key=lambda a: -a.bytes)
  for allocation in found[:top]:
    allocation.source = _source_of(allocation.shapes, values_text)
  return found[:top]


def _source_of(shapes: str, values_text: str) -> str:
  """The op_name of the first instruction producing the allocation's largest shape."""
  candidates = [s.split("×")[-1].strip() for s in shapes.split(", ")]
  biggest = max(candidates, key=lambda s: sum(array_bytes(s)), default="")
  if not biggest:
    return ""
  needle = biggest.split("{")[0] + "{"
  for line in values_text.splitlines():
    if line.startswith(" from instruction:") and f"= {needle}" in line:
      match = _OP_NAME.search(line)
      if match:
        return match.group(1)
  return ""


_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")
_PALLAS_NAME = re.compile(r'op_name="[^"]*?(\w+)\)*/pallas_call"')
_SCOPED_VMEM = re.compile(r'"used_scoped_memory_configs":\[[^\]]*?"size":"(\d+)"')


def kernel_calls(hlo_text: str) -> list[tuple[str, int]]:
  """The Mosaic and Triton kernels of a compiled program: (name, scoped VMEM bytes XLA:TPU
  gave the Mosaic call, 0 for Triton calls) per call site. A Pallas kernel's name comes from
  its op_name, e.g. jit(f)/transpose(jvp(nsa_selected_dq))/pallas_call -> nsa_selected_dq;
  XLA's own Mosaic kernels (ragged dot) are named by their op_name's last part."""
  calls = []
  for line in hlo_text.splitlines():
    if not any(f'custom_call_target="{t}"' in line for t in _KERNEL_TARGETS):
      continue
    name = _PALLAS_NAME.search(line) or _OP_NAME.search(line)  # else XLA's own (ragged dot)
    vmem = _SCOPED_VMEM.findall(line)
    label = name.group(1).rsplit("/", 1)[-1] if name else "custom_call"
    calls.append((label, int(vmem[0]) if vmem else 0))
  return calls
