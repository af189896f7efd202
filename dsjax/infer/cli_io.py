"""Text in and out of `infer.py`: prompts files, chat templates, prompt encoding, streamed
decoding and the statistics lines. Nothing here imports JAX."""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Sequence

CHAT_TEMPLATE_MODES = ("auto", "on", "off")
_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


def read_prompts_file(path: str) -> list[str]:
  """The "prompt" strings of a JSONL file (one JSON object per non-blank line)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts_file={path} does not exist; pass a JSONL file with one "
                            '{"prompt": "..."} object per line.')
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number} is not valid JSON ({e.msg}); write one "
                         '{"prompt": "..."} object per line.') from e
      prompt = record.get("prompt") if isinstance(record, dict) else None
      if not isinstance(prompt, str):
        raise ValueError(f'{path} line {number} has no "prompt" string field; write one '
                         '{"prompt": "..."} object per line.')
      if not prompt:
        raise ValueError(f"{path} line {number}: the prompt is empty; every prompt needs text.")
      prompts.append(prompt)
  if not prompts:
    raise ValueError(f"{path} holds no prompts; write one {{\"prompt\": \"...\"}} object per "
                     "line.")
  return prompts


class ChatTemplate:
  """A HuggingFace chat template (Jinja), rendered in a sandbox as transformers does."""

  def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
    self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
    self._template = None

  def _compiled(self):
    if self._template is None:
      import datetime  # pylint: disable=import-outside-toplevel

      import jinja2  # pylint: disable=import-outside-toplevel
      from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

      def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

      env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                  extensions=["jinja2.ext.loopcontrols"])
      env.globals["raise_exception"] = raise_exception
      env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
      try:
        self._template = env.from_string(self.source)
      except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"The chat template does not parse ({e}); fix it in "
                         "tokenizer_config.json or pass --chat_template=off.") from e
    return self._template

  def render(self, prompt: str) -> str:
    """The text of a one-turn conversation with the user's `prompt`, ready for the reply."""
    import jinja2  # pylint: disable=import-outside-toplevel
    template = self._compiled()
    try:
      return template.render(messages=[{"role": "user", "content": prompt}],
                             add_generation_prompt=True, bos_token=self.bos_token,
                             eos_token=self.eos_token)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"The chat template failed on this prompt ({e}); pass "
                       "--chat_template=off to send the prompt as plain text.") from e


def choose_template(template: ChatTemplate | None, mode: str) -> ChatTemplate | None:
  """The template to apply under --chat_template=`mode` (auto|on|off)."""
  if mode not in CHAT_TEMPLATE_MODES:
    raise ValueError(f"--chat_template={mode!r}; use one of {', '.join(CHAT_TEMPLATE_MODES)}.")
  if mode == "on" and template is None:
    raise ValueError("--chat_template=on but this checkpoint has no chat template "
                     "(tokenizer_config.json 'chat_template' or chat_template.jinja); use "
                     "--chat_template=auto or off.")
  return None if mode == "off" else template


def encode_prompt(tokenizer, prompt: str, template: ChatTemplate | None) -> list[int]:
  """Token ids of `prompt`: through the chat template when given (it writes its own bos),
  else the plain text after the tokenizer's bos token when it has one (as training saw
  documents)."""
  if template is not None:
    return list(tokenizer.encode(template.render(prompt)))
  ids = list(tokenizer.encode(prompt))
  bos = getattr(tokenizer, "bos_id", None)
  return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def completion_text(tokenizer, ids: Sequence[int], eos_id: int | None) -> str:
  """The text of generated `ids`, without the end-of-sequence token that stopped them."""
  if eos_id is not None and ids and ids[-1] == eos_id:
    ids = ids[:-1]
  return tokenizer.decode(list(ids))


class TextStream:
  """Prints one row's text as its tokens arrive. Each update decodes the whole sequence and
  writes the new suffix, holding back a trailing incomplete character (a byte-level token
  can end in the middle of a UTF-8 sequence) until a later token completes it."""

  def __init__(self, tokenizer, eos_id: int | None, out: IO[str] = sys.stdout):
    self.tokenizer, self.eos_id, self.out = tokenizer, eos_id, out
    self.ids: list[int] = []
    self.printed = 0

  def add(self, new_ids: Sequence[int]) -> None:
    self.ids.extend(int(i) for i in new_ids)
    self._write(completion_text(self.tokenizer, self.ids, self.eos_id).rstrip(_REPLACEMENT))

  def finish(self) -> None:
    self._write(completion_text(self.tokenizer, self.ids, self.eos_id))
    self.out.write("\n")
    self.out.flush()

  def _write(self, text: str) -> None:
    if len(text) > self.printed:
      self.out.write(text[self.printed:])
      self.out.flush()
      self.printed = len(text)


def write_jsonl(out: IO[str], prompts: Sequence[str], texts: Sequence[str],
                tokens: Sequence[Sequence[int]]) -> None:
  for prompt, text, ids in zip(prompts, texts, tokens):
    out.write(json.dumps({"prompt": prompt, "completion": text, "tokens": list(ids)},
                         ensure_ascii=False) + "\n")
  out.flush()


def stats_lines(result: Any, description: str) -> list[str]:
  """Human-readable run statistics of a GenerationResult."""
  lines = [
      f"checkpoint: {description}",
      f"prompt tokens: {result.prompt_tokens}, prefill: "
      f"{result.prefill_tokens_per_second:,.1f} tokens/s ({result.prefill_seconds:.2f} s)",
      f"generated tokens: {result.generated_tokens}, decode: "
      f"{result.decode_tokens_per_second:,.1f} tokens/s ({result.decode_seconds:.2f} s)",
      f"compilation: {result.compile_seconds:.1f} s",
      f"cache: {result.cache_bytes:,} bytes",
  ]
  if result.cache_bytes_per_token_layer is not None:
    lines[-1] += f" ({result.cache_bytes_per_token_layer:,.0f} per token per layer)"
  if result.acceptance_rate is not None:
    lines.append(f"MTP acceptance rate: {result.acceptance_rate:.2f} "
                 f"({result.drafts_accepted}/{result.drafts_proposed} drafts, "
                 f"{result.main_model_calls} main-model calls)")
  return lines
