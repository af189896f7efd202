"""DSA's two implementations agree: the gather path (each query reads its k selected latents,
absorbed) equals the dense-mask reference in logits and in every gradient; the selection
matters (a larger top-k changes the logits), packed documents stay apart, and the LM loss sends
no gradient into the indexer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import DSAConfig
from dsjax.infer import bytes_per_token_per_layer
from tests.model_fixtures import randomized_model, tiny_config, tokens

DSA = DSAConfig(index_n_heads=16, index_head_dim=16, index_topk=6)


def _model(impl, topk=DSA.index_topk):
  cfg = tiny_config(attention="dsa", dsa=dataclasses.replace(DSA, impl=impl, index_topk=topk),
                    num_mtp_layers=0)
  return randomized_model(cfg)


def _loss(params, rest, graphdef, ids, segment_ids):
  out = nnx.merge(graphdef, params, rest).forward(ids, segment_ids=segment_ids)
  return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 1]), out.logits


def _value_and_grad(model, ids, segment_ids=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=2)
  (loss, logits), grads = fn(params, rest, graphdef, ids, segment_ids)
  return logits, nnx.to_flat_state(grads)


@pytest.fixture(scope="module")
def ids():
  return tokens(tiny_config(), t=20)


def test_gather_equals_dense_reference(ids):
  gather_logits, gather_grads = _value_and_grad(_model("gather"), ids)
  dense_logits, dense_grads = _value_and_grad(_model("dense"), ids)
  np.testing.assert_allclose(gather_logits, dense_logits, atol=1e-5)
  for (path, g), (_, d) in zip(gather_grads, dense_grads):
    np.testing.assert_allclose(g.get_value(), d.get_value(), atol=1e-5, rtol=1e-4,
                               err_msg="/".join(map(str, path)))
  indexer = [g for p, g in gather_grads if "indexer" in p]
  assert indexer and all(float(jnp.abs(g.get_value()).max()) == 0 for g in indexer)
  others = [g for p, g in gather_grads if "indexer" not in p]
  assert sum(float(jnp.abs(g.get_value()).max()) > 0 for g in others) > 10


def test_pallas_kernels_equal_the_gather_path(ids):
  """dsa.impl="pallas" (pallas_kernels.dsa's TPU kernel in its interpreter on CPU) gives the
  gather path's logits and gradients, packed documents included."""
  segment_ids = jnp.asarray(np.repeat([[1, 2]], 10, axis=1).reshape(1, 20).repeat(2, 0))
  kernel_logits, kernel_grads = _value_and_grad(_model("pallas"), ids, segment_ids)
  gather_logits, gather_grads = _value_and_grad(_model("gather"), ids, segment_ids)
  np.testing.assert_allclose(kernel_logits, gather_logits, atol=1e-5)
  for (path, g), (_, d) in zip(kernel_grads, gather_grads):
    np.testing.assert_allclose(g.get_value(), d.get_value(), atol=1e-5, rtol=1e-4,
                               err_msg="/".join(map(str, path)))


def test_selection_changes_the_output(ids):
  sparse, _ = _value_and_grad(_model("gather"), ids)
  dense_mla, _ = _value_and_grad(_model("gather", topk=64), ids)
  np.testing.assert_allclose(sparse[:, :DSA.index_topk], dense_mla[:, :DSA.index_topk],
                             atol=1e-5)  # queries with <= k visible keys see them all
  assert float(jnp.abs(sparse - dense_mla).max()) > 1e-2


def test_packed_documents_stay_apart(ids):
  model = _model("gather")
  segment_ids = jnp.asarray(np.repeat([[1, 2]], 10, axis=1).reshape(1, 20).repeat(2, 0))
  packed, _ = _value_and_grad(model, ids, segment_ids)
  alone, _ = _value_and_grad(model, ids[:, 10:])
  np.testing.assert_allclose(packed[:, 10:], alone, atol=1e-5)


def _decode_logits(model, ids, prompt, slots=32):
  out, cache = model.prefill(ids[:, :prompt], slots=slots)
  logits = []
  for t in range(prompt, ids.shape[1]):
    positions = jnp.full((ids.shape[0], 1), t, jnp.int32)
    step, _, cache = model.decode(ids[:, t:t + 1], positions, cache)
    logits.append(step)
  return out.logits, jnp.concatenate(logits, axis=1), cache


def test_prefill_and_decode_equal_the_forward(ids):
  model = _model("gather")
  full, _ = _value_and_grad(model, ids)
  prompt_logits, decoded, cache = _decode_logits(model, ids, 9)
  np.testing.assert_allclose(prompt_logits, full[:, :9], atol=1e-5)
  np.testing.assert_allclose(decoded, full[:, 9:], atol=1e-4)
  c = cache.dense
  assert c.k_index.shape[-1] == DSA.index_head_dim and c.slots == 32
  # what a token adds to one layer's cache: MLA's latent and rope key, plus the index key
  mla = model.config.mla
  per_token = (mla.kv_lora_rank + mla.qk_rope_head_dim + DSA.index_head_dim) * 4
  assert bytes_per_token_per_layer(cache) == per_token


def test_generate_equals_greedy_argmax(ids):
  import dsjax
  model = _model("gather")
  prompt = [int(t) for t in ids[0, :7]]
  generated = dsjax.generate(model, [prompt], max_new_tokens=6, temperature=0.0)[0]
  seq = list(prompt)
  for _ in range(6):
    logits, _ = _value_and_grad(model, jnp.asarray([seq], jnp.int32))
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert generated == seq[len(prompt):]


def test_decode_reads_only_the_selected_latents(ids, monkeypatch):
  """Corrupting every cached latent (c_kv, k_pe) that no query of a decode step selects leaves
  the step's logits bit-identical (unrolled, eager: each layer's selection is recorded as it
  runs); the indexer's own keys are read for every slot."""
  from dsjax.model import dsa as dsa_module
  model = _model("gather")
  prompt = 16
  _, cache = model.prefill(ids[:, :prompt], slots=20)
  positions = jnp.full((ids.shape[0], 1), prompt, jnp.int32)
  recorded = []
  top_k = dsa_module.dsa_ops.top_k

  def recording_top_k(scores, visible, k):
    indices, valid = top_k(scores, visible, k)
    recorded.append(np.asarray(jnp.where(valid, indices, -1)))
    return indices, valid
  monkeypatch.setattr(dsa_module.dsa_ops, "top_k", recording_top_k)
  logits, _, _ = model.decode(ids[:, prompt:prompt + 1], positions, cache, scan=False)
  monkeypatch.undo()
  # One recording per layer, in layer order: the stacks' caches hold their layers in order.
  layers, offset = {}, 0
  for name, c in cache.layers.items():
    count, batch, slots = c.c_kv.shape[:3]
    keep = np.zeros((count, batch, slots), bool)
    for layer in range(count):
      chosen = recorded[offset + layer]  # [B,T,k]; slots >= `slots` are the new token
      for b in range(batch):
        picked = chosen[b][(chosen[b] >= 0) & (chosen[b] < slots)]
        keep[layer, b, picked] = True
    offset += count
    # The latents (what attention reads); the indexer's keys are read for every slot.
    layers[name] = c._replace(**{f: jnp.where(jnp.asarray(keep)[..., None], getattr(c, f), 1e3)
                                 for f in ("c_kv", "k_pe")})
    assert (~keep[:, :, :prompt]).sum() >= count * batch * (prompt - DSA.index_topk)
  noisy_logits, _, _ = model.decode(ids[:, prompt:prompt + 1], positions,
                                    cache._replace(layers=layers), scan=False)
  np.testing.assert_array_equal(np.asarray(noisy_logits), np.asarray(logits))
