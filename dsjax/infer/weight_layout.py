"""The projection-weight layout of decoding: output-major on CPU.

A decode step multiplies every weight by a few rows (one new token per batch row). XLA's CPU
dot runs such a product faster with the weight as the left operand, [F,K] . [M,K] -> [F,M],
than as [M,K] . [K,F]: 1.4 to 2.5 times in microbenchmarks, and 26.2 vs 33.4 ms for the whole
decode step of benchmarks/decode.py on the project's 2-core machine (docs/benchmarks.md).
Transposing a weight inside the step would cost more than it saves, so the Generator stores
the weights that its steps multiply as dsjax.ops.linear.OutMajor once, when it lays out its
copy of the weights.

Modules name their projection weights in a class attribute
`PROJECTIONS = {attribute: (batch axes, input axes)}`; every reader of those weights (the
`project` helper, the MoE dispatches) takes either layout.
"""

import math

import jax
from flax import nnx

from dsjax.ops.linear import OutMajor
from dsjax.ops.platform import target_platform

PROJECTION_LAYOUTS = ("auto", "out_major", "in_major")
# "auto" leaves smaller weights input-major: for them the product costs less than the transpose
# of its result (a model of hidden size 128 decoded 7-10% slower with every weight out-major).
AUTO_MIN_ELEMENTS = 1 << 16


def resolve_projection_layout(layout: str, weights: str = "per_layer") -> str:
  """"auto" -> "out_major" for the per-layer weights on CPU, else "in_major" (TPU/GPU products
  are memory-bound at decode sizes, and their grouped-matmul MoE kernels take the weights
  input-major). `weights`: the Generator's layout; the stacked one uses the model's arrays."""
  if layout not in PROJECTION_LAYOUTS:
    raise ValueError(f"projection_layout={layout!r}; use one of {PROJECTION_LAYOUTS}.")
  if layout == "auto":
    cpu = target_platform() == "cpu"
    return "out_major" if cpu and weights == "per_layer" else "in_major"
  if layout == "out_major" and weights != "per_layer":
    raise ValueError(f"projection_layout='out_major' needs layout='per_layer' (the Generator's "
                     f"own copy of the weights), not layout={weights!r}.")
  return layout


def _projection_paths(model: nnx.Module) -> dict[tuple, tuple[int, int]]:
  """{path of a projection weight in the model's state: (batch axes, input axes)}."""
  paths = {}
  for path, node in nnx.iter_graph(model):
    for name, axes in getattr(type(node), "PROJECTIONS", {}).items():
      if isinstance(getattr(node, name, None), nnx.Variable):
        paths[tuple(path) + (name,)] = axes
  return paths


def out_major_projections(model: nnx.Module, state: nnx.State, min_elements: int = 0
                          ) -> nnx.State:
  """`state` (nnx.split(model)'s, in the per-layer layout of dsjax.model.stack.unstack_layers:
  one array per layer) with every projection weight of at least `min_elements` elements (per
  layer) as an OutMajor array."""
  paths = _projection_paths(model)

  def convert(path, a):
    keys = tuple(getattr(k, "key", None) for k in path)
    for prefix, (batch, contract) in paths.items():
      if keys[:len(prefix)] == prefix and math.prod(a.shape) >= min_elements:
        return OutMajor.from_in_major(a, batch, contract)
    return a
  return jax.tree_util.tree_map_with_path(convert, state)
