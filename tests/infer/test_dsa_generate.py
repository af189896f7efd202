"""DeepSeek-V3.2 (DSA) decoding against transformers: greedy dsjax.generate on ragged prompts
equals transformers' greedy generate (32 new tokens; prompts and continuations longer than
index_topk, so every step selects among the cached tokens), with both cache layouts."""

import pytest

import dsjax
from tests import hf_fixtures as hf
from tests.infer.test_generate import NEW_TOKENS, _prompts, _transformers_greedy

PROMPT_LENGTHS = (7, 19, 12)  # below and above index_topk = 12; + 32 new tokens <= 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch_model = hf.build_torch_model(hf.v32_config(), seed=0)
  path = tmp_path_factory.mktemp("v32")
  torch_model.save_pretrained(path)
  return torch_model, dsjax.load_hf_checkpoint(path)


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_greedy_matches_transformers_generate(checkpoint, layout):
  torch_model, model = checkpoint
  prompts = _prompts(model.config.vocab_size)
  assert tuple(map(len, prompts)) == PROMPT_LENGTHS
  expected = [_transformers_greedy(torch_model, p) for p in prompts]
  got = dsjax.generate(model, prompts, max_new_tokens=NEW_TOKENS, layout=layout)
  for row, (a, b) in enumerate(zip(got, expected)):
    assert a == b, f"row {row} (prompt length {len(prompts[row])}): {a} vs {b}"
