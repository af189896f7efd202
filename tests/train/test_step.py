"""The train step: gradient accumulation is exact, non-finite steps leave the state untouched,
the state keeps its structure (no recompilation), and aux-loss-free balancing evens out a
skewed router."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.train.loss import expert_load, load_imbalance
from dsjax.train.setup import build_run
from dsjax.train.state import init_train_state
from tests.train.experiments import small_experiment

PLAIN = {"train.balance_alpha": 0.0, "train.router_bias_update": "off"}


@pytest.fixture(scope="module")
def runs():
  """Three compiled runs of the same model: plain, 2 micro-batches, and bias updates on."""
  return {
      "plain": build_run(small_experiment(**PLAIN)),
      "accum": build_run(small_experiment(**PLAIN, **{"train.grad_accum_steps": 2})),
      "balance": build_run(small_experiment(**{"train.balance_alpha": 0.0,
                                               "train.router_bias_update": "on",
                                               "train.router_bias_rate": 0.005})),
  }


def _fresh_state(run):
  return init_train_state(run.model_cfg, run.optimizer, run.cfg.seed, run.state_shardings)


def _batches(run, n):
  iterator = run.data.train_iterator()
  out = [{k: jnp.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]
  iterator.close()
  return out


def _arrays(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_grad_accumulation_equals_full_batch(runs):
  batch = _batches(runs["plain"], 1)[0]
  full, full_metrics = runs["plain"].train_step(_fresh_state(runs["plain"]), batch)
  accum, accum_metrics = runs["accum"].train_step(_fresh_state(runs["accum"]), batch)
  for key in ("loss", "mtp_loss", "grad_norm"):
    np.testing.assert_allclose(accum_metrics[key], full_metrics[key], rtol=2e-5)
  # Adam divides by sqrt(v): where a gradient is ~0 its rounding noise moves the weight by up
  # to ~lr, so the updated weights agree to a fraction of lr (1.5e-3 here), not to 1e-6.
  lr = float(full_metrics["lr"])
  for a, b in zip(_arrays(accum.params), _arrays(full.params)):
    np.testing.assert_allclose(a, b, atol=0.02 * lr)


def test_nonfinite_step_is_skipped_and_counted(runs):
  run = runs["plain"]
  state = _fresh_state(run)
  before = jax.device_get(state)
  batch = dict(_batches(run, 1)[0])
  batch["loss_mask"] = batch["loss_mask"].at[0, 0].set(jnp.nan)  # poisons loss and gradients
  for expected in (1, 2):
    state, metrics = run.train_step(state, batch)
    assert not bool(metrics["finite"])
    assert int(state.bad_steps) == expected and int(state.skipped) == expected
  assert int(state.step) == 2
  for a, b in zip(_arrays((state.params, state.opt_state, state.router_bias)),
                  _arrays((before.params, before.opt_state, before.router_bias))):
    np.testing.assert_array_equal(a, b)
  state, metrics = run.train_step(state, _batches(run, 1)[0])  # a good step resets the count
  assert bool(metrics["finite"]) and int(state.bad_steps) == 0 and int(state.skipped) == 2


def test_state_keeps_its_structure(runs):
  run = runs["balance"]
  state = _fresh_state(run)
  spec = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state)
  new, _ = run.train_step(state, _batches(run, 1)[0])
  assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), new) == spec


def _skew_router(state, favoured=(0, 1), size=0.2):
  """Router biases that send every token to the `favoured` experts."""
  def skew(_, variable):
    bias = jnp.zeros_like(variable.get_value()).at[..., list(favoured)].set(size)
    return variable.replace(value=bias)
  return state._replace(router_bias=nnx.map_state(skew, state.router_bias))


def _imbalance(run, state, batch) -> np.ndarray:
  model = nnx.merge(run.graphdef, state.params, state.router_bias)
  routing = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"]).routing
  return np.asarray(load_imbalance(expert_load(routing.expert_ids,
                                               run.model_cfg.moe.n_routed_experts)))


def test_bias_update_evens_out_a_skewed_router(runs):
  batches = _batches(runs["plain"], 41)
  results = {}
  for name in ("plain", "balance"):
    run = runs[name]
    state = _skew_router(_fresh_state(run))
    start = _imbalance(run, state, batches[-1])
    for batch in batches[:-1]:
      state, _ = run.train_step(state, batch)
    results[name] = (start, _imbalance(run, state, batches[-1]))
  (plain_start, plain_end), (bal_start, bal_end) = results["plain"], results["balance"]
  # Two of 8 experts take every token: max/mean load = 8 / 2 = 4 in every layer. The skew
  # (0.2) exceeds the router scores' spread; gamma = 0.005 closes it in ~20 steps.
  np.testing.assert_allclose(plain_start, 4.0)
  np.testing.assert_allclose(bal_start, 4.0)
  assert np.all(plain_end > 3.5), plain_end     # without the update the skew stays
  assert np.all(bal_end < 2.5), bal_end         # with it the load evens out (1.6-1.9)
