"""Learning-rate schedules, the weight-decay mask and the AdamW optimizer on nnx.State."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import dsjax
from dsjax.experiment import DEFAULTS
from dsjax.model.param import RouterBias, normal_param, ones_param
from dsjax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from tests.model_fixtures import tiny_config

LR, MIN = 1.0, 0.1  # peak and min_lr_ratio of the schedule tests: lr values read as fractions


def opt_config(**changes) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(DEFAULTS["optimizer"])
  cfg.update(lr=LR, min_lr_ratio=MIN, warmup_steps=10, decay_fraction=0.3)
  cfg.update(changes)
  return cfg


def lr_at(schedule, step: int) -> float:
  return float(schedule(jnp.asarray(step, jnp.int32)))


def cosine(progress: float) -> float:
  return MIN + (LR - MIN) * 0.5 * (1 + math.cos(math.pi * progress))


# 100 steps, 10 of warm-up; deepseek_v3 / wsd decay over steps 70..100.
EXPECTED = {
    "deepseek_v3": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 40: 1.0, 70: 1.0, 85: cosine(0.5), 91: cosine(0.7),
                    100: MIN, 150: MIN},
    "wsd": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 40: 1.0, 70: 1.0, 85: 0.55, 91: 1.0 - 0.9 * 0.7,
            100: MIN, 150: MIN},
    "cosine": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: cosine(0.5), 82: cosine(0.8), 100: MIN, 150: MIN},
    "constant": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 40: 1.0, 99: 1.0, 100: 1.0, 150: 1.0},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_schedule_values(kind):
  schedule = learning_rate_schedule(opt_config(schedule=kind), 100)
  for step, want in EXPECTED[kind].items():
    assert lr_at(schedule, step) == pytest.approx(want, rel=1e-6, abs=1e-7), (kind, step)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_schedule_pieces_are_monotonic(kind):
  values = np.asarray(jax.vmap(learning_rate_schedule(opt_config(schedule=kind), 100))(
      jnp.arange(130)))
  assert np.all(np.diff(values[:10]) > 0)  # warm-up rises
  assert np.all(np.diff(values[10:]) <= 1e-7)  # then never rises
  assert values.dtype == np.float32


def test_schedule_without_warmup_or_decay():
  schedule = learning_rate_schedule(opt_config(warmup_steps=0, decay_fraction=0.0), 50)
  assert lr_at(schedule, 0) == LR and lr_at(schedule, 49) == LR
  assert lr_at(schedule, 50) == pytest.approx(LR * MIN)
  wsd = learning_rate_schedule(opt_config(schedule="wsd", warmup_steps=0, decay_fraction=1.0), 10)
  assert [lr_at(wsd, s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.55, MIN])


@pytest.mark.parametrize("changes, steps, key", [
    (dict(schedule="linear"), 100, "schedule"),
    (dict(lr=0.0), 100, "lr"),
    (dict(lr=-1e-3), 100, "lr"),
    (dict(warmup_steps=-1), 100, "warmup_steps"),
    (dict(warmup_steps=100), 100, "warmup_steps"),
    (dict(decay_fraction=1.5), 100, "decay_fraction"),
    (dict(decay_fraction=-0.1), 100, "decay_fraction"),
    (dict(min_lr_ratio=2.0), 100, "min_lr_ratio"),
    (dict(warmup_steps=40, decay_fraction=0.7), 100, "decay_fraction"),
    (dict(schedule="wsd", warmup_steps=40, decay_fraction=0.7), 100, "decay_fraction"),
])
def test_schedule_validation(changes, steps, key):
  with pytest.raises(ValueError, match=f"--config.optimizer.{key}"):
    learning_rate_schedule(opt_config(**changes), steps)


def test_cosine_allows_any_decay_fraction_with_long_warmup():
  learning_rate_schedule(opt_config(schedule="cosine", warmup_steps=40, decay_fraction=0.7), 100)


def test_unknown_schedule_lists_valid_ones():
  with pytest.raises(ValueError, match="deepseek_v3.*wsd.*cosine.*constant"):
    learning_rate_schedule(opt_config(schedule="linear"), 100)


def test_mask_of_tiny_model_decays_matrices_only():
  cfg = tiny_config()
  model = nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  mask = weight_decay_mask(params)
  flat_mask = dict(nnx.to_flat_state(mask))
  flat_params = dict(nnx.to_flat_state(params))
  assert flat_mask.keys() == flat_params.keys()
  for path, decays in flat_mask.items():
    assert isinstance(decays, bool)
    assert decays == (path[-1] != "weight"), path  # RMSNorm scales are the only non-matrices
  assert sum(flat_mask.values()) > 20 and not all(flat_mask.values())
  # Layer-stacked norms [L, D] are excluded too, not only the 1-D ones.
  assert flat_params[("moe_layers", "blocks", "attn_norm", "weight")].get_value().ndim == 2
  # Variables that are not Params (router biases) never decay.
  assert not any(jax.tree.leaves(weight_decay_mask(rest)))
  assert any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(rest))


class Toy(nnx.Module):
  """A stacked matrix, a matrix, a stacked norm scale and a plain norm scale."""

  def __init__(self, rngs: nnx.Rngs):
    self.stacked = normal_param(rngs, (2, 4, 3), ("layers", "embed", "mlp"), 1.0, jnp.float32)
    self.matrix = normal_param(rngs, (4, 3), ("embed", "mlp"), 1.0, jnp.float32)
    self.stacked_scale = ones_param((2, 3), ("layers", "embed"), jnp.float32)
    self.scale = ones_param((3,), ("embed",), jnp.float32)


def toy_params() -> nnx.State:
  return nnx.split(Toy(nnx.Rngs(0)), nnx.Param)[1]


@jax.jit
def _apply(params, grads):
  opt = make_optimizer(opt_config(lr=0.1, warmup_steps=0, weight_decay=0.5), 10, params)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), updates, state


def test_one_step_decays_matrices_and_keeps_scales():
  params = toy_params()
  new, _, state = _apply(params, jax.tree.map(jnp.zeros_like, params))
  assert isinstance(new, nnx.State)
  for name in ("stacked", "matrix"):  # zero gradient: only the decay moves them
    np.testing.assert_allclose(new[name].get_value(), params[name].get_value() * (1 - 0.1 * 0.5),
                               rtol=1e-6)
  for name in ("stacked_scale", "scale"):
    np.testing.assert_array_equal(new[name].get_value(), params[name].get_value())
  assert {a.dtype for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)} == {
      jnp.dtype(jnp.float32)}


def test_clipping_bounds_the_update():
  params = toy_params()
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  n = sum(p.size for p in jax.tree.leaves(params))
  # With eps >> |gradient| Adam's step is about lr * gradient / eps, so the clipping shows.
  norms = {}
  for clip in (1.0, 0.0):
    opt = make_optimizer(opt_config(warmup_steps=0, weight_decay=0.0, eps=1e8, clip=clip), 10,
                         params)
    updates, _ = opt.update(huge, opt.init(params), params)
    norms[clip] = float(optax.tree.norm(updates))
  assert norms[1.0] == pytest.approx(1.0 * 1e-8, rel=1e-4)  # gradient clipped to norm 1
  assert norms[0.0] == pytest.approx(1e6 / (1e6 + 1e8) * math.sqrt(n), rel=1e-4)  # unclipped


def test_mask_survives_extra_variable_metadata():
  params = toy_params()
  opt = make_optimizer(opt_config(), 100, params)
  tagged = jax.tree.map(lambda v: v.replace(sharding_names=("x",) * v.get_value().ndim),
                        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  state = opt.init(tagged)
  opt.update(jax.tree.map(jnp.ones_like, tagged), state, tagged)


@pytest.mark.parametrize("changes", [dict(b1=1.0), dict(b2=-0.1), dict(eps=-1.0),
                                     dict(weight_decay=-0.1)])
def test_optimizer_validation(changes):
  key = next(iter(changes))
  with pytest.raises(ValueError, match=f"--config.optimizer.{key}"):
    make_optimizer(opt_config(**changes), 100, toy_params())
