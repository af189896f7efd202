"""Generate text with a dsjax model.

  python infer.py --checkpoint=runs/tiny --prompt="The "          # a train.py workdir
  python infer.py --checkpoint=DeepSeek-V2-Lite-Chat --prompt="Hi" --temperature=0.7 --top_p=0.95
  python infer.py --checkpoint=DIR --prompts_file=in.jsonl --output=out.jsonl

--checkpoint is a train.py workdir (its latest checkpoint, or --step) or a HuggingFace DeepSeek
directory. A single --prompt streams its completion to stdout; --prompts_file (JSONL, one
{"prompt": ...} per line) runs as one batch and writes {"prompt", "completion", "tokens"} lines.
Decoding is greedy by default. Statistics go to stderr; bad input stops with one `error:` line.
Under a multi-host launch (--distributed, or --coordinator_address --num_processes --process_id,
as train.py) every process generates the same tokens with its own copy of the model on its
first local device, and process 0 alone writes the output.
"""

import contextlib
import os
import sys

from absl import app, flags, logging

from dsjax.parallel import launch_flags

flags.DEFINE_string("checkpoint", None, "train.py workdir or HuggingFace DeepSeek directory.")
flags.DEFINE_string("prompt", None, "One prompt; its completion is streamed to stdout.")
flags.DEFINE_string("prompts_file", None, 'JSONL file of {"prompt": "..."} lines, run as a batch.')
flags.DEFINE_string("output", None, "Where --prompts_file results go (JSONL); default stdout.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 decodes greedily; e.g. 0.7 (with --top_p=0.95) samples.")
flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (default: all).")
flags.DEFINE_float("top_p", None, "Nucleus sampling: keep tokens holding this much probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("speculative", False, "MTP speculative decoding (greedy; needs an MTP module).")
flags.DEFINE_enum("attn_impl", "absorb", ["absorb", "naive"], "Decode attention implementation.")
flags.DEFINE_enum("layout", "per_layer", ["per_layer", "stacked"],
                  "Weights and cache per layer (fastest decoding) or stacked [L,...] with the "
                  "layers scanned (faster compilation for very deep models, no weight copy).")
flags.DEFINE_integer("decode_chunk", None, "Decode steps per compiled call (tokens stream in "
                     "blocks of this many; default: dsjax.infer.generation.DECODE_CHUNK); 1 "
                     "streams each token as it is produced.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                  "Dtype of a HuggingFace checkpoint's weights and compute (auto: its "
                  "config.json torch_dtype).")
flags.DEFINE_integer("step", None, "Checkpoint step of a train.py workdir (default: latest).")
flags.DEFINE_string("tokenizer", None, "Tokenizer override: 'byte', a tokenizer.json or its dir.")
flags.DEFINE_enum("chat_template", "auto", ["auto", "on", "off"],
                  "Chat template of the tokenizer: auto (apply when present), on, off.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of errors.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs (Orbax).")
# Multi-host runs; every process runs the same command.
launch_flags.define()
FLAGS = flags.FLAGS


def _check_flags() -> None:
  if (FLAGS.prompt is None) == (FLAGS.prompts_file is None):
    raise ValueError("Pass exactly one of --prompt and --prompts_file.")
  if FLAGS.prompt is not None and not FLAGS.prompt:
    raise ValueError("--prompt is empty; give the text to continue.")
  if FLAGS.checkpoint is None:
    raise ValueError("--checkpoint is required: a train.py workdir or a HuggingFace directory.")
  if FLAGS.output is not None and FLAGS.prompts_file is None:
    raise ValueError("--output goes with --prompts_file; --prompt streams to stdout.")
  if FLAGS.output and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output))):
    raise FileNotFoundError(f"The directory of --output={FLAGS.output} does not exist.")


def run() -> None:
  _check_flags()
  # Imported here so that --help is fast; bad input fails before any weights are read.
  from dsjax.infer import Generator, SamplingParams, cli_io
  from dsjax.infer.load import load_for_inference
  from dsjax.parallel import distributed
  launch_flags.initialize(FLAGS)
  primary = distributed.is_primary()
  prompts = ([FLAGS.prompt] if FLAGS.prompt is not None
             else cli_io.read_prompts_file(FLAGS.prompts_file))
  SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)  # raises on invalid values
  speculative = "mtp" if FLAGS.speculative else None
  if speculative and FLAGS.temperature > 0:
    raise ValueError("--speculative decodes greedily; set --temperature=0 or drop --speculative.")
  model, tokenizer, eos_id, template, description = distributed.agree(
      "load", load_for_inference, FLAGS.checkpoint, FLAGS.step, FLAGS.tokenizer, FLAGS.dtype)
  template = cli_io.choose_template(template, FLAGS.chat_template)
  ids = [cli_io.encode_prompt(tokenizer, p, template) for p in prompts]
  stream = cli_io.TextStream(tokenizer, eos_id) if FLAGS.prompt is not None and primary else None
  on_tokens = (lambda row, new: stream.add(new)) if stream is not None else None
  chunk = {} if FLAGS.decode_chunk is None else {"decode_chunk": FLAGS.decode_chunk}
  generator = Generator(model, attn_impl=FLAGS.attn_impl, layout=FLAGS.layout, **chunk)
  del model  # the per-layer layout holds its own copy of the layer weights
  result = generator.generate(
      ids, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed,
      eos_id, speculative, on_tokens=on_tokens)
  if not primary:
    return
  if stream is not None:
    stream.finish()
  else:
    texts = [cli_io.completion_text(tokenizer, t, eos_id) for t in result.tokens]
    with (open(FLAGS.output, "w", encoding="utf-8") if FLAGS.output
          else contextlib.nullcontext(sys.stdout)) as out:
      cli_io.write_jsonl(out, prompts, texts, result.tokens)
  print("\n".join(cli_io.stats_lines(result, description)), file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; prompts go in --prompt.")
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  from dsjax.parallel import distributed
  try:
    run()
  except distributed.USER_ERRORS as error:
    if FLAGS.traceback:
      raise
    print(f"error: {error}", file=sys.stderr)
    distributed.exit_process(1)


if __name__ == "__main__":
  app.run(main)
