"""dsjax.generate against transformers' greedy `generate` on random tiny DeepseekV3/V2
checkpoints (ragged prompts in one dsjax batch), eos handling, seeded sampling, bad requests."""

import numpy as np
import pytest
import torch

import dsjax
from dsjax.infer import Generator
from tests import hf_fixtures as hf

NEW_TOKENS = 32
PROMPT_LENGTHS = (7, 19, 12)  # ragged; + 32 new tokens stay within max_position_embeddings=64


def _prompts(vocab: int, seed: int = 5) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _transformers_greedy(model, prompt: list[int]) -> list[int]:
  """transformers' eager greedy generate, one unpadded prompt at a time, no eos."""
  model.generation_config.eos_token_id = None
  ids = torch.tensor([prompt])
  with torch.no_grad():  # an explicit mask: generate would otherwise mask pad-id tokens
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["v3", "v2"])
def checkpoint(request, tmp_path_factory):
  config = hf.v3_config() if request.param == "v3" else hf.v2_config(q_lora_rank=None)
  torch_model = hf.build_torch_model(config, seed=0)
  path = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(path)
  return torch_model, dsjax.load_hf_checkpoint(path)


# Input-major per-layer weights (what "auto" gives these tiny models) give the output-major
# tokens (tests/infer/test_weight_layout.py).
@pytest.mark.parametrize("layout,projection_layout", [("per_layer", "out_major"),
                                                      ("stacked", "auto")])
def test_greedy_matches_transformers_generate(checkpoint, layout, projection_layout):
  torch_model, model = checkpoint
  prompts = _prompts(model.config.vocab_size)
  expected = [_transformers_greedy(torch_model, p) for p in prompts]
  got = dsjax.generate(model, prompts, max_new_tokens=NEW_TOKENS, layout=layout,
                       projection_layout=projection_layout)
  assert [len(t) for t in got] == [NEW_TOKENS] * len(prompts)
  for row, (a, b) in enumerate(zip(got, expected)):
    assert a == b, f"row {row} (prompt length {len(prompts[row])}): {a} vs {b}"


def test_eos_ends_each_row_independently(checkpoint):
  _, model = checkpoint
  prompts = _prompts(model.config.vocab_size)
  generator = Generator(model)
  free = generator.generate(prompts, max_new_tokens=12).tokens
  eos = free[0][4]  # a token row 0 produces mid-way
  stopped = generator.generate(prompts, max_new_tokens=12, eos_id=eos).tokens
  for row, tokens in zip(free, stopped):
    end = row.index(eos) + 1 if eos in row else len(row)
    assert tokens == row[:end]
  assert len(stopped[0]) <= 5


def test_sampling_is_seeded(checkpoint):
  _, model = checkpoint
  prompts = _prompts(model.config.vocab_size)[:2]
  generator = Generator(model)
  settings = dict(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.9)
  a = generator.generate(prompts, seed=1, **settings).tokens
  b = generator.generate(prompts, seed=1, **settings).tokens
  c = generator.generate(prompts, seed=2, **settings).tokens
  assert a == b and a != c


def test_decode_chunk_changes_neither_tokens_nor_stream(checkpoint):
  """1, 3 or 8 decode steps per compiled call: the same greedy tokens with an eos that ends a
  row inside a block, the same seeded samples, and on_tokens streams each row's tokens in
  order (10 decode steps: blocks of 3+3+3+1 and 8+2)."""
  _, model = checkpoint
  prompts = _prompts(model.config.vocab_size)
  free = Generator(model, decode_chunk=1).generate(prompts, max_new_tokens=11).tokens
  for settings in (dict(eos_id=free[1][5]), dict(temperature=1.0, top_k=40, seed=3)):
    results = []
    for chunk in (1, 3, 8):
      streamed = [[] for _ in prompts]
      out = Generator(model, decode_chunk=chunk).generate(
          prompts, max_new_tokens=11, on_tokens=lambda row, ids: streamed[row].extend(ids),
          **settings)
      assert streamed == out.tokens, chunk
      results.append(out.tokens)
    assert results[0] == results[1] == results[2], settings
  assert len(results[0][1]) == 11 and len(free[1]) == 11


def test_decoding_stops_at_eos_inside_a_block(checkpoint):
  """A row that samples eos ends the device loop there: the main model runs once per token
  produced (prefill included), not to the end of the 16-step block."""
  _, model = checkpoint
  prompt = _prompts(model.config.vocab_size)[:1]
  generator = Generator(model, decode_chunk=16)
  free = generator.generate(prompt, max_new_tokens=30).tokens[0]
  eos = free[3]
  stopped = generator.generate(prompt, max_new_tokens=30, eos_id=eos)
  assert stopped.tokens[0] == free[:free.index(eos) + 1]
  assert stopped.main_model_calls == len(stopped.tokens[0]) < 16


@pytest.mark.parametrize("chunk", [0, 2.5, True])
def test_bad_decode_chunk_says_what_to_change(checkpoint, chunk):
  _, model = checkpoint
  with pytest.raises(ValueError, match=f"decode_chunk={chunk!r} must be an integer >= 1"):
    Generator(model, decode_chunk=chunk)


@pytest.mark.parametrize("request_args,message", [
    (dict(prompts=[[1, 2], []]), "Prompt 1 is empty"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 96]]), "outside [0, 96)"),
    (dict(prompts=[list(range(60))], max_new_tokens=5), "max_position_embeddings=64"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
    (dict(temperature=1.0, top_k=0), "top_k=0"),
    (dict(speculative="medusa"), "speculative='medusa'"),
    (dict(speculative="mtp"), "num_mtp_layers=0"),
])
def test_bad_requests_say_what_to_change(checkpoint, request_args, message):
  _, model = checkpoint
  args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | request_args
  with pytest.raises(ValueError) as error:
    Generator(model).generate(**args)
  assert message in str(error.value)


def test_unknown_layout_says_what_to_change(checkpoint):
  _, model = checkpoint
  with pytest.raises(ValueError, match="layout='rows'; use one of"):
    Generator(model, layout="rows")


def test_unknown_or_unusable_projection_layout_says_what_to_change(checkpoint):
  _, model = checkpoint
  with pytest.raises(ValueError, match="projection_layout='rows'; use one of"):
    Generator(model, projection_layout="rows")
  with pytest.raises(ValueError, match="needs layout='per_layer'"):
    Generator(model, layout="stacked", projection_layout="out_major")
