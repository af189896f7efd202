"""Cross-entropy, MTP targets, the sequence-wise balance loss and expert-load statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsjax.train.loss import (cross_entropy, expert_load, load_imbalance, mtp_targets,
                              sequence_balance_loss)


def random_logits(rng, shape, scale=3.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_cross_entropy_matches_torch_with_ignored_positions():
  rng = np.random.default_rng(0)
  b, t, v = 3, 7, 11
  logits = random_logits(rng, (b, t, v))
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  targets_with_padding = np.where(mask > 0, targets, -1)  # padding ids are out of range
  ce = cross_entropy(jnp.asarray(logits), jnp.asarray(targets_with_padding), jnp.asarray(mask))
  want = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).reshape(-1, v), torch.from_numpy(targets_with_padding).reshape(-1)
      .long(), ignore_index=-1, reduction="sum")
  np.testing.assert_allclose(float(ce.loss_sum), want.item(), rtol=1e-6)
  assert float(ce.weight_sum) == mask.sum()
  mean = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).reshape(-1, v), torch.from_numpy(targets_with_padding).reshape(-1)
      .long(), ignore_index=-1)
  np.testing.assert_allclose(float(ce.loss_sum / ce.weight_sum), mean.item(), rtol=1e-6)


def test_cross_entropy_upcasts_bf16_and_ignores_nonfinite_dropped_positions():
  rng = np.random.default_rng(1)
  logits = random_logits(rng, (2, 5, 9))
  targets = jnp.asarray(rng.integers(0, 9, (2, 5)), jnp.int32)
  mask = jnp.ones((2, 5)).at[1, 4].set(0.0)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  ce = cross_entropy(bf16, targets, mask)
  ref = cross_entropy(bf16.astype(jnp.float32), targets, mask)
  assert ce.loss_sum.dtype == jnp.float32 and float(ce.loss_sum) == float(ref.loss_sum)
  broken = bf16.at[1, 4].set(jnp.nan)
  assert float(cross_entropy(broken, targets, mask).loss_sum) == float(ref.loss_sum)


def test_z_loss_sum_matches_numpy():
  rng = np.random.default_rng(2)
  logits = random_logits(rng, (2, 6, 13))
  mask = (rng.random((2, 6)) > 0.4).astype(np.float32) * 0.5  # non-binary weights too
  targets = rng.integers(0, 13, (2, 6))
  lse = np.log(np.sum(np.exp(logits.astype(np.float64)), axis=-1))
  ce = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(ce.z_sum), np.sum(mask * lse ** 2), rtol=1e-6)
  # The z-loss is the weighted mean of lse^2 over valid tokens.
  np.testing.assert_allclose(float(ce.z_sum / ce.weight_sum),
                             np.sum(mask * lse ** 2) / mask.sum(), rtol=1e-6)


def test_mtp_targets_stop_at_sequence_boundaries():
  # One row packing sequence 1 (tokens 0-3) and sequence 2 (tokens 4-6), then padding.
  targets = jnp.asarray([[10, 11, 12, 13, 20, 21, 22, 0]])
  segment_ids = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
  loss_mask = jnp.asarray([[1, 1, 1, 0, 1, 1, 0, 0]], jnp.float32)  # last token: no target
  t1, m1 = mtp_targets(targets, segment_ids, loss_mask, 1)
  np.testing.assert_array_equal(t1, [[11, 12, 13, 20, 21, 22, 0]])
  np.testing.assert_array_equal(m1, [[1, 1, 0, 0, 1, 0, 0]])
  t2, m2 = mtp_targets(targets, segment_ids, loss_mask, 2)
  np.testing.assert_array_equal(t2, [[12, 13, 20, 21, 22, 0]])
  np.testing.assert_array_equal(m2, [[1, 0, 0, 0, 0, 0]])
  assert m1.dtype == jnp.float32
  with pytest.raises(ValueError, match="num_mtp_layers"):
    mtp_targets(targets, segment_ids, loss_mask, 8)


def balance_loss_reference(scores, expert_ids, segment_ids, k, token_mask):
  """Straightforward loops over layers, rows and segment ids."""
  layers, _, e = scores.shape
  b, t = segment_ids.shape
  out = np.zeros(layers)
  for layer in range(layers):
    s = scores[layer].reshape(b, t, e)
    ids = expert_ids[layer].reshape(b, t, k)
    per_sequence = []
    for row in range(b):
      for seg in np.unique(segment_ids[row]):
        tokens = [i for i in range(t) if segment_ids[row, i] == seg and seg > 0
                  and token_mask[row, i] > 0]
        if not tokens:
          continue
        n = len(tokens)
        counts = np.zeros(e)
        for i in tokens:
          for expert in ids[row, i]:
            counts[expert] += 1
        f = e / (k * n) * counts
        p = sum(s[row, i] / s[row, i].sum() for i in tokens) / n
        per_sequence.append(np.sum(f * p))
    out[layer] = np.mean(per_sequence)
  return out


def random_routing(rng, layers, m, e, k):
  logits = rng.standard_normal((layers, m, e))
  scores = 1 / (1 + np.exp(-logits))
  expert_ids = np.argsort(-logits - rng.standard_normal(logits.shape), axis=-1)[..., :k]
  return scores.astype(np.float32), expert_ids.astype(np.int32)


def test_sequence_balance_loss_matches_loop_reference():
  rng = np.random.default_rng(3)
  b, t, e, k, layers = 3, 12, 8, 3, 2
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
                          [5, 5, 5, 5, 5, 5, 7, 7, 7, 0, 0, 0],   # large ids, padding
                          [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
  token_mask = (rng.random((b, t)) > 0.2).astype(np.float32)
  scores, expert_ids = random_routing(rng, layers, b * t, e, k)
  got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(expert_ids),
                              jnp.asarray(segment_ids), k, jnp.asarray(token_mask))
  want = balance_loss_reference(scores, expert_ids, segment_ids, k, token_mask)
  assert got.shape == (layers,)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  flat = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(expert_ids),
                               jnp.asarray(segment_ids), k, jnp.asarray(token_mask).reshape(-1))
  np.testing.assert_allclose(np.asarray(flat), np.asarray(got))


def test_sequence_balance_loss_is_one_for_uniform_routing():
  e, k, t = 8, 2, 8
  # Each 4-token sequence (two per row) uses every expert exactly once: K*T_s = E.
  ids = np.stack([np.arange(0, 8, 2), np.arange(1, 8, 2)], axis=-1)  # [4, 2]
  expert_ids = np.tile(ids, (2 * 2, 1))[None]  # [1, B*T=16, K]
  scores = np.full((1, 16, e), 0.3, np.float32)
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2]] * 2)
  got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(expert_ids),
                              jnp.asarray(segment_ids), k)
  np.testing.assert_allclose(np.asarray(got), [1.0], rtol=1e-6)


def test_sequence_balance_loss_gradient_reaches_scores():
  rng = np.random.default_rng(4)
  b, t, e, k = 2, 10, 6, 2
  scores, expert_ids = random_routing(rng, 2, b * t, e, k)
  segment_ids = jnp.asarray([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3])

  @jax.jit
  def loss(s):
    return jnp.sum(sequence_balance_loss(s, jnp.asarray(expert_ids), segment_ids, k))
  grad = np.asarray(jax.grad(loss)(jnp.asarray(scores)))
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  padding = np.asarray(segment_ids).reshape(-1) == 0
  assert np.all(grad[:, padding] == 0) and np.all(np.abs(grad[:, ~padding]).sum(-1) > 0)


def test_expert_load_matches_bincount():
  rng = np.random.default_rng(5)
  layers, m, e, k = 3, 20, 7, 2
  _, expert_ids = random_routing(rng, layers, m, e, k)
  token_mask = (rng.random(m) > 0.3).astype(np.float32)
  load = np.asarray(expert_load(jnp.asarray(expert_ids), e, jnp.asarray(token_mask)))
  for layer in range(layers):
    kept = expert_ids[layer][token_mask > 0].reshape(-1)
    np.testing.assert_array_equal(load[layer], np.bincount(kept, minlength=e))
  everything = np.asarray(expert_load(jnp.asarray(expert_ids), e))
  np.testing.assert_array_equal(everything.sum(-1), [m * k] * layers)
  assert load.dtype == np.float32


def test_load_imbalance():
  uniform = jnp.full((2, 8), 5.0)
  np.testing.assert_array_equal(load_imbalance(uniform), [1.0, 1.0])
  skewed = jnp.asarray([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  np.testing.assert_allclose(load_imbalance(skewed), [4.0, 1.0])
