"""DeepSeek-V3.2's DSA training stages: in the dense warm-up only the indexers change and
their KL loss falls on the embedded corpus; in the sparse stage the LM loss sends no gradient
into the indexers and the indexer loss none into the rest (jax.grad); the optimizer freezes
what the stage says; bad stages name the fix."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dsjax.config import DSAConfig
from dsjax.experiment import load_experiment
from dsjax.model.options import RunOptions
from dsjax.train.dsa_stages import trainable_mask
from dsjax.train.optimizer import make_optimizer
from dsjax.train.setup import build_run
from dsjax.train.state import init_train_state
from tests.model_fixtures import randomized_model, tiny_config, tokens
from tests.train.experiments import ROOT, SMALL

DSA = DSAConfig(index_n_heads=4, index_head_dim=16, index_topk=6)


def _is_indexer(path) -> bool:
  return "indexer" in map(str, path)


def _split_losses(model, ids, stage):
  """jax.grad of the LM loss and of the indexer loss, each w.r.t. every parameter."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(p):
    out = nnx.merge(graphdef, p, rest).forward(ids, options=RunOptions(dsa_stage=stage))
    lm = jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 3])
    return lm, jnp.sum(out.attention_losses["indexer_kl"])

  lm_grads = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
  kl_grads = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
  return nnx.to_flat_state(lm_grads), nnx.to_flat_state(kl_grads)


def _max(g):
  return float(jnp.abs(g.get_value()).max())


@pytest.fixture(scope="module")
def model():
  return randomized_model(tiny_config(attention="dsa", dsa=DSA, num_mtp_layers=0))


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_each_loss_reaches_only_its_parameters(model, stage):
  lm, kl = _split_losses(model, tokens(model.config, t=20), stage)
  indexer = [p for p, _ in lm if _is_indexer(p)]
  assert len(indexer) == 5 * len(model.stack_names)  # wq_b, wk, k_norm x2, weights_proj
  for (path, g_lm), (_, g_kl) in zip(lm, kl):
    name = "/".join(map(str, path))
    if _is_indexer(path):
      assert _max(g_lm) == 0, f"LM-loss gradient reached the indexer at {name}"
    else:
      assert _max(g_kl) == 0, f"indexer-loss gradient reached {name}"
  assert all(_max(g) > 0 for p, g in kl if _is_indexer(p))
  assert sum(_max(g) > 0 for p, g in lm if not _is_indexer(p)) > 10


def test_stages_agree_when_the_selection_keeps_every_key(model):
  """With index_topk >= T the sparse stage selects every visible key: its output and its KL
  (over the selected set) equal the dense warm-up's (over every visible key)."""
  ids = tokens(model.config, t=12)
  wide = randomized_model(tiny_config(attention="dsa", num_mtp_layers=0,
                                      dsa=dataclasses.replace(DSA, index_topk=16)))
  outs = {stage: wide.forward(ids, options=RunOptions(dsa_stage=stage))
          for stage in ("sparse", "dense_warmup")}
  np.testing.assert_allclose(outs["sparse"].logits, outs["dense_warmup"].logits, atol=1e-5)
  sparse_kl, dense_kl = (outs[s].attention_losses["indexer_kl"] for s in outs)
  assert sparse_kl.shape == (model.config.num_hidden_layers,)
  np.testing.assert_allclose(sparse_kl, dense_kl, rtol=1e-4, atol=1e-7)
  assert float(jnp.min(dense_kl)) > 0
  inference = wide.forward(ids)
  np.testing.assert_allclose(inference.logits, outs["sparse"].logits, atol=1e-5)
  assert inference.attention_losses == {}


def _params_by_path(params):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def test_optimizer_freezes_what_the_stage_says(model):
  _, params, _ = nnx.split(model, nnx.Param, ...)
  opt_cfg = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=0, schedule="constant", decay_fraction=0.0, min_lr_ratio=1.0,
      weight_decay=0.1, clip=1.0, b1=0.9, b2=0.95, eps=1e-8))
  grads = jax.tree.map(lambda v: jnp.ones_like(v), params)
  for stage, moves_indexer, moves_rest in [("off", False, True), ("dense_warmup", True, False),
                                           ("sparse", True, True)]:
    opt = make_optimizer(opt_cfg, 10, params, trainable_mask(params, stage))
    updates, _ = opt.update(grads, opt.init(params), params)
    for path, u in nnx.to_flat_state(updates):
      moved = _max(u) > 0
      expected = moves_indexer if _is_indexer(path) else moves_rest
      assert moved == expected, (stage, "/".join(map(str, path)))


WARMUP = {**SMALL, "train.seq_len": 64, "model.dsa.index_topk": 8, "model.initializer_range": 0.2,
          "train.dsa_stage": "dense_warmup", "optimizer.lr": 3e-2, "optimizer.warmup_steps": 0,
          "optimizer.schedule": "constant", "train.steps": 30, "train.router_bias_update": "on"}


def test_dense_warmup_trains_only_the_indexers_and_their_kl_falls():
  run = build_run(load_experiment(str(ROOT / "configs" / "dsa_tiny.py"), WARMUP))
  state = init_train_state(run.model_cfg, run.optimizer, run.cfg.seed, run.state_shardings)
  before = _params_by_path(state.params)
  bias_before = [np.asarray(x) for x in jax.tree.leaves(state.router_bias)]
  iterator = run.data.train_iterator()
  kls = []
  for _ in range(30):
    batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
    state, metrics = run.train_step(state, batch)
    kls.append(float(metrics["indexer_kl"]))
  iterator.close()
  after = _params_by_path(state.params)
  for path, value in before.items():
    if "indexer" in path:
      assert np.abs(after[path] - value).max() > 0, f"{path} did not train"
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=f"{path} moved in the warm-up")
  for b, a in zip(bias_before, jax.tree.leaves(state.router_bias)):
    np.testing.assert_array_equal(np.asarray(a), b)  # no router-bias moves either
  first, last = np.mean(kls[:3]), np.mean(kls[-3:])
  assert last < 0.7 * first, (first, last)
  print(f"indexer KL over the warm-up: {first:.4f} -> {last:.4f}")


def test_bad_stage_names_the_fix():
  with pytest.raises(ValueError, match="train.dsa_stage='dense'.*off, dense_warmup|dense_warmup"):
    build_run(load_experiment(str(ROOT / "configs" / "dsa_tiny.py"),
                              {**SMALL, "train.dsa_stage": "dense"}))
  with pytest.raises(ValueError, match="no DSA layer"):
    build_run(load_experiment(str(ROOT / "configs" / "tiny.py"),
                              {**SMALL, "train.dsa_stage": "sparse"}))
