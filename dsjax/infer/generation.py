"""Batched generation with MLA's latent KV cache or NSA's decode state: a jitted prefill and a
jitted decode step, both pure functions of (params, cache, tokens), driven by a short host loop.

Prompts of different lengths share one batch: they are right-padded, each row keeps its own
positions, and cache slot s holds the token at position s, so a row's next token attends to
exactly its own slots below its position. Shapes are bucketed (batch to a power of two, prompt
length to a power of two, cache length to a multiple of 128), so a new prompt compiles nothing
unless it lands in a new bucket.

The host loop dispatches step i+1 before it reads step i's tokens, so the accelerator never
waits for Python; end-of-sequence handling and streaming run one step behind on the host.

`speculative="mtp"` drafts one token per step with the model's MTP module and verifies it with
the main model in the same step (two tokens per decode call); a greedy run gives exactly the
tokens of plain greedy decoding, one or two per main-model call (see docs/inference.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.infer.cache import bytes_per_token_per_layer, cache_nbytes, pad_slots
from dsjax.infer.sampling import SamplingParams, greedy_tokens, sample_next
from dsjax.infer.weight_layout import (AUTO_MIN_ELEMENTS, out_major_projections,
                                       resolve_projection_layout)
from dsjax.model.kinds import attention_kind
from dsjax.model.stack import per_layer_cache, unstack_layers
from dsjax.model.transformer import DecodeCache, Transformer
from dsjax.ops.latent_attention import ATTN_IMPLS

SPECULATIVE = (None, "mtp")
_CACHE_SLOT_MULTIPLE = 128
_MIN_PROMPT_BUCKET = 16

OnTokens = Callable[[int, list[int]], None]


LAYOUTS = ("per_layer", "stacked")
GENERATOR_OPTIONS = ("attn_impl", "moe_impl", "layout", "projection_layout", "decode_chunk")
# Decode steps per compiled call (a loop on the device); tokens stream in blocks of this many.
# On the project's 2-core CPU the host's dispatch of a step took 0.7 ms of a core, and
# benchmarks/decode.py's step ran in 0.97 of the time of one step per call (docs/benchmarks.md).
DECODE_CHUNK = 8


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def prompt_bucket(length: int) -> int:
  """Padded prompt length: a power of two (at least 16)."""
  return max(_MIN_PROMPT_BUCKET, _next_power_of_two(length))


def _uniform_bytes_per_token(cache) -> float | None:
  """bytes_per_token_per_layer, or None for a model whose layer kinds cache different sizes."""
  try:
    return bytes_per_token_per_layer(cache)
  except ValueError:
    return None


def cache_bucket(slots: int) -> int:
  return -(-slots // _CACHE_SLOT_MULTIPLE) * _CACHE_SLOT_MULTIPLE


@dataclasses.dataclass
class GenerationResult:
  """Generated ids per prompt (ending at eos when it was produced) and run statistics.
  prefill_seconds and decode_seconds exclude compile_seconds, the time spent compiling the
  steps on first use of a shape bucket."""
  tokens: list[list[int]]
  prompt_tokens: int
  prefill_seconds: float
  decode_seconds: float
  cache_bytes: int
  compile_seconds: float = 0.0
  main_model_calls: int = 0
  drafts_proposed: int = 0
  drafts_accepted: int = 0
  # what one token adds to one layer's cache; None where the layers' kinds differ in it
  cache_bytes_per_token_layer: float | None = None

  @property
  def generated_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def prefill_tokens_per_second(self) -> float:
    return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

  @property
  def decode_tokens_per_second(self) -> float:
    """Tokens after each row's first (which prefill produces) per second of decoding."""
    decoded = sum(max(len(t) - 1, 0) for t in self.tokens)
    return decoded / max(self.decode_seconds, 1e-9)

  @property
  def acceptance_rate(self) -> float | None:
    """Accepted MTP drafts / proposed drafts (None without speculative decoding)."""
    if not self.drafts_proposed:
      return None
    return self.drafts_accepted / self.drafts_proposed


# ---- compiled steps (settings static: one compilation per shape bucket) ----

def _last_logits(model: Transformer, hidden, lengths) -> jax.Array:
  """Logits [B,V] of each row's last prompt position of hidden [B,T,D]; computing only these
  leaves the [B,T,V] logits of the other positions as dead code."""
  rows = jnp.arange(hidden.shape[0])
  return model.logits_from_hidden(hidden[rows, lengths - 1][:, None])[:, 0]


def _per_layer_cache(cache: DecodeCache) -> DecodeCache:
  """The layer stacks' caches (MLA's LatentCache, NSA's NSACache) as PerLayer buffers."""
  return cache._replace(layers={name: per_layer_cache(c) for name, c in cache.layers.items()})


def _prefill(graphdef, state, ids, lengths, key, *, slots: int, sampling: SamplingParams,
             moe_impl: str | None, draft: bool, layout: str = "stacked"):
  """Prompt ids [B,T] (right-padded to T, true lengths [B]) -> (first new token [B], MTP draft
  of the token after it [B] or None, DecodeCache with `slots` slots, in `layout`)."""
  model = nnx.merge(graphdef, state)
  out, cache = model.prefill(ids, moe_impl=moe_impl, lengths=lengths, slots=slots)
  if layout == "per_layer":
    cache = _per_layer_cache(cache)
  rows = jnp.arange(ids.shape[0])
  first = sample_next(_last_logits(model, out.hidden, lengths), key, sampling)
  if not draft:
    return first, None, cache
  # MTP input t pairs hidden state t with token t+1 (the first new token at the last prompt
  # position) and sits at position t+1, so its latent goes to cache slot t+1.
  next_ids = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1).at[rows, lengths - 1].set(first)
  positions = model.default_positions(ids) + 1
  mtp_hidden, mtp_latent = model.mtp_prefill(next_ids, out.hidden, positions, moe_impl)
  drafted = greedy_tokens(_last_logits(model, mtp_hidden, lengths))
  return first, drafted, cache._replace(mtp=pad_slots(mtp_latent, slots, offset=1))


def _decode_step(graphdef, state, cache, tokens, positions, key, step, *,
                 sampling: SamplingParams, attn_impl: str, moe_impl: str | None):
  """One token per row: tokens [B] at positions [B] -> (next tokens [B], updated cache),
  sampled with fold_in(key, step)."""
  model = nnx.merge(graphdef, state)
  logits, _, cache = model.decode(tokens[:, None], positions[:, None], cache, attn_impl,
                                  moe_impl)
  return sample_next(logits[:, 0], jax.random.fold_in(key, step), sampling), cache


def _decode_steps(graphdef, state, cache, tokens, positions, key, first_step, count, done,
                  eos_id, *, steps: int, sampling: SamplingParams, attn_impl: str,
                  moe_impl: str | None):
  """Up to `count` (traced, <= steps) decode steps in one call, a loop on the device that stops
  early once every row is done. From tokens [B] at positions [B]; step i samples with
  fold_in(key, first_step + i); done [B] marks rows that have ended (eos, or batch padding),
  and a row ends when it samples eos_id (int32, -1 for none).
  Returns (new tokens [steps,B] (rows from `ran` on zero), ran (steps taken), the last tokens
  [B], done [B], the updated cache)."""
  def more(carry):
    i, done = carry[0], carry[-1]
    return (i < count) & ~jnp.all(done)

  def one_step(carry):
    i, cache, tokens, block, done = carry
    tokens, cache = _decode_step(graphdef, state, cache, tokens, positions + i, key,
                                 first_step + i, sampling=sampling, attn_impl=attn_impl,
                                 moe_impl=moe_impl)
    return i + 1, cache, tokens, block.at[i].set(tokens), done | (tokens == eos_id)
  block = jnp.zeros((steps, tokens.shape[0]), jnp.int32)
  ran, cache, tokens, block, done = jax.lax.while_loop(
      more, one_step, (jnp.int32(0), cache, tokens, block, done))
  return block, ran, tokens, done, cache


def _speculative_step(graphdef, state, cache, pending, draft, positions, limits, *,
                      attn_impl: str, moe_impl: str | None):
  """Greedy verify-and-draft step. `pending` [B] is the last accepted token (at `positions`,
  not yet in the main cache), `draft` [B] the MTP guess for the token after it.

  The main model reads [pending, draft] and predicts the tokens after each; the draft is
  accepted when it equals the first prediction, which yields two tokens instead of one. The
  MTP module then reads (hidden state, following token) for both positions and drafts the
  token after the last accepted one. Cache entries written for a rejected draft sit at or
  after the row's next position and are overwritten before any query can see them.

  Returns (predicted [B,2], tokens gained [B] (1 or 2), next pending, next draft, next
  positions (capped at `limits`), cache)."""
  model = nnx.merge(graphdef, state)
  ids = jnp.stack([pending, draft], axis=1)
  pos = positions[:, None] + jnp.arange(2, dtype=positions.dtype)
  logits, hidden, cache = model.decode(ids, pos, cache, attn_impl, moe_impl)
  predicted = greedy_tokens(logits)
  accepted = draft == predicted[:, 0]
  mtp_logits, mtp_cache = model.mtp_decode(predicted, hidden, pos + 1, cache.mtp, attn_impl,
                                           moe_impl)
  drafted = greedy_tokens(mtp_logits)
  gained = 1 + accepted.astype(jnp.int32)
  pick = lambda a: jnp.where(accepted, a[:, 1], a[:, 0])
  return (predicted, gained, pick(predicted), pick(drafted),
          jnp.minimum(positions + gained, limits), cache._replace(mtp=mtp_cache))


class CompiledSteps(NamedTuple):
  """The jitted steps of one model structure (graphdef); their arguments start at `state`."""
  prefill: Callable
  decode: Callable
  speculative: Callable


@functools.lru_cache(maxsize=16)
def compiled_steps(graphdef) -> CompiledSteps:
  """Jitted steps with `graphdef` closed over rather than passed as a static argument, so
  that a decode call does not hash the whole graph definition; cached per structure, so
  every Generator of one model shares the compilations."""
  def jit(fn, static, donate=()):
    return jax.jit(functools.partial(fn, graphdef), static_argnames=static,
                   donate_argnames=donate)
  return CompiledSteps(
      jit(_prefill, ("slots", "sampling", "moe_impl", "draft", "layout")),
      jit(_decode_steps, ("steps", "sampling", "attn_impl", "moe_impl"), ("cache",)),
      jit(_speculative_step, ("attn_impl", "moe_impl"), ("cache",)))


# ---- host side ----

class _CompileClock:
  """Adds the duration of calls that compiled (a jitted function's cache grew) to `seconds`.
  Tracing and compiling happen inside the call; execution is dispatched asynchronously after
  it, so a compiling call's duration is its compile time."""

  def __init__(self):
    self.seconds = 0.0

  def call(self, fn, *args, **kwargs):
    size = fn._cache_size()  # pylint: disable=protected-access
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if fn._cache_size() != size:  # pylint: disable=protected-access
      self.seconds += time.perf_counter() - start
    return out


class _Outputs:
  """Per-row generated ids with budget, eos and streaming handling."""

  def __init__(self, rows: int, max_new_tokens: int, eos_id: int | None,
               on_tokens: OnTokens | None):
    self.tokens: list[list[int]] = [[] for _ in range(rows)]
    self.done = [False] * rows
    self.max_new_tokens, self.eos_id, self.on_tokens = max_new_tokens, eos_id, on_tokens

  def add(self, row: int, new: list[int]) -> None:
    if self.done[row]:
      return
    new = new[:self.max_new_tokens - len(self.tokens[row])]
    if self.eos_id is not None and self.eos_id in new:
      new = new[:new.index(self.eos_id) + 1]
      self.done[row] = True
    self.tokens[row].extend(new)
    if len(self.tokens[row]) >= self.max_new_tokens:
      self.done[row] = True
    if new and self.on_tokens is not None:
      self.on_tokens(row, new)

  @property
  def all_done(self) -> bool:
    return all(self.done)


class Generator:
  """Generation for one model. Holds the split model so that repeated calls reuse the
  compiled prefill and decode steps.

  attn_impl: "absorb" (latent-space attention, DeepSeek's decode) or "naive" (expanded K/V,
  the reference); MLA only, NSA models ignore it. moe_impl: MoE dispatch override (None: the
  config's).
  layout: "per_layer" (default) holds each layer's weights and cache in buffers of their
  own, so that a decode step reads them in place instead of slicing (and XLA copying) the
  [L,...] stacks; the Generator keeps its own copy of the stacked weights, and the steps run
  the layers unrolled. "stacked" uses the model's arrays as they are and scans the layers:
  for very deep models, where compiling an unrolled step takes long, or to save the copy.
  projection_layout: "auto" (default: "out_major" on CPU for weights of at least
  AUTO_MIN_ELEMENTS elements, "in_major" elsewhere), "out_major" (every projection weight) or
  "in_major": how the per-layer copy holds its projection weights (see
  dsjax.infer.weight_layout). The stacked layout uses the model's weights, in_major.
  decode_chunk: decode steps per compiled call (a loop on the device, which saves the host's
  dispatch of every step, and stops early once every row has ended); `on_tokens` then receives
  each row's tokens in blocks of up to this many. 1: one call and one streamed token per step.
  Speculative decoding calls once per step whatever this is."""

  def __init__(self, model: Transformer, *, attn_impl: str = "absorb",
               moe_impl: str | None = None, layout: str = "per_layer",
               projection_layout: str = "auto", decode_chunk: int = DECODE_CHUNK):
    if attn_impl not in ATTN_IMPLS:
      raise ValueError(f"attn_impl={attn_impl!r}; use one of {ATTN_IMPLS}.")
    if isinstance(decode_chunk, bool) or not isinstance(decode_chunk, int) or decode_chunk < 1:
      raise ValueError(f"decode_chunk={decode_chunk!r} must be an integer >= 1 (decode steps "
                       "per compiled call; 1 streams every token as it is produced).")
    if layout not in LAYOUTS:
      raise ValueError(f"layout={layout!r}; use one of {LAYOUTS}.")
    self.config = model.config
    self.graphdef, self.state = nnx.split(model)
    resolved = resolve_projection_layout(projection_layout, layout)
    if layout == "per_layer":
      self.state = unstack_layers(self.state)
      if resolved == "out_major":
        min_elements = AUTO_MIN_ELEMENTS if projection_layout == "auto" else 0
        self.state = out_major_projections(model, self.state, min_elements)
    self.layout = layout
    self.steps = compiled_steps(self.graphdef)
    self.attn_impl, self.moe_impl, self.decode_chunk = attn_impl, moe_impl, decode_chunk
    self.has_mtp = len(model.mtp) > 0

  def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    speculative: str | None, sampling: SamplingParams) -> None:
    """Raises ValueError (saying what to change) for a request this model cannot serve."""
    cfg = self.config
    if speculative not in SPECULATIVE:
      raise ValueError(f"speculative={speculative!r}; use one of {SPECULATIVE}.")
    if speculative == "mtp" and not self.has_mtp:
      raise ValueError("speculative='mtp' needs an MTP module, but this model has "
                       "num_mtp_layers=0; turn speculative decoding off.")
    mtp_attention = cfg.mtp_spec.attention
    if speculative == "mtp" and not attention_kind(mtp_attention).drafts_with_mtp:
      raise ValueError(f"speculative='mtp' is not supported for attention={mtp_attention!r}: "
                       f"the MTP module's {mtp_attention.upper()} layer has no decode state for "
                       "MTP drafting; turn speculative decoding off.")
    if speculative == "mtp" and not sampling.greedy:
      raise ValueError("speculative='mtp' decodes greedily; set temperature=0 or turn "
                       "speculative decoding off.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
    if isinstance(prompts, (str, bytes)) or not len(prompts):
      raise ValueError("prompts must be a non-empty list of token-id lists.")
    for i, prompt in enumerate(prompts):
      if isinstance(prompt, (str, bytes)) or not len(prompt):
        raise ValueError(f"Prompt {i} is empty (or not a list of token ids); every prompt "
                         "needs at least one token.")
      ids = np.asarray(prompt)
      if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"Prompt {i} holds token ids outside [0, {cfg.vocab_size}) "
                         f"(vocab_size of this model); check the tokenizer.")
      if len(prompt) + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"Prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's max_position_embeddings={cfg.max_position_embeddings}. "
            "Shorten the prompt or lower max_new_tokens.")

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int = 0, eos_id: int | None = None, speculative: str | None = None,
               on_tokens: OnTokens | None = None) -> GenerationResult:
    """Continues each prompt (a list of token ids) by up to `max_new_tokens` ids, stopping a
    row at `eos_id` (included in its output). `on_tokens(row, ids)` streams ids as they are
    produced. Sampling draws from jax.random.key(seed); temperature 0 is greedy."""
    sampling = SamplingParams(float(temperature), top_k, top_p)
    self.check_request(prompts, max_new_tokens, speculative, sampling)
    rows = len(prompts)
    batch = _next_power_of_two(rows)
    lengths = np.ones(batch, np.int32)
    lengths[:rows] = [len(p) for p in prompts]
    padded_len = prompt_bucket(int(lengths.max()))
    ids = np.zeros((batch, padded_len), np.int32)
    for i, prompt in enumerate(prompts):
      ids[i, :len(prompt)] = prompt
    # Slots: the prompt bucket, and every row's prompt plus its new tokens (the last new token
    # is never written: one slot to spare). Speculative decoding: one more for the prompt
    # bucket (MTP slots start at 1) and the two a speculative step may write past the end.
    mtp = speculative == "mtp"
    slots = cache_bucket(max(padded_len + (1 if mtp else 0),
                             int(lengths.max()) + max_new_tokens + (2 if mtp else 0)))
    key = jax.random.key(seed)
    outputs = _Outputs(rows, max_new_tokens, eos_id, on_tokens)

    clock = _CompileClock()
    start = time.perf_counter()
    first, draft, cache = clock.call(
        self.steps.prefill, self.state, ids, lengths, jax.random.fold_in(key, 0),
        slots=slots, sampling=sampling, moe_impl=self.moe_impl, draft=speculative == "mtp",
        layout=self.layout)
    first_np = np.asarray(first)
    prefill_seconds = time.perf_counter() - start - clock.seconds
    for row in range(rows):
      outputs.add(row, [int(first_np[row])])
    cache_bytes, per_token = cache_nbytes(cache), _uniform_bytes_per_token(cache)

    start, compiled = time.perf_counter(), clock.seconds
    if speculative == "mtp":
      stats = self._speculative_loop(clock, cache, first, draft, lengths, max_new_tokens,
                                     outputs)
    else:
      stats = self._decode_loop(clock, cache, first, lengths, key, sampling, outputs)
    decode_seconds = time.perf_counter() - start - (clock.seconds - compiled)
    return GenerationResult(outputs.tokens, int(lengths[:rows].sum()), prefill_seconds,
                            decode_seconds, cache_bytes, clock.seconds, **stats,
                            cache_bytes_per_token_layer=per_token)

  def _decode_loop(self, clock: _CompileClock, cache, tokens, lengths, key, sampling,
                   outputs: _Outputs) -> dict:
    """Calls of up to decode_chunk steps until every row is done; each call is dispatched
    before the previous one's tokens are read (a call after every row ended takes no step)."""
    done = np.arange(len(lengths)) >= len(outputs.tokens)  # batch padding rows have ended
    done[:len(outputs.tokens)] = outputs.done
    eos = np.int32(-1 if outputs.eos_id is None else outputs.eos_id)
    pending = None  # the previous call's (tokens, steps taken)
    step = taken = 0
    while not outputs.all_done and step < outputs.max_new_tokens - 1:
      count = min(self.decode_chunk, outputs.max_new_tokens - 1 - step)
      block, ran, tokens, done, cache = clock.call(
          self.steps.decode, self.state, cache, tokens, lengths + step, key, np.int32(step + 1),
          np.int32(count), done, eos, steps=self.decode_chunk, sampling=sampling,
          attn_impl=self.attn_impl, moe_impl=self.moe_impl)
      step += count
      if pending is not None:
        taken += self._add_block(outputs, *pending)
      pending = block, ran
    if pending is not None:
      taken += self._add_block(outputs, *pending)
    return {"main_model_calls": taken + 1}

  @classmethod
  def _add_block(cls, outputs: _Outputs, block, ran) -> int:
    """Adds the `ran` steps' tokens of a decode call's block [steps,B]; returns `ran`."""
    ran = int(ran)
    block = np.asarray(block)[:ran]
    cls._add_rows(outputs, lambda row: block[:, row].tolist())
    return ran

  def _speculative_loop(self, clock: _CompileClock, cache, pending, draft, lengths,
                        max_new_tokens, outputs: _Outputs) -> dict:
    positions = jnp.asarray(lengths)
    limits = jnp.asarray(lengths + max_new_tokens)
    previous = None
    calls = proposed = accepted = 0
    while not outputs.all_done:
      predicted, gained, pending, draft, positions, cache = clock.call(
          self.steps.speculative, self.state, cache, pending, draft, positions,
          limits, attn_impl=self.attn_impl, moe_impl=self.moe_impl)
      calls += 1
      if previous is not None:
        proposed, accepted = self._add_speculated(outputs, previous, proposed, accepted)
      previous = (predicted, gained)
      if calls >= max_new_tokens - 1:
        break
    if previous is not None:
      proposed, accepted = self._add_speculated(outputs, previous, proposed, accepted)
    return {"main_model_calls": calls + 1, "drafts_proposed": proposed,
            "drafts_accepted": accepted}

  @staticmethod
  def _add_speculated(outputs: _Outputs, step, proposed: int, accepted: int):
    predicted, gained = (np.asarray(a) for a in step)
    for row in range(len(outputs.tokens)):
      if not outputs.done[row]:
        proposed += 1
        accepted += int(gained[row]) - 1
        outputs.add(row, [int(t) for t in predicted[row, :gained[row]]])
    return proposed, accepted

  @staticmethod
  def _add_rows(outputs: _Outputs, row_tokens) -> None:
    for row in range(len(outputs.tokens)):
      outputs.add(row, row_tokens(row))


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, **options) -> list[list[int]]:
  """Generated token ids for each prompt (a list of token-id lists); see Generator.generate.
  `options`: attn_impl, moe_impl, layout, projection_layout (Generator) and speculative,
  on_tokens (Generator.generate)."""
  generator = Generator(model, **{k: options.pop(k) for k in GENERATOR_OPTIONS if k in options})
  return generator.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                            **options).tokens
