"""DeepSeek-V4's mixture of experts as dsjax feed-forward kinds: "moe" with sqrt(softplus)
scores and a selection bias, and "hash_moe" (experts tid2eid[token id]), both with the clamped
SwiGLU (moe.swiglu_limit) in every routed and shared expert.

Parity in fp32 with transformers' DeepseekV4SparseMoeBlock for a top-k and a hash layer
(outputs and chosen experts), every dispatch equal, and a tiny model of hash and top-k layers
that runs scanned == unrolled, prefill + decode == forward, trains a step that leaves its
tid2eid tables alone and moves only the top-k layers' biases, and saves and restores them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

import dsjax
from dsjax.checkpoint.orbax_io import load_model, save_model
from dsjax.config import LayerSpec
from dsjax.infer.weight_layout import out_major_projections
from dsjax.model.hash_moe import HashMoE, spread_table
from dsjax.model.kinds import TokenContext, ffn_kind
from dsjax.model.options import RunOptions
from dsjax.model.param import FrozenTable, RouterBias
from dsjax.ops import moe_dispatch
from dsjax.parallel import expert_parallel
from dsjax.train.balance import sign_update
from dsjax.train.loss import expert_load
from dsjax.train.setup import build_run
from dsjax.train.state import init_train_state
from tests.model_fixtures import forward, randomized_model, tiny_config, tokens
from tests.train.experiments import small_experiment

V, D, E, K, F = 64, 32, 8, 2, 16
LIMIT = 0.75      # small enough that the clamp binds on many pre-activations (std ~1.7 here)
SCALE = 1.5
B, T = 2, 12
STD = 0.3
KINDS = {"hash_moe": 0, "moe": 1}  # kind: its layer index in the transformers config


def moe_config(limit: float = LIMIT) -> dsjax.MoEConfig:
  return dsjax.MoEConfig(n_routed_experts=E, n_shared_experts=1, num_experts_per_tok=K,
                         moe_intermediate_size=F, scoring_func="sqrtsoftplus",
                         swiglu_limit=limit, n_group=1, topk_group=1, topk_method="noaux_tc",
                         norm_topk_prob=True, routed_scaling_factor=SCALE)


def _hf_block(layer: int, seed: int) -> DeepseekV4SparseMoeBlock:
  """A transformers V4 MoE block with random weights, correction bias and tid2eid."""
  cfg = DeepseekV4Config(vocab_size=V, hidden_size=D, moe_intermediate_size=F,
                         num_hidden_layers=2, n_routed_experts=E, num_experts_per_tok=K,
                         n_shared_experts=1, swiglu_limit=LIMIT, routed_scaling_factor=SCALE,
                         mlp_layer_types=["hash_moe", "moe"], num_attention_heads=4,
                         head_dim=16, q_lora_rank=16)
  block = DeepseekV4SparseMoeBlock(cfg, layer).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in block.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * STD)
    if block.is_hash:
      table = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(V)])
      block.gate.tid2eid.copy_(table)
    else:
      block.gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.2)
  return block


def _dsjax_layer(block: DeepseekV4SparseMoeBlock, kind: str, limit: float = LIMIT):
  """The dsjax layer of `kind` holding `block`'s weights (gate_up_proj [E,2F,D]: gate rows
  first, then up)."""
  cfg = tiny_config(vocab_size=V, hidden_size=D, moe=moe_config(limit), num_mtp_layers=0)
  layer = ffn_kind(kind).create(cfg, rngs=nnx.Rngs(0))
  t = {n: p.detach().numpy() for n, p in block.named_parameters()}
  gate_up = t["experts.gate_up_proj"]
  values = {"gate": t["gate.weight"].T, "w1": gate_up[:, :F].transpose(0, 2, 1),
            "w3": gate_up[:, F:].transpose(0, 2, 1),
            "w2": t["experts.down_proj"].transpose(0, 2, 1)}
  for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
    getattr(layer.shared_experts, ours).set_value(
        jnp.asarray(t[f"shared_experts.{theirs}.weight"].T))
  for name, value in values.items():
    getattr(layer, name).set_value(jnp.asarray(value))
  if block.is_hash:
    layer.tid2eid.set_value(jnp.asarray(block.gate.tid2eid.numpy(), jnp.int32))
  else:
    layer.router_bias.set_value(jnp.asarray(block.gate.e_score_correction_bias.numpy()))
  return layer


@functools.partial(jax.jit, static_argnames=("graphdef", "impl"))
def _feed_forward(graphdef, state, x, ids, impl):
  layer = nnx.merge(graphdef, state)
  tokens = TokenContext(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
  return layer.feed_forward(x, tokens, RunOptions(moe_impl=impl))


def run_layer(layer, x, ids, impl, state=None):
  graphdef, own = nnx.split(layer)
  return _feed_forward(graphdef, own if state is None else state, x, ids, impl)


@pytest.fixture(scope="module", params=list(KINDS))
def case(request):
  """(kind, transformers block, x [B,T,D], ids [B,T], transformers output, its expert ids)."""
  kind = request.param
  block = _hf_block(KINDS[kind], seed=KINDS[kind])
  rng = np.random.default_rng(3)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  ids = rng.integers(0, V, (B, T)).astype(np.int64)
  with torch.no_grad():
    out = block(torch.from_numpy(x), input_ids=torch.from_numpy(ids)).numpy()
    args = (torch.from_numpy(x), torch.from_numpy(ids)) if block.is_hash else (torch.from_numpy(x),)
    indices = block.gate(*args)[2].numpy()
  return kind, block, x, jnp.asarray(ids, jnp.int32), out, indices


def _pre_activations(block, x, indices):
  """The routed experts' gate and up pre-activations [M,K,F] of the chosen experts and the
  shared expert's [M,F] each."""
  flat = x.reshape(-1, D)
  gate_up = np.einsum("MD,MKFD->MKF", flat, block.experts.gate_up_proj.detach().numpy()[indices])
  s = block.shared_experts
  return (gate_up[..., :F], gate_up[..., F:], flat @ s.gate_proj.weight.detach().numpy().T,
          flat @ s.up_proj.weight.detach().numpy().T)


def test_the_clamp_binds(case):
  kind, block, x, _, _, indices = case
  gate, up, shared_gate, shared_up = _pre_activations(block, x, indices)
  for g, u in ((gate, up), (shared_gate, shared_up)):
    assert np.mean(g > LIMIT) > 0.1 and np.mean(np.abs(u) > LIMIT) > 0.1


@pytest.mark.parametrize("impl", ["dense", "blocked", "ragged"])
def test_matches_transformers(case, impl):
  kind, block, x, ids, expected, indices = case
  layer = _dsjax_layer(block, kind)
  y, routing = run_layer(layer, jnp.asarray(x), ids, impl)
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=0)
  ours = np.asarray(routing.expert_ids)
  if kind == "hash_moe":
    np.testing.assert_array_equal(ours, indices)  # the table's order
  else:
    np.testing.assert_array_equal(np.sort(ours, -1), np.sort(indices, -1))


def test_the_selection_bias_and_the_clamp_matter(case):
  """Without the clamp the output moves far past the tolerance; in the top-k layer the bias
  changes some tokens' experts."""
  kind, block, x, ids, expected, indices = case
  y, routing = run_layer(_dsjax_layer(block, kind, limit=0.0), jnp.asarray(x), ids, "dense")
  assert np.abs(np.asarray(y) - expected).max() > 1e-2
  if kind == "moe":
    unbiased = np.argsort(-np.asarray(routing.scores), -1)[:, :K]
    assert np.any(np.sort(unbiased, -1) != np.sort(indices, -1))


@pytest.mark.parametrize("impl", ["dense", "blocked"])
def test_out_major_weights_give_the_same_layer(case, impl):
  """The decoding layout (dsjax.infer.weight_layout: routed and shared experts out-major)."""
  kind, block, x, ids, expected, _ = case
  layer = _dsjax_layer(block, kind)
  state = out_major_projections(layer, nnx.state(layer))
  assert type(state["w1"].get_value()).__name__ == "OutMajor"
  y, _ = run_layer(layer, jnp.asarray(x), ids, impl, state=state)
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("local", ["dense", "blocked", "ragged"])
def test_expert_parallel_local_experts_clamp(local):
  """The local experts of the expert-parallel dispatch on rows grouped by expert (the last
  rows past the groups give zeros) against a per-row reference."""
  rng = np.random.default_rng(0)
  sizes = np.array([3, 0, 5, 2])
  rows = rng.normal(size=(12, D)).astype(np.float32)
  w1, w3 = (rng.normal(0, STD, (4, D, F)).astype(np.float32) for _ in range(2))
  w2 = rng.normal(0, STD, (4, F, D)).astype(np.float32)
  got = expert_parallel._local_experts(rows, jnp.asarray(sizes, jnp.int32), w1, w3, w2, local,
                                       swiglu_limit=LIMIT)
  expert = np.repeat(np.arange(4), sizes)
  want = np.zeros_like(rows)
  for r, e in enumerate(expert):
    gate = np.minimum(rows[r] @ w1[e], LIMIT)
    up = np.clip(rows[r] @ w3[e], -LIMIT, LIMIT)
    want[r] = (gate / (1 + np.exp(-gate)) * up) @ w2[e]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_pallas_dispatch_clamps():
  """The sorted dispatch with the Pallas grouped-matmul kernel (its interpreter on CPU)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, D)).astype(np.float32)
  ids = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(6)]), jnp.int32)
  weights = rng.random((6, K)).astype(np.float32)
  w1, w3 = (rng.normal(0, STD, (E, D, F)).astype(np.float32) for _ in range(2))
  w2 = rng.normal(0, STD, (E, F, D)).astype(np.float32)
  dense = moe_dispatch.experts_dense(x, ids, weights, w1, w3, w2, swiglu_limit=LIMIT)
  pallas = moe_dispatch.experts_sorted(x, ids, weights, w1, w3, w2, moe_dispatch.pallas_gmm,
                                       swiglu_limit=LIMIT)
  np.testing.assert_allclose(np.asarray(pallas), np.asarray(dense), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(dense - moe_dispatch.experts_dense(x, ids, weights, w1, w3, w2))
                ).max() > 1e-2


def test_config_validation():
  with pytest.raises(ValueError, match="swiglu_limit=-1.*use 0"):
    moe_config(limit=-1.0)
  with pytest.raises(ValueError, match="sqrtsoftplus"):
    dsjax.MoEConfig(scoring_func="relu")


def test_spread_table_gives_distinct_experts_evenly():
  table = spread_table(96, 3, 8)
  assert table.shape == (96, 3) and table.dtype == np.int32
  assert all(len(set(row)) == 3 for row in table)
  assert np.bincount(table.ravel(), minlength=8).tolist() == [36] * 8


# ---- a tiny model: two hash layers, then two top-k layers ----

PATTERN = (LayerSpec("mla", "hash_moe"),) * 2 + (LayerSpec("mla", "moe"),) * 2


def _random_tables(model, seed=0):
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, FrozenTable)):
    layers, vocab, k = var.get_value().shape
    table = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(vocab)])
                      for _ in range(layers)])
    var.set_value(jnp.asarray(table, jnp.int32))


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(moe=moe_config(), num_hidden_layers=4, layer_pattern=PATTERN,
                    num_mtp_layers=0)
  m = randomized_model(cfg)
  _random_tables(m)
  return m


def test_model_layers(model):
  assert model.stack_names == ("hash_moe_layers", "moe_layers")
  hash_ffn, topk_ffn = model.hash_moe_layers.blocks.ffn, model.moe_layers.blocks.ffn
  assert isinstance(hash_ffn, HashMoE) and not hasattr(hash_ffn, "router_bias")
  assert isinstance(topk_ffn.router_bias, RouterBias) and not hasattr(topk_ffn, "tid2eid")
  params = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert not any("tid2eid" in p for p in params)


def test_model_scanned_equals_unrolled_and_routes_hash_layers_by_table(model):
  ids = tokens(model.config, t=16)
  scanned, unrolled = forward(model, ids, scan=True), forward(model, ids, scan=False)
  np.testing.assert_allclose(scanned.logits, unrolled.logits, atol=1e-5)
  np.testing.assert_array_equal(scanned.routing.expert_ids, unrolled.routing.expert_ids)
  table = np.asarray(model.hash_moe_layers.blocks.ffn.tid2eid[...])    # [2, V, K]
  hashed = np.asarray(scanned.routing.expert_ids[:2])                   # hash layers first
  np.testing.assert_array_equal(hashed, table[:, np.asarray(ids).reshape(-1)])


def test_model_prefill_and_decode_equal_the_forward(model):
  ids = tokens(model.config, t=14)
  full = forward(model, ids).logits
  out, cache = model.prefill(ids[:, :11], slots=14)
  np.testing.assert_allclose(out.logits, full[:, :11], atol=1e-5)
  for step in range(11, 14):
    positions = jnp.full((ids.shape[0], 1), step, jnp.int32)
    logits, _, cache = model.decode(ids[:, step:step + 1], positions, cache)
    np.testing.assert_allclose(logits[:, 0], full[:, step], atol=1e-4)


def test_orbax_save_and_restore_keep_the_tables(model, tmp_path):
  save_model(model, tmp_path / "model")
  restored = load_model(tmp_path / "model")
  for ours, theirs in zip(nnx.to_flat_state(nnx.state(model, FrozenTable)),
                          nnx.to_flat_state(nnx.state(restored, FrozenTable)), strict=True):
    assert ours[0] == theirs[0] and isinstance(theirs[1], FrozenTable)
    np.testing.assert_array_equal(ours[1].get_value(), theirs[1].get_value())


def _flat(state) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_train_step_leaves_the_tables_and_moves_only_topk_biases():
  overrides = {"model.num_hidden_layers": 4, "model.num_mtp_layers": 0,
               "model.layer_pattern": tuple(dict(attention=s.attention, ffn=s.ffn)
                                            for s in PATTERN),
               "model.moe.scoring_func": "sqrtsoftplus", "model.moe.swiglu_limit": LIMIT,
               "model.moe.n_group": 1, "model.moe.topk_group": 1,
               "train.router_bias_update": "auto", "train.router_bias_rate": 0.01}
  run = build_run(small_experiment(**overrides))
  state = init_train_state(run.model_cfg, run.optimizer, 0, run.state_shardings)
  before_rest, before_params = _flat(state.router_bias), _flat(state.params)
  tables = {p: v for p, v in before_rest.items() if p.endswith("tid2eid")}
  assert list(tables) == ["hash_moe_layers/blocks/ffn/tid2eid"]
  assert not any("tid2eid" in p for p in before_params)
  assert not any("tid2eid" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state))
  iterator = run.data.train_iterator()
  batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
  iterator.close()
  # The loads the step's bias update sees: rows 2..3 of the stacked routing are the top-k
  # layers', after the two hash layers' rows.
  @jax.jit
  def loads(params, rest, batch):
    model = nnx.merge(run.graphdef, params, rest)
    routing = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"]).routing
    return expert_load(routing.expert_ids, E, (batch["segment_ids"] > 0).reshape(-1))
  load = np.asarray(loads(state.params, state.router_bias, batch))
  assert not np.array_equal(np.sign(load[:2] - load[:2].mean(-1, keepdims=True)),
                            np.sign(load[2:] - load[2:].mean(-1, keepdims=True)))

  new, metrics = run.train_step(state, batch)  # donates `state`
  assert bool(metrics["finite"])
  after_rest, after_params = _flat(new.router_bias), _flat(new.params)
  for path, table in tables.items():
    np.testing.assert_array_equal(after_rest[path], table)
  for stack in ("hash_moe_layers", "moe_layers"):
    gate = f"{stack}/blocks/ffn/gate"
    assert not np.array_equal(before_params[gate], after_params[gate])
  bias = "moe_layers/blocks/ffn/router_bias"
  np.testing.assert_allclose(after_rest[bias], sign_update(before_rest[bias], load[2:], 0.01),
                             atol=1e-7)
