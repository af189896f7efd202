"""Layer patterns: a model's per-layer LayerSpecs grouped into stacks of identical layers.

A stack is a run of one repeating period of layers (a single layer for V2/V3's dense and MoE
runs; e.g. two for alternating kinds), scanned over the period's repeats. The grouping is
greedy from the first layer: at each point the period (of at most MAX_PERIOD layers) that
covers the most layers by repetition, the shortest on ties; no repetition gives a one-layer
stack. Stack names follow the feed-forward kinds ("dense_layers", "moe_layers" for V2/V3;
"layers" for a longer period), with the first layer's index appended when a name repeats.
"""

from __future__ import annotations

from typing import NamedTuple

from dsjax.config import LayerSpec, ModelConfig
from dsjax.model.kinds import ffn_kind

MAX_PERIOD = 8


class LayerRun(NamedTuple):
  """`repeats` repetitions of `period` (LayerSpecs) starting at layer `start`, held by the
  model's attribute `name`."""
  name: str
  start: int
  period: tuple[LayerSpec, ...]
  repeats: int

  @property
  def num_layers(self) -> int:
    return len(self.period) * self.repeats


def _repeats(specs, start: int, period: int) -> int:
  unit = specs[start:start + period]
  count = 0
  while tuple(specs[start + count * period:start + (count + 1) * period]) == tuple(unit):
    count += 1
  return count


def layer_runs(cfg: ModelConfig) -> tuple[LayerRun, ...]:
  """The model's stacks, in layer order."""
  specs = cfg.layer_specs
  runs, names, i = [], set(), 0
  while i < len(specs):
    best, best_cover = 1, _repeats(specs, i, 1)
    for period in range(2, min(MAX_PERIOD, len(specs) - i) + 1):
      repeats = _repeats(specs, i, period)
      if repeats >= 2 and period * repeats > best_cover:
        best, best_cover = period, period * repeats
    period = tuple(specs[i:i + best])
    name = f"{period[0].ffn}_layers" if best == 1 else "layers"
    if name in names:
      name = f"{name}_{i}"
    names.add(name)
    runs.append(LayerRun(name, i, period, best_cover // best))
    i += best_cover
  return tuple(runs)


def layer_path(cfg: ModelConfig, layer: int) -> tuple[tuple, int]:
  """(parameter path of decoder layer `layer`'s Block inside the model, its index on the
  stack's leading `layers` axis)."""
  for run in layer_runs(cfg):
    if run.start <= layer < run.start + run.num_layers:
      repeat, slot = divmod(layer - run.start, len(run.period))
      return block_paths_of(run, slot), repeat
  raise ValueError(f"layer {layer} is outside the model's {cfg.num_hidden_layers} layers.")


def block_paths(cfg: ModelConfig) -> list[tuple]:
  """The Block paths of every stack and period slot, in the order the model concatenates
  their per-layer outputs (stack by stack, then slot by slot, each slot's repeats in order)."""
  return [block_paths_of(run, slot) for run in layer_runs(cfg)
          for slot in range(len(run.period))]


def routed_rows(cfg: ModelConfig) -> dict[tuple, tuple[int, int]]:
  """For each Block path of routed layers (feed-forward kinds whose `routed` is True: "moe",
  "hash_moe"): its (first row, rows) in the model's stacked routing ([L_moe, ...], see
  Transformer.forward), in block_paths order."""
  rows, start = {}, 0
  for run in layer_runs(cfg):
    for slot, spec in enumerate(run.period):
      if ffn_kind(spec.ffn).routed:
        rows[block_paths_of(run, slot)] = (start, run.repeats)
        start += run.repeats
  return rows


def block_paths_of(run: LayerRun, slot: int) -> tuple:
  """The parameter path of the Block at `slot` of the run's period."""
  return (run.name, "blocks") if len(run.period) == 1 else (run.name, "blocks", "layers", slot)
