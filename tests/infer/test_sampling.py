"""Sampling: greedy is argmax; the draws follow the temperature-scaled, top-k then top-p
filtered softmax, checked against a NumPy implementation of the definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.infer import SamplingParams, sample_next
from dsjax.infer.sampling import greedy_tokens

VOCAB, DRAWS = 12, 40_000


def _reference_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
  """The distribution sampling should draw from, for one row of logits."""
  z = logits.astype(np.float64) / params.temperature
  order = np.argsort(-z, kind="stable")
  keep = np.ones(VOCAB, bool)
  if params.top_k is not None:
    keep[order[params.top_k:]] = False
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if params.top_p is not None:
    nucleus = np.zeros(VOCAB, bool)
    mass = 0.0
    for token in order:
      if not keep[token]:
        continue
      nucleus[token] = True
      mass += p[token]
      if mass >= params.top_p:
        break
    p = np.where(nucleus, p, 0.0)
    p /= p.sum()
  return p


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.8),
])
def test_draws_follow_the_filtered_softmax(params):
  logits = np.random.default_rng(0).normal(0, 1.5, VOCAB).astype(np.float32)
  keys = jax.random.split(jax.random.key(7), DRAWS)
  draws = jax.jit(jax.vmap(lambda k: sample_next(jnp.asarray(logits)[None], k, params)[0]))(keys)
  freq = np.bincount(np.asarray(draws), minlength=VOCAB) / DRAWS
  expected = _reference_distribution(logits, params)
  assert np.all(freq[expected == 0] == 0), "a filtered-out token was drawn"
  # 40k draws: the standard error of each frequency is <= 0.0025.
  np.testing.assert_allclose(freq, expected, atol=0.012)


def test_greedy_is_argmax_per_row():
  logits = jax.random.normal(jax.random.key(0), (5, VOCAB))
  np.testing.assert_array_equal(sample_next(logits, jax.random.key(1), SamplingParams()),
                                np.argmax(np.asarray(logits), -1))


def test_greedy_tokens_are_argmax_with_ties_infinities_and_nans():
  """The first of tied maxima, as np.argmax; a row with NaNs gives its first NaN (numpy and
  jnp.argmax treat NaN as the largest value); +-inf are ordinary values."""
  rng = np.random.default_rng(3)
  logits = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # few values: many ties
  logits[5, [2, 30]] = np.inf
  logits[6, :] = -np.inf
  logits[7, [4, 9]] = np.nan
  logits[8, [0, 36]] = np.nan
  logits[9, 36] = np.inf
  want = np.argmax(logits, axis=-1)
  assert want[7] == 4 and want[8] == 0 and want[5] == 2
  got = jax.jit(greedy_tokens)(logits)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(greedy_tokens(logits[None]), want[None])  # leading axes


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
])
def test_invalid_values_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SamplingParams(**kwargs)
