"""The Generator's output-major projection weights (dsjax.infer.weight_layout): which weights
take the layout, that they hold the model's values, and that generation does not change."""

import jax
import numpy as np
import pytest
from flax import nnx

from dsjax.infer import Generator
from dsjax.infer.weight_layout import AUTO_MIN_ELEMENTS, out_major_projections
from dsjax.model.stack import unstack_layers
from dsjax.ops.linear import OutMajor
from tests.model_fixtures import randomized_model, tiny_config

# Every matrix that multiplies activations in MLA, the MLPs, the routed experts and the head.
PROJECTIONS = {"wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3", "head"}


@pytest.fixture(scope="module")
def model():
  return randomized_model(tiny_config(num_mtp_layers=1))


def _is_out_major(a) -> bool:
  return isinstance(a, OutMajor)


def test_projection_weights_and_only_they_are_out_major(model):
  generator = Generator(model, projection_layout="out_major")
  _, stacked = nnx.split(model)
  seen = set()

  def check(path, a):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    layer = [k.key for k in path if isinstance(k, jax.tree_util.FlattenedIndexKey)]  # PerLayer
    name = names[-1]
    assert _is_out_major(a) == (name in PROJECTIONS), names
    if _is_out_major(a):
      seen.add(name)
      original = stacked
      for key in names:
        original = original[key]
      original = original.get_value()
      np.testing.assert_array_equal(a.in_major(), original[layer[0]] if layer else original)
  jax.tree_util.tree_map_with_path(check, generator.state, is_leaf=_is_out_major)
  assert seen == PROJECTIONS


@pytest.mark.parametrize("moe_impl", [None, "ragged"])
def test_generation_is_the_same_with_either_layout(model, moe_impl):
  """`ragged` takes input-major experts: the out-major ones are converted back in the step."""
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 11, 8)]
  tokens = [Generator(model, moe_impl=moe_impl, projection_layout=layout).generate(
      prompts, max_new_tokens=12).tokens for layout in ("out_major", "in_major")]
  assert tokens[0] == tokens[1]


def test_auto_converts_only_weights_of_at_least_the_minimum_size(model):
  """"auto" (CPU) leaves weights below AUTO_MIN_ELEMENTS input-major; out_major_projections'
  min_elements picks by the per-layer size."""
  leaves = lambda state: jax.tree.leaves(state, is_leaf=_is_out_major)
  _, state = nnx.split(model)
  per_layer = unstack_layers(state)
  sizes = sorted(a.t.size for a in leaves(out_major_projections(model, per_layer))
                 if _is_out_major(a))
  assert sizes[-1] < AUTO_MIN_ELEMENTS  # this tiny model: nothing is converted by "auto"
  assert not any(map(_is_out_major, leaves(Generator(model).state)))
  cut = sizes[len(sizes) // 2]
  converted = [a.t.size for a in leaves(out_major_projections(model, per_layer, cut))
               if _is_out_major(a)]
  assert sorted(converted) == [n for n in sizes if n >= cut] and 0 < len(converted) < len(sizes)
