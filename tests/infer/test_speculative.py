"""MTP speculative greedy decoding gives exactly the tokens of plain greedy decoding, through
both the accept and the reject path, for MLA and for DSA (DeepSeek-V3.2: the drafts and their
verification select among the cached tokens)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax.config import DSAConfig
from dsjax.infer import Generator
from tests.model_fixtures import randomized_model, tiny_config

NEW_TOKENS = 24


def _make_repeat_drafter(model) -> None:
  """Turns the MTP module into "the token after next repeats the next one": eh_proj passes
  only the hidden-state half, the block adds nothing (zero output projections) and both norms
  have unit weights, so its logits are a positive multiple of the main model's at the same
  position. Its drafts are then accepted exactly where greedy output repeats a token."""
  module = model.mtp[0]
  d = model.config.hidden_size
  module.eh_proj[...] = jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)], axis=0)
  module.block.attn.wo[...] = jnp.zeros_like(module.block.attn.wo[...])
  module.block.ffn.w2[...] = jnp.zeros_like(module.block.ffn.w2[...])
  shared = module.block.ffn.shared_experts
  shared.w2[...] = jnp.zeros_like(shared.w2[...])
  for norm in (module.hnorm, module.norm):
    norm.weight[...] = jnp.ones_like(norm.weight[...])


ATTENTION = {"mla": {}, "dsa": dict(attention="dsa", dsa=DSAConfig(index_n_heads=8,
                                                                  index_head_dim=16,
                                                                  index_topk=6))}


@pytest.fixture(scope="module", params=list(ATTENTION))
def model(request):
  return randomized_model(tiny_config(num_mtp_layers=1, **ATTENTION[request.param]), seed=2)


@pytest.mark.parametrize("drafter", ["random", "repeat"])
def test_speculative_greedy_equals_greedy(model, drafter):
  if drafter == "repeat":
    model = nnx.clone(model)
    _make_repeat_drafter(model)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (4, 13, 9)]
  generator = Generator(model)
  plain = generator.generate(prompts, max_new_tokens=NEW_TOKENS)
  fast = generator.generate(prompts, max_new_tokens=NEW_TOKENS, speculative="mtp")
  assert fast.tokens == plain.tokens
  assert fast.drafts_proposed > 0
  print(f"{drafter}: acceptance {fast.acceptance_rate:.2f}, main-model calls "
        f"{fast.main_model_calls} vs {plain.main_model_calls}")
  if drafter == "repeat":
    repeats = sum(a == b for row in plain.tokens for a, b in zip(row, row[1:]))
    assert repeats > 0, "the test needs repeated tokens to exercise accepted drafts"
    assert 0 < fast.acceptance_rate < 1


def test_speculative_rows_stop_at_their_own_eos(model):
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (6, 3)]
  generator = Generator(model)
  free = generator.generate(prompts, max_new_tokens=12).tokens
  eos = free[1][5]
  stopped = generator.generate(prompts, max_new_tokens=12, eos_id=eos, speculative="mtp").tokens
  for row, tokens in zip(free, stopped):
    assert tokens == (row[:row.index(eos) + 1] if eos in row else row)
