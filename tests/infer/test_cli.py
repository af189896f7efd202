"""infer.py end to end: bad input stops with one `error:` line; a HuggingFace checkpoint's
greedy JSONL output equals dsjax.generate in-process (eos from config.json included); a train.py
workdir is restored (params and router biases) and streams its completion. Plus the pieces
without a subprocess: loader errors, prompts files, chat templates, UTF-8-safe streaming.

One random model serves both checkpoint kinds. The workdir is written in-process with
train.py's own TrainCheckpointer and experiment.json format (running train.py would spend
~25 s compiling a train step); runs/ from `python train.py` is the end-to-end manual check."""

import concurrent.futures
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

import dsjax
from dsjax.data.tokenizer import ByteTokenizer
from dsjax.experiment import experiment_config
from dsjax.infer import cli_io
from dsjax.infer.load import EXPERIMENT_FILE, load_for_inference
from dsjax.train.checkpointing import TrainCheckpointer
from dsjax.train.optimizer import make_optimizer
from dsjax.train.state import split_model
from dsjax.train.step import TrainState
from tests.model_fixtures import randomized_model, tiny_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {"XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
PROMPTS = ["w3 w14 w15 w92 w65", "w35 w89 w79 w32 w38 w46 w26 w43 w38 w32 w7 w95", "w200"]
NEW_TOKENS = 12
STEP = 3


def run_infer(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], capture_output=True,
                        text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=300)


@pytest.fixture(scope="module")
def model():
  """A random tiny DeepSeek-V3 (MoE, MTP module, random router biases) with a byte-sized
  vocabulary, so that it fits both a word tokenizer and train.py's byte tokenizer."""
  return randomized_model(tiny_config(vocab_size=256))


def _word_tokenizer(path: Path, size: int) -> None:
  """A whitespace word-level tokenizer "w0".."w{size-1}" (no special tokens)."""
  tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_checkpoint(model, tmp_path_factory):
  """(directory, eos id, expected greedy tokens per PROMPTS row): `model` in HF format with a
  word tokenizer; config.json's eos is a token that row 0 produces mid-way, so the CLI must
  stop that row there."""
  path = tmp_path_factory.mktemp("hf")
  dsjax.save_hf_checkpoint(model, path)
  _word_tokenizer(path, model.config.vocab_size)
  ids = [[int(w[1:]) for w in p.split()] for p in PROMPTS]
  free = dsjax.generate(model, ids, max_new_tokens=NEW_TOKENS)
  eos = free[0][5]
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
  expected = [row[:row.index(eos) + 1] if eos in row else row for row in free]
  return path, eos, expected


@pytest.fixture(scope="module")
def workdir(model, tmp_path_factory):
  """A train.py workdir (experiment.json + checkpoints/<STEP>/state) holding `model`."""
  path = tmp_path_factory.mktemp("run")
  cfg = experiment_config(model.config.to_dict(), data={"tokenizer": "byte"})
  _, params, router_bias = split_model(model)
  optimizer = make_optimizer(cfg.optimizer, cfg.train.steps, params)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero + STEP, params=params, router_bias=router_bias,
                     opt_state=optimizer.init(params), rng=jax.random.key(0), bad_steps=zero,
                     skipped=zero)
  with TrainCheckpointer(path / "checkpoints") as checkpointer:
    checkpointer.save(STEP, state, {})
  (path / EXPERIMENT_FILE).write_text(cfg.to_json(indent=2) + "\n")
  return path


def _bad_cases(tmp: Path, hf: Path) -> dict[str, tuple[list[str], str]]:
  """{case: (infer.py arguments, text the error line must contain)}."""
  (tmp / "not_a_checkpoint").mkdir()
  (tmp / "not_a_checkpoint" / "notes.txt").write_text("hello")
  (tmp / "bad.jsonl").write_text('{"prompt": "w1"}\n\n{"prompt": "w2",\n')
  ok = ["--prompt=w1 w2"]
  return {
      "missing checkpoint": ([f"--checkpoint={tmp / 'nope'}", *ok], "does not exist"),
      "not a checkpoint": ([f"--checkpoint={tmp / 'not_a_checkpoint'}", *ok], "experiment.json"),
      "prompt too long": ([f"--checkpoint={hf}", "--prompt=" + "w1 " * 60],
                          "max_position_embeddings=64"),
      "empty prompt": ([f"--checkpoint={hf}", "--prompt="], "--prompt is empty"),
      "temperature": ([f"--checkpoint={hf}", *ok, "--temperature=-1"], "temperature=-1"),
      "top_p": ([f"--checkpoint={hf}", *ok, "--temperature=1", "--top_p=1.5"], "top_p=1.5"),
      "top_k": ([f"--checkpoint={hf}", *ok, "--temperature=1", "--top_k=0"], "top_k=0"),
      "speculative sampling": ([f"--checkpoint={hf}", *ok, "--speculative", "--temperature=1"],
                               "--temperature=0"),
      "both prompt flags": ([f"--checkpoint={hf}", *ok, f"--prompts_file={tmp / 'bad.jsonl'}"],
                            "exactly one"),
      "no prompt flag": ([f"--checkpoint={hf}"], "exactly one"),
      "bad JSON line": ([f"--checkpoint={hf}", f"--prompts_file={tmp / 'bad.jsonl'}"], "line 3"),
      "decode chunk": ([f"--checkpoint={hf}", *ok, "--decode_chunk=0"], "decode_chunk=0"),
  }


@pytest.fixture(scope="module")
def bad_runs(hf_checkpoint, tmp_path_factory):
  """{case: (needle, CompletedProcess)}, two infer.py processes at a time (each is mostly
  single-threaded Python imports)."""
  cases = _bad_cases(tmp_path_factory.mktemp("bad"), hf_checkpoint[0])
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {case: pool.submit(run_infer, *args) for case, (args, _) in cases.items()}
    return {case: (cases[case][1], f.result()) for case, f in futures.items()}


CASES = ["missing checkpoint", "not a checkpoint", "prompt too long", "empty prompt",
         "temperature", "top_p", "top_k", "speculative sampling", "both prompt flags",
         "no prompt flag", "bad JSON line", "decode chunk"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(case, bad_runs):
  needle, result = bad_runs[case]
  assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
  assert result.stdout == ""
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_hf_checkpoint_jsonl_equals_generate_in_process(hf_checkpoint, tmp_path):
  path, eos, expected = hf_checkpoint
  prompts_file, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  result = run_infer(f"--checkpoint={path}", f"--prompts_file={prompts_file}",
                     f"--output={output}", f"--max_new_tokens={NEW_TOKENS}")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(l) for l in output.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == PROMPTS
  assert [r["tokens"] for r in rows] == expected
  assert rows[0]["tokens"][-1] == eos and len(rows[0]["tokens"]) <= 6  # stopped at eos
  for row in rows:  # the completion is the tokens' text without the final eos
    ids = row["tokens"][:-1] if row["tokens"][-1] == eos else row["tokens"]
    assert row["completion"] == " ".join(f"w{i}" for i in ids)
  assert f"generated tokens: {sum(map(len, expected))}," in result.stderr


def test_workdir_streams_requested_byte_tokens(model, workdir):
  result = run_infer(f"--checkpoint={workdir}", "--prompt=The ", "--max_new_tokens=10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "generated tokens: 10," in result.stderr and f"step {STEP}" in result.stderr
  # Greedy tokens depend on every parameter and (through routing) on the router biases.
  tokens = dsjax.generate(model, [list(b"The ")], max_new_tokens=10)[0]
  assert result.stdout == ByteTokenizer().decode(tokens) + "\n"


def test_loader_errors_say_what_to_do(hf_checkpoint, workdir, tmp_path):
  unfinished = tmp_path / "unfinished"
  (unfinished / "checkpoints" / "8.orbax-checkpoint-tmp").mkdir(parents=True)
  (unfinished / EXPERIMENT_FILE).write_text((workdir / EXPERIMENT_FILE).read_text())
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    load_for_inference(unfinished)
  with pytest.raises(FileNotFoundError, match=rf"available steps: \[{STEP}\]"):
    load_for_inference(workdir, step=7)
  with pytest.raises(ValueError, match="train.py workdirs only"):
    load_for_inference(hf_checkpoint[0], step=STEP)
  no_tokenizer = tmp_path / "no_tokenizer"
  no_tokenizer.mkdir()
  for file in hf_checkpoint[0].iterdir():
    if file.name != "tokenizer.json":
      (no_tokenizer / file.name).symlink_to(file)
  with pytest.raises(FileNotFoundError, match="--tokenizer=PATH"):
    load_for_inference(no_tokenizer)


def test_prompts_file_errors_name_the_line(tmp_path):
  cases = {'{"prompt": "a"}\n\n{"text": "b"}\n': "line 3 has no \"prompt\"",
           '{"prompt": ""}\n': "line 1: the prompt is empty",
           '["a"]\n': "line 1 has no", "\n": "holds no prompts"}
  for i, (text, needle) in enumerate(cases.items()):
    (tmp_path / f"{i}.jsonl").write_text(text)
    with pytest.raises(ValueError, match=needle):
      cli_io.read_prompts_file(str(tmp_path / f"{i}.jsonl"))
  (tmp_path / "ok.jsonl").write_text('{"prompt": "a", "id": 1}\n{"prompt": "b \u00e9"}\n')
  assert cli_io.read_prompts_file(str(tmp_path / "ok.jsonl")) == ["a", "b \u00e9"]


def test_chat_template_renders_one_user_turn():
  template = cli_io.ChatTemplate(
      "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'user' %}"
      "{{ raise_exception('only user turns') }}{% endif %}U: {{ m['content'] }}\n"
      "{% endfor %}{% if add_generation_prompt %}A:{% endif %}", bos_token="<s>")
  assert template.render("hi") == "<s>U: hi\nA:"
  tokenizer = ByteTokenizer()
  assert cli_io.encode_prompt(tokenizer, "hi", template) == list(b"<s>U: hi\nA:")
  assert cli_io.encode_prompt(tokenizer, "hi", None) == list(b"hi")
  failing = cli_io.ChatTemplate("{{ raise_exception('no system prompt') }}")
  with pytest.raises(ValueError, match="no system prompt"):
    failing.render("hi")
  sandboxed = cli_io.ChatTemplate("{{ ''.__class__.__mro__ }}")
  with pytest.raises(Exception, match="unsafe|not safely"):
    sandboxed.render("hi")
  assert cli_io.choose_template(template, "off") is None
  with pytest.raises(ValueError, match="no chat template"):
    cli_io.choose_template(None, "on")


def test_stream_never_prints_half_a_character():
  """Byte tokens arrive one at a time; a multi-byte character appears once complete."""
  text = "h\u00e9 \u20ac\U0001f600!"
  out = io.StringIO()
  stream = cli_io.TextStream(ByteTokenizer(), eos_id=None, out=out)
  writes = []
  for byte in text.encode("utf-8"):
    stream.add([byte])
    writes.append(out.getvalue())
  stream.finish()
  assert out.getvalue() == text + "\n"
  assert all("\ufffd" not in w and text.startswith(w) for w in writes)
  assert writes[1] == "h" and writes[2] == "h\u00e9"  # held back until the second byte
