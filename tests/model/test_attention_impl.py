"""mla.attention_impl changes how attention is computed, not what: a tiny MLA model with packed
sequences gives the same logits and parameter gradients (main and MTP losses) with the dense,
blocked and (interpreted) Pallas implementations, the blocked and Pallas ones run in several
query blocks (and, blocked, key blocks)."""

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax

from dsjax.checkpoint.hf_config import from_hf, to_hf
from dsjax.ops import flash_attention
from dsjax.train.state import check_same_architecture
from pallas_kernels.attention import BlockSizes
from tests.model_fixtures import (assert_close_at_scale, randomized_model, tiny_config,
                                  tokens)
from tests.ops.test_flash_attention import packed

T = 40


def _with_impl(model, impl: str):
  cfg = model.config
  cfg = cfg.replace(mla=dataclasses.replace(cfg.mla, attention_impl=impl))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def _loss(model, ids, positions, segment_ids):
  out = model.forward(ids, positions, segment_ids)
  mtp = sum(jnp.mean(depth.logits) for depth in
            model.mtp_forward(ids, out.hidden, positions, segment_ids))
  return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0]) + mtp, out.logits


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_and_grads(graphdef, params, rest, ids, positions, segment_ids):
  def loss(p):
    return _loss(nnx.merge(graphdef, p, rest), ids, positions, segment_ids)
  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def _run(model, ids, positions, segment_ids):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return _logits_and_grads(graphdef, params, rest, ids, positions, segment_ids)


@pytest.fixture(scope="module")
def setup():
  model = randomized_model(tiny_config())
  ids = tokens(model.config, b=2, t=T)
  segment_ids, positions = packed([[12, 20, 5], [9, 25]], T)  # padded tails of 3 and 6
  return model, (ids, positions, segment_ids), _run(model, ids, positions, segment_ids)


@pytest.mark.parametrize("impl", ["blocked", "pallas"])
def test_attention_impls_give_equal_logits_and_gradients(setup, impl):
  model, inputs, (want_logits, want_grads) = setup
  # Small blocks (read at trace time; this jit's cache holds only this model's graphdef).
  with mock.patch.object(flash_attention, "BLOCK_Q", 16), \
       mock.patch.object(flash_attention, "BLOCK_K", 8), \
       mock.patch.object(flash_attention, "PALLAS_BLOCK_SIZES", BlockSizes(16, 128)):
    logits, grads = _run(_with_impl(model, impl), *inputs)
  assert_close_at_scale(logits, want_logits, 1e-5)
  flat, want_flat = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
  assert len(flat) == len(want_flat)
  for g, e in zip(flat, want_flat, strict=True):
    assert_close_at_scale(g, e, 1e-5)
  assert np.abs(np.asarray(want_logits)).max() > 0


def test_attention_impl_is_a_validated_runtime_field():
  """Validated with a message naming the choices; not written to HF config.json (it says how
  to run, not what the model is), and a checkpoint's differing choice is no architecture
  mismatch for fine-tuning."""
  with pytest.raises(ValueError, match="mla.attention_impl='flash'; use one of"):
    dsjax.MLAConfig(attention_impl="flash")
  cfg = tiny_config()
  blocked = cfg.replace(mla=dataclasses.replace(cfg.mla, attention_impl="blocked"))
  hf = to_hf(blocked)
  assert "attention_impl" not in str(hf)
  assert from_hf(hf).mla == cfg.mla  # "auto", the default
  check_same_architecture(blocked, from_hf(hf), "ckpt")
  other = cfg.replace(mla=dataclasses.replace(cfg.mla, kv_lora_rank=32, attention_impl="blocked"))
  with pytest.raises(ValueError, match="different model"):
    check_same_architecture(other, cfg, "ckpt")
