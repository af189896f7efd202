"""Fine-tuning: `train.init_from` starts from a HuggingFace checkpoint or a dsjax Orbax model
with exactly its weights and router biases, and refuses a checkpoint of another architecture."""

import jax
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.checkpoint.orbax_io import save_model
from dsjax.train import loop
from dsjax.train.checkpointing import TrainCheckpointer
from dsjax.train.setup import build_run
from dsjax.train.state import split_model
from tests.model_fixtures import randomized_model
from tests.train.experiments import small_experiment


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A random model of the small experiment's config, saved in both formats."""
  run = build_run(small_experiment())
  model = randomized_model(run.model_cfg, seed=3)
  root = tmp_path_factory.mktemp("pretrained")
  dsjax.save_hf_checkpoint(model, root / "hf")
  save_model(model, root / "orbax")
  return root, model


def _flat(state):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_init_from_loads_the_checkpoint_weights(fmt, pretrained, tmp_path):
  root, model = pretrained
  run = build_run(small_experiment(**{"train.init_from": str(root / fmt)}))
  iterator = run.data.train_iterator()
  state = loop._initial_state(run, TrainCheckpointer(tmp_path / "ckpt"), iterator,
                              log=lambda *_: None)
  iterator.close()
  _, params, router_bias = split_model(model)
  for ours, theirs in ((state.params, params), (state.router_bias, router_bias)):
    got, want = _flat(ours), _flat(theirs)
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  assert int(state.step) == 0
  shardings = jax.tree.leaves(run.state_shardings)
  assert all(a.sharding == s for a, s in zip(jax.tree.leaves(state), shardings))


def test_init_from_other_architecture_is_refused(pretrained):
  root, _ = pretrained
  run = build_run(small_experiment(**{"train.init_from": str(root / "hf"),
                                      "model.moe.n_routed_experts": 4}))
  with pytest.raises(ValueError, match="n_routed_experts"):
    loop._initial_state(run, TrainCheckpointer(root / "unused"), run.data.train_iterator(),
                        log=lambda *_: None)


def test_init_from_missing_directory(tmp_path):
  run = build_run(small_experiment(**{"train.init_from": str(tmp_path / "nope")}))
  with pytest.raises(FileNotFoundError, match="init_from"):
    loop._initial_state(run, TrainCheckpointer(tmp_path / "ckpt"), run.data.train_iterator(),
                        log=lambda *_: None)
