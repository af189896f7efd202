"""NSA decoding (dsjax.ops.nsa_decode, NSAttention.prefill/decode) against the training forward
pass: ragged rows, one and three tokens per step, greedy generation, the incrementally built
compressed state, and a selection that reads only the selected blocks.

Small blocks (l=8, d=4, l'=8, n=4, w=12) so that ~60-token rows cross many compressed and
selection blocks and the window; one block per query is chosen by score (the first and the 2
local blocks are forced)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.config import NSAConfig, RopeConfig
from dsjax.infer import Generator, bytes_per_token_per_layer
from dsjax.infer.cache import pad_slots
from dsjax.infer.generation import _per_layer_cache, compiled_steps
from dsjax.model.nsa import NSAttention
from dsjax.model.stack import unstack_layers
from dsjax.model.param import RouterBias
from dsjax.ops import nsa_decode
from dsjax.ops.rope import rope_cos_sin
from tests.model_fixtures import forward, tiny_config

NSA = NSAConfig(num_kv_heads=2, head_dim=8, v_head_dim=8, compress_block=8, compress_stride=4,
                compress_hidden=16, select_block=8, num_selected=4, window=12)
TOTAL, PROMPT_PAD, SLOTS = 64, 32, 64
LENGTHS = np.array([13, 30, 5, 21], np.int32)  # ragged prompts, right-padded to PROMPT_PAD
STEPS = 30  # decoded tokens per row: row 1 ends at position 59


def _random_model(cfg, seed=0) -> dsjax.Transformer:
  """An abstract model filled with numpy random weights (no compiled init): normal(0, std)
  parameters, norm weights uniform(0.5, 1.5), router biases normal(0, 0.1), as
  tests.model_fixtures.randomized_model."""
  model = nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if path[-1] == "weight":
      value = rng.uniform(0.5, 1.5, shape)
    elif isinstance(var, RouterBias):
      value = rng.normal(0, 0.1, shape)
    else:
      value = rng.normal(0, cfg.initializer_range, shape)
    var.set_value(jnp.asarray(value, dtype))
  return model


def _config(**changes):
  # 1 dense + 1 MoE layer: both stacks decode.
  return tiny_config(attention="nsa", nsa=NSA, num_hidden_layers=2, num_mtp_layers=0,
                     max_position_embeddings=128).replace(**changes)


@pytest.fixture(scope="module")
def model():
  return _random_model(_config())


@pytest.fixture(scope="module")
def reference(model):
  ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (len(LENGTHS), TOTAL))
  ids = jnp.asarray(ids, jnp.int32)
  return ids, np.asarray(forward(model, ids).logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill(graphdef, state, ids, lengths, *, slots):
  return nnx.merge(graphdef, state).prefill(ids, lengths=lengths, slots=slots)[1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, cache, ids, positions):
  logits, _, cache = nnx.merge(graphdef, state).decode(ids, positions, cache)
  return logits, cache


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
@pytest.mark.parametrize("step", [1, 3])
def test_prefill_and_decode_equal_the_full_forward(model, reference, step, layout):
  """Rows of prompt lengths 13, 30, 5, 21 (padded to 32 with other tokens, whose slots and
  blocks are stale), then 30 tokens each, `step` per decode call; with the stacked cache, or
  per-layer weights and buffers (each layer writing its new selection keys/values first)."""
  ids, full = reference
  graphdef, state = nnx.split(model)
  prompt = jnp.where(jnp.arange(PROMPT_PAD) < LENGTHS[:, None], ids[:, :PROMPT_PAD], 7)
  cache = _prefill(graphdef, state, prompt, LENGTHS, slots=SLOTS)
  if layout == "per_layer":
    state, cache = unstack_layers(state), _per_layer_cache(cache)
  for start in range(0, STEPS, step):
    positions = jnp.asarray(LENGTHS[:, None] + start + np.arange(step), jnp.int32)
    logits, cache = _decode(graphdef, state, cache, jnp.take_along_axis(ids, positions, 1),
                            positions)
    np.testing.assert_allclose(np.asarray(logits),
                               np.take_along_axis(full, np.asarray(positions)[..., None], 1),
                               atol=1e-4, rtol=1e-4, err_msg=f"positions {positions[:, 0]}")


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_greedy_generate_equals_repeated_forward(model, layout):
  """dsjax.generate (prefill + decode with NSA's decode state, per-layer buffers written in
  place or stacked) against greedy decoding by full forward passes: the argmax of the logits
  at each row's last token, appended. The forward runs at a fixed padded length (causality
  makes the padding irrelevant), so it compiles once."""
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (7, 19, 12, 30)]
  new = 26
  got = dsjax.generate(model, prompts, max_new_tokens=new, layout=layout)
  ids = np.zeros((len(prompts), TOTAL), np.int32)
  lengths = np.array([len(p) for p in prompts])
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)] = prompt
  for _ in range(new):
    logits = np.asarray(forward(model, jnp.asarray(ids)).logits)
    ids[np.arange(len(prompts)), lengths] = logits[np.arange(len(prompts)), lengths - 1].argmax(-1)
    lengths += 1
  expected = [ids[row, len(p):len(p) + new].tolist() for row, p in enumerate(prompts)]
  assert got == expected


def test_cache_layout_and_bytes():
  """Selection keys/values per slot, compressed blocks that fit in the slots, rings of l and
  w positions; bytes_per_token_per_layer counts what grows with the slots."""
  cfg = _config(num_mtp_layers=1)
  model = nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  prefill = compiled_steps(graphdef).prefill
  _, _, cache = jax.eval_shape(
      lambda s: prefill(s, jnp.zeros((2, 16), jnp.int32), jnp.array([3, 16]),
                        jax.random.key(0), slots=128, sampling=dsjax.infer.SamplingParams(),
                        moe_impl=None, draft=False), state)
  kv, h = NSA.num_kv_heads, NSA.head_dim
  blocks = (128 - NSA.compress_block) // NSA.compress_stride + 1
  assert cache.dense.k_slc.shape == (1, 2, 128, kv, h)
  assert cache.moe.k_cmp.shape == (1, 2, blocks, kv, h)
  assert cache.moe.k_raw.shape[2] == NSA.compress_block
  assert cache.moe.k_win.shape[2] == NSA.window
  values = kv * (h + NSA.v_head_dim)
  assert bytes_per_token_per_layer(cache) == pytest.approx(values * 4 * (1 + blocks / 128))
  per_layer = _per_layer_cache(cache)
  assert len(per_layer.moe.k_slc.arrays) == 1 and per_layer.moe.k_slc.arrays[0].shape == (
      2, 128, kv, h)
  assert bytes_per_token_per_layer(per_layer) == bytes_per_token_per_layer(cache)
  assert nsa_decode.values_per_token(NSA, 128) == pytest.approx(values * (1 + blocks / 128))
  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
  assert total == 2 * 2 * 4 * values * (128 + blocks + NSA.compress_block + NSA.window)
  with pytest.raises(ValueError, match="final size"):
    pad_slots(cache.moe, 256)
  with pytest.raises(ValueError, match="speculative='mtp' is not supported"):
    Generator(model).generate([[1, 2]], 4, speculative="mtp")


# ---- one layer ----

def _layer_and_inputs(b, t, seed=0):
  layer = NSAttention(32, 4, NSA, std=0.3, rngs=nnx.Rngs(seed))
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, 32)), jnp.float32)
  return layer, x


def _cos_sin(positions):
  return rope_cos_sin(positions, RopeConfig(), NSA.head_dim)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_forward(graphdef, state, x):
  """The layer's training forward pass over x [B,T,D] and its compressed keys/values."""
  layer = nnx.merge(graphdef, state)
  cos, sin = _cos_sin(jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))
  _, _, k, v = layer._project(x, cos, sin)
  return layer(x, cos, sin), layer._compress(k[0], v[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _layer_prefill(graphdef, state, x, lengths, *, slots):
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  return nnx.merge(graphdef, state).prefill(x, *_cos_sin(positions), lengths, slots)[1]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_decode(graphdef, state, cache, x, positions):
  """One decode step of the layer: (out [B,T,D], selected blocks, the cache after it)."""
  layer = nnx.merge(graphdef, state)
  outs, gates, indices, update = layer.decode_branches(x, *_cos_sin(positions), cache,
                                                       positions)
  stacked = nsa_decode.write_selection_slots(jax.tree.map(lambda a: a[None], cache),
                                             jax.tree.map(lambda a: a[None], update), positions)
  return layer._mix(outs, gates), indices, jax.tree.map(lambda a: a[0], stacked)


def test_compressed_state_equals_compression_from_scratch():
  """After a ragged prefill and 2-token decode steps, the compressed state holds, for every
  block a row has completed, phi of the block's keys/values computed over the whole
  sequence; the layer's decode outputs equal its forward pass."""
  lengths, steps = np.array([5, 22]), 38
  layer, x = _layer_and_inputs(2, 64)
  graphdef, state = nnx.split(layer)
  prompt = jnp.where((jnp.arange(24) < lengths[:, None])[..., None], x[:, :24], -x[:, :24])
  cache = _layer_prefill(graphdef, state, prompt, lengths, slots=64)
  full, (k_cmp, v_cmp) = _layer_forward(graphdef, state, x)
  full = np.asarray(full)
  for start in range(0, steps, 2):
    positions = jnp.asarray(lengths[:, None] + start + np.arange(2), jnp.int32)
    out, _, cache = _layer_decode(graphdef, state, cache,
                                  jnp.take_along_axis(x, positions[..., None], 1), positions)
    np.testing.assert_allclose(np.asarray(out),
                               np.take_along_axis(full, np.asarray(positions)[..., None], 1),
                               atol=1e-5)
  last = lengths + steps - 1
  for row in range(2):
    done = (last[row] - NSA.compress_block) // NSA.compress_stride + 1  # blocks completed
    assert done > (lengths[row] - NSA.compress_block) // NSA.compress_stride + 1 + 4
    np.testing.assert_allclose(cache.k_cmp[row, :done], k_cmp[row, :done], atol=1e-5)
    np.testing.assert_allclose(cache.v_cmp[row, :done], v_cmp[row, :done], atol=1e-5)


def test_decode_reads_only_the_selected_blocks():
  """Overwriting the selection keys/values of every slot outside the blocks a query selected
  (its window included) leaves the decode output bit-identical; changing a selected block
  chosen by score (neither the first nor a local block) changes it."""
  prompt, b = 56, 2
  layer, x = _layer_and_inputs(b, prompt + 1, seed=1)
  graphdef, state = nnx.split(layer)
  cache = _layer_prefill(graphdef, state, x[:, :prompt], None, slots=SLOTS)
  positions = jnp.full((b, 1), prompt, jnp.int32)
  step = lambda c: _layer_decode(graphdef, state, c, x[:, prompt:], positions)
  out, indices, _ = step(cache)
  indices = np.asarray(indices[:, 0])  # [B,KV,n]
  own = prompt // NSA.select_block
  block_of_slot = np.arange(SLOTS) // NSA.select_block
  # [B,S,KV,1]: whether a slot lies in a block its KV head selected
  selected = (block_of_slot[:, None] == indices.transpose(0, 2, 1)[:, :, None, :]).any(1)[..., None]
  noise = np.random.default_rng(2).normal(0, 100, cache.k_slc.shape).astype(np.float32)
  unselected = cache._replace(k_slc=jnp.where(selected, cache.k_slc, noise),
                              v_slc=jnp.where(selected, cache.v_slc, noise))
  assert int((~selected).sum()) == b * NSA.num_kv_heads * (SLOTS - 4 * NSA.select_block)
  np.testing.assert_array_equal(np.asarray(step(unselected)[0]), np.asarray(out))
  scored = [j for j in indices[0, 0] if j not in (0, own, own - 1)]
  assert len(scored) == 1 and 0 < scored[0] < own - 1
  block = slice(scored[0] * NSA.select_block, (scored[0] + 1) * NSA.select_block)
  changed = cache._replace(k_slc=cache.k_slc.at[0, block, 0].add(1.0),
                           v_slc=cache.v_slc.at[0, block, 0].add(1.0))
  diff = np.abs(np.asarray(step(changed)[0]) - np.asarray(out))
  assert diff[0].max() > 1e-3 and diff[1].max() == 0
