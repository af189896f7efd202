"""mHC (dsjax.model.hyper_connections): parity with transformers' DeepSeek-V4 hyper-connection
modules in fp32, the invariants of its coefficients, the plain residual as its n = 1 limit,
and a model with mHC streams scanned == unrolled, decoding == its forward, training a step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dsjax
from dsjax.config import HyperConnectionsConfig
from dsjax.model.hyper_connections import HyperConnection, HyperHead
from dsjax.ops import hyper_connections as hc
from tests.model_fixtures import (forward, randomized_model, scanned_and_unrolled,
                                  tiny_config, tokens)

D, N = 16, 4


def _torch_modules(n=N, iters=20, eps=1e-6):
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref
  config = ref.DeepseekV4Config(hidden_size=D, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=eps,
                                rms_norm_eps=1e-6, num_hidden_layers=2)
  torch.manual_seed(0)
  connection, head = ref.DeepseekV4HyperConnection(config), ref.DeepseekV4HyperHead(config)
  with torch.no_grad():  # random coefficients, far from the initialisation's symmetry
    for p in (*connection.parameters(), *head.parameters()):
      p.copy_(torch.randn(p.shape) * 0.5)
  return connection, head


def _dsjax_modules(connection, head, n=N, iters=20, eps=1e-6):
  cfg = tiny_config(hidden_size=D, mhc=HyperConnectionsConfig(n, iters, eps))
  conn, top = HyperConnection(cfg, rngs=nnx.Rngs(0)), HyperHead(cfg, rngs=nnx.Rngs(0))
  for ours, theirs in ((conn.fn, connection.fn), (conn.base, connection.base),
                       (conn.scale, connection.scale), (top.fn, head.hc_fn),
                       (top.base, head.hc_base), (top.scale, head.hc_scale)):
    ours.set_value(jnp.asarray(theirs.detach().numpy()))
  return conn, top


def _streams(n=N, seed=0, shape=(2, 5)):
  return np.random.default_rng(seed).normal(0, 1, (*shape, n, D)).astype(np.float32)


def test_connection_and_head_match_transformers():
  connection, head = _torch_modules()
  conn, top = _dsjax_modules(connection, head)
  x = _streams()
  out = np.random.default_rng(1).normal(0, 1, (2, 5, D)).astype(np.float32)
  with torch.no_grad():
    post_t, comb_t, collapsed_t = connection(torch.from_numpy(x))
    # transformers' DecoderLayer: post * f + comb^T @ streams.
    written_t = post_t.unsqueeze(-1) * torch.from_numpy(out).unsqueeze(-2) + torch.matmul(
        comb_t.transpose(-1, -2), torch.from_numpy(x))
    head_t = head(torch.from_numpy(x))
  collapsed, (post, comb) = conn.read(jnp.asarray(x))
  assert not np.allclose(comb, np.swapaxes(comb, -1, -2), atol=1e-3)  # the direction matters
  np.testing.assert_allclose(comb, comb_t.numpy(), atol=1e-6)
  np.testing.assert_allclose(post, post_t.numpy(), atol=1e-6)
  np.testing.assert_allclose(collapsed, collapsed_t.numpy(), atol=1e-5)
  np.testing.assert_allclose(conn.write(jnp.asarray(x), jnp.asarray(out), (post, comb)),
                             written_t.numpy(), atol=1e-5)
  np.testing.assert_allclose(top.reduce(jnp.asarray(x)), head_t.numpy(), atol=1e-5)
  np.testing.assert_array_equal(top.expand(jnp.asarray(x[..., 0, :])),
                                np.repeat(x[..., :1, :], N, axis=-2))


@pytest.mark.parametrize("spread", [0.1, 3.0, 30.0])
def test_coefficients_keep_their_ranges_and_comb_is_doubly_stochastic(spread):
  rng = np.random.default_rng(2)
  mixes = jnp.asarray(rng.normal(0, spread, (64, (2 + N) * N)), jnp.float32)
  base = jnp.asarray(rng.normal(0, 1, ((2 + N) * N,)), jnp.float32)
  eps = 1e-6
  pre, post, comb = hc.connection_weights(mixes, base, jnp.ones(3), N, 20, eps)
  # (eps, 1 + eps) and (0, 2), closed where float32 saturates the sigmoid (spread 30).
  assert bool(jnp.all(pre >= jnp.float32(eps))) and bool(jnp.all(pre <= jnp.float32(1 + eps)))
  assert bool(jnp.all(post >= 0)) and bool(jnp.all(post <= 2))
  assert bool(jnp.all(comb >= 0))
  np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-5)  # columns: the last normalisation
  # Rows converge with the rounds: at once near the initialisation (small mixes), slowly for
  # peaked softmaxes (20 rounds leave 0.04-0.06 at spreads 3-30; 500 rounds 1e-3).
  row_error = [float(jnp.abs(hc.connection_weights(mixes, base, jnp.ones(3), N, iters, eps)[2]
                             .sum(-1) - 1).max()) for iters in (1, 5, 20, 100, 500)]
  assert all(a >= b for a, b in zip(row_error, row_error[1:])), row_error
  assert row_error[2] < (1e-5 if spread < 1 else 0.1) and row_error[-1] < 2e-3, row_error


def test_sinkhorn_converges_on_rows_and_columns():
  rng = np.random.default_rng(3)
  comb = jnp.asarray(rng.uniform(0.1, 2.0, (16, N, N)), jnp.float32)
  out = hc.sinkhorn(comb, 20, 0.0)
  np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(out.sum(-2), 1.0, atol=1e-6)
  one = hc.sinkhorn(comb, 1, 0.0)  # a single column normalisation
  np.testing.assert_allclose(one, comb / comb.sum(-2, keepdims=True), rtol=1e-6)


def _plain_gates(model):
  """Zero mixing weights and gates of exactly 1: fn = 0, the pre gates' bias 30 (sigmoid == 1
  in float32), the post gates' bias 0 (2 * sigmoid(0) == 1)."""
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "fn":
      var.set_value(jnp.zeros_like(var.get_value()))
    elif path[-1] == "base":
      value = jnp.zeros_like(var.get_value())
      var.set_value(value.at[..., 0].set(30.0))  # index 0: the one stream's pre / head gate


def test_one_stream_with_zero_mixing_is_the_plain_residual():
  plain = randomized_model(tiny_config())
  mixed = randomized_model(tiny_config(mhc=HyperConnectionsConfig(1, 20, 0.0)))
  _plain_gates(mixed)
  plain_state = dict(nnx.to_flat_state(nnx.state(plain)))
  for path, var in nnx.to_flat_state(nnx.state(mixed)):
    if path in plain_state:
      var.set_value(plain_state[path].get_value())
    else:
      assert any("residual" in str(p) for p in path), path  # only the mHC parameters are new
  ids = tokens(plain.config)
  a, b = forward(plain, ids), forward(mixed, ids)
  np.testing.assert_array_equal(a.logits, b.logits)
  np.testing.assert_array_equal(a.hidden, b.hidden)
  np.testing.assert_array_equal(plain.mtp_logits(ids, a.hidden)[0],
                                mixed.mtp_logits(ids, b.hidden)[0])


@pytest.fixture(scope="module")
def mhc_model():
  return randomized_model(tiny_config(mhc=HyperConnectionsConfig(4), num_mtp_layers=0))


def test_mhc_model_scanned_equals_unrolled(mhc_model):
  (logits1, g1), (logits2, g2) = scanned_and_unrolled(mhc_model,
                                                      tokens(mhc_model.config, t=16))
  np.testing.assert_allclose(logits1, logits2, atol=1e-5)
  flat1, flat2 = dict(nnx.to_flat_state(g1)), dict(nnx.to_flat_state(g2))
  for path, value in flat1.items():
    np.testing.assert_allclose(value.get_value(), flat2[path].get_value(), atol=1e-5, rtol=1e-4)
  hc_grads = [v.get_value() for p, v in flat1.items() if p[-1] in ("fn", "base", "scale")]
  # Two stacks (dense, MoE) of (attention, feed-forward) connections, and the head.
  assert len(hc_grads) == 2 * 2 * 3 + 3 and all(float(jnp.abs(g).sum()) > 0 for g in hc_grads)


def test_mhc_model_prefill_decode_and_generate(mhc_model):
  ids = tokens(mhc_model.config, t=20)
  full = forward(mhc_model, ids).logits
  out, cache = mhc_model.prefill(ids[:, :12], slots=20)
  np.testing.assert_allclose(out.logits, full[:, :12], atol=1e-5)
  decoded = []
  for t in range(12, 20):
    positions = jnp.full((ids.shape[0], 1), t, jnp.int32)
    logits, _, cache = mhc_model.decode(ids[:, t:t + 1], positions, cache)
    decoded.append(logits)
  np.testing.assert_allclose(jnp.concatenate(decoded, 1), full[:, 12:], atol=1e-4)
  prompt = [int(t) for t in ids[0, :6]]
  generated = dsjax.generate(mhc_model, [prompt], max_new_tokens=3, temperature=0.0)[0]
  seq = list(prompt)
  for _ in range(3):
    seq.append(int(jnp.argmax(forward(mhc_model, jnp.asarray([seq], jnp.int32)).logits[0, -1])))
  assert generated == seq[len(prompt):]


def test_mhc_config_errors_say_what_to_change():
  with pytest.raises(ValueError, match="hc_mult=0 must be >= 1"):
    HyperConnectionsConfig(hc_mult=0)
  with pytest.raises(ValueError, match="sinkhorn_iters=0"):
    HyperConnectionsConfig(sinkhorn_iters=0)
  with pytest.raises(ValueError, match="mhc=.*must be a HyperConnectionsConfig"):
    tiny_config(mhc=4)
