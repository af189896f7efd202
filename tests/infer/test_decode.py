"""The latent-cache decode path against the full forward pass, absorbed vs naive attention, the
cache's size measured from its arrays, and compilation once per shape bucket."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.infer import Generator, bytes_per_token_per_layer, cache_ratio
from dsjax.infer.generation import _per_layer_cache, compiled_steps
from dsjax.infer.cache import pad_slots
from dsjax.infer.weight_layout import out_major_projections
from dsjax.model.stack import PerLayer, unstack_layers
from dsjax.model.transformer import DecodeCache
from tests.model_fixtures import forward, randomized_model, tiny_config, tokens

PROMPT, TOTAL, SLOTS = 9, 21, 32


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl", "step", "layout"))
def _prefill_then_decode(graphdef, state, ids, *, attn_impl: str, step: int,
                         layout: str = "stacked"):
  """Logits [B,TOTAL-PROMPT,V] of tokens PROMPT.. computed by prefilling ids[:, :PROMPT] and
  then decoding `step` tokens per call, plus the final cache. layout "per_layer": decoding
  with PerLayer weights and cache buffers; "out_major": the same with output-major projection
  weights (the Generator's default on CPU)."""
  model = nnx.merge(graphdef, state)
  _, latents = model.prefill(ids[:, :PROMPT])
  cache = DecodeCache({name: pad_slots(c, SLOTS) for name, c in latents.layers.items()})
  if layout != "stacked":
    per_layer_state = unstack_layers(state)
    if layout == "out_major":
      per_layer_state = out_major_projections(model, per_layer_state)
    model = nnx.merge(graphdef, per_layer_state)
    cache = _per_layer_cache(cache)
  b = ids.shape[0]
  outputs = []
  for start in range(PROMPT, TOTAL, step):
    positions = jnp.broadcast_to(jnp.arange(start, start + step, dtype=jnp.int32), (b, step))
    logits, _, cache = model.decode(ids[:, start:start + step], positions, cache, attn_impl)
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1), cache


@pytest.fixture(scope="module")
def model():
  return randomized_model(tiny_config(num_mtp_layers=0))


@pytest.fixture(scope="module")
def reference(model):
  ids = tokens(model.config, b=2, t=TOTAL, seed=3)
  return ids, np.asarray(forward(model, ids).logits)


@pytest.mark.parametrize("layout", ["stacked", "per_layer", "out_major"])
@pytest.mark.parametrize("attn_impl,step", [("absorb", 1), ("naive", 1), ("absorb", 3)])
def test_prefill_and_decode_equal_the_full_forward(model, reference, attn_impl, step, layout):
  ids, full = reference
  graphdef, state = nnx.split(model)
  logits, cache = _prefill_then_decode(graphdef, state, ids, attn_impl=attn_impl, step=step,
                                       layout=layout)
  np.testing.assert_allclose(np.asarray(logits), full[:, PROMPT:], atol=1e-4, rtol=1e-4)
  assert isinstance(cache.moe.c_kv, PerLayer) == (layout != "stacked")


def test_per_layer_cache_holds_the_stacked_cache(model, reference):
  """Both layouts write the same latents to the same slots."""
  ids, _ = reference
  graphdef, state = nnx.split(model)
  _, stacked = _prefill_then_decode(graphdef, state, ids, attn_impl="absorb", step=1)
  _, per_layer = _prefill_then_decode(graphdef, state, ids, attn_impl="absorb", step=1,
                                      layout="per_layer")
  for name in ("dense", "moe"):
    for a, b in zip(getattr(stacked, name), getattr(per_layer, name)):
      np.testing.assert_allclose(np.asarray(a), np.stack(b.arrays), atol=1e-5)


def test_absorbed_equals_naive_decode(model, reference):
  ids, _ = reference
  graphdef, state = nnx.split(model)
  absorbed, cache_a = _prefill_then_decode(graphdef, state, ids, attn_impl="absorb", step=1)
  naive, cache_n = _prefill_then_decode(graphdef, state, ids, attn_impl="naive", step=1)
  diff = float(jnp.abs(absorbed - naive).max())
  assert diff <= 1e-4, diff
  # Both write the same latents: the cache content does not depend on the attention math.
  for a, b in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_n)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_per_token_per_layer_are_latent_plus_rope(dtype, layout):
  cfg = tiny_config(dtype=dtype, num_mtp_layers=1)
  model = nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((3, 16), jnp.int32)
  lengths = jax.ShapeDtypeStruct((3,), jnp.int32)
  prefill = compiled_steps(graphdef).prefill
  _, _, cache = jax.eval_shape(
      lambda s, i, n: prefill(s, i, n, jax.random.key(0), slots=128,
                              sampling=dsjax.infer.SamplingParams(), moe_impl=None, draft=True,
                              layout=layout),
      state, ids, lengths)
  expected = (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * jnp.dtype(dtype).itemsize
  assert bytes_per_token_per_layer(cache) == expected
  layers = sum(len(c.c_kv.arrays) if isinstance(c.c_kv, PerLayer) else c.c_kv.shape[0]
               for c in (cache.dense, cache.moe, cache.mtp))
  assert layers == cfg.num_hidden_layers + 1  # every MLA layer, the MTP module's included
  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
  assert total == expected * layers * 3 * 128


def test_deepseek_v3_cache_ratio():
  cfg = dsjax.load_config("configs/deepseek_v3_671b.py")
  # 128 heads x (192 + 128) values vs 512 + 64: 71.1x smaller than a full K/V cache.
  assert cache_ratio(cfg) == pytest.approx(128 * (192 + 128) / (512 + 64))


def test_generation_compiles_once_per_bucket(model):
  generator = Generator(model)
  prefill, decode = generator.steps.prefill, generator.steps.decode
  rng = np.random.default_rng(0)

  def prompts(*lengths):
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in lengths]

  generator.generate(prompts(5, 9), max_new_tokens=4)
  before = prefill._cache_size(), decode._cache_size()
  first = generator.generate(prompts(12, 3), max_new_tokens=4)   # same buckets: batch 2, len 16
  assert (prefill._cache_size(), decode._cache_size()) == before
  assert [len(t) for t in first.tokens] == [4, 4]
  generator.generate(prompts(12, 3, 7), max_new_tokens=4)        # batch bucket 4: new shapes
  assert prefill._cache_size() == before[0] + 1
