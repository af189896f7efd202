"""Greedy generation with dsjax's `Generator` vs transformers' `generate`, same DeepseekV3
weights, same prompts, same machine, one run: prefill time, decode tokens/s and peak memory.
Prints a table and the ratios; nothing here is asserted.

Model: the shape of benchmarks/forward.py (DeepseekV3 layout: hidden 512, 6 layers = 1 dense +
5 MoE, 16 routed experts top-4 + 1 shared, 8 heads, q_lora 256, kv_lora 128, vocab 32000, no
MTP), transformers' random init (seed 0), saved once as a HF checkpoint that both sides load.
Prompts: `--batch` rows of `--prompt` random ids (numpy seed 0); each side generates exactly
`--new` tokens per row, greedily, with no eos (the checkpoint has no eos/pad id), fp32.

Each side is its own worker process (this script with `--only`), so that memory is its own:
  1. load the checkpoint; RSS now = the baseline;
  2. one warm-up generate with the timed shapes (dsjax compiles its prefill and decode step
     here; transformers has nothing to compile);
  3. `--repeats` timed generates, the workers taking turns call by call, so that background
     load on a shared machine hits every side alike. Per call: total = wall time of the
     call; prefill = time to the first new token (dsjax: GenerationResult.prefill_seconds;
     transformers: a logits processor stamps its first call, i.e. after the prompt's forward
     pass); decode = total - prefill, covering the batch * (new - 1) tokens after the first.
     The table shows the fastest prefill and the fastest decode of the repeats, and the
     median time per token within the calls (dsjax: `on_tokens` stamps, one per block of
     decode_chunk tokens, trailing the device by one block, the time between two stamps
     divided by the block's tokens; transformers: the logits-processor stamps, one a token).
Memory: "peak RSS, 1st call" = ru_maxrss - baseline (the worker's peak since loading, so
dsjax's XLA compilation is in it); "peak RSS, warm call" = VmHWM during a timed call (reset
through /proc/self/clear_refs just before it) - RSS just before it: what one more generate
call adds on top of what the process already holds. Cache = bytes of the decode cache at the
end: dsjax's GenerationResult.cache_bytes (latent c_kv + k_pe for all bucketed slots) vs the
tensors of transformers' returned past_key_values (transformers 5 caches MLA's latent too:
c_kv as "keys", k_pe as "values", grown by concatenation to the tokens seen).
Token agreement: the greedy ids of each dsjax row vs transformers' (fp32 differences can flip
a near-tie and the sequences diverge from there, so this is a sanity check, not a test).
transformers runs eager with its default attention (sdpa) and experts implementation, with
torch's default thread count.

  python benchmarks/decode.py [--batch 8 --prompt 512 --new 128 --hidden 512 --layers 6
                               --experts 16 --topk 4 --repeats 3 --rows absorb,torch]
  (--rows absorb,naive,torch adds dsjax's expanded-K/V attention, about 2x slower to decode
  than absorb; --rows absorb,stacked,torch adds the Generator's stacked layout, whose decode
  step scans the [L,...] weights and cache instead of reading per-layer buffers; --rows
  absorb,in_major,torch adds the per-layer layout with input-major projection weights, the
  default before output-major ones. The defaults
  take 2-4 minutes on a 2-core CPU.)
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = ("absorb", "in_major", "stacked", "naive", "torch")
RESULT_TAG = "RESULT "


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for name, default in (("batch", 8), ("prompt", 512), ("new", 128), ("hidden", 512),
                        ("layers", 6), ("vocab", 32000), ("experts", 16), ("topk", 4),
                        ("repeats", 3)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--rows", default="absorb,torch",
                      help=f"comma-separated, some of {ROWS} (absorb/naive: dsjax attn_impl, "
                           "per-layer layout; in_major: absorb with input-major projection "
                           "weights; stacked: absorb with the stacked layout)")
  parser.add_argument("--moe-impl", default=None, help="dsjax MoE dispatch (default: config's)")
  parser.add_argument("--decode-chunk", type=int, default=None,
                      help="dsjax decode steps per compiled call (default: the Generator's)")
  parser.add_argument("--only", choices=("dsjax", "torch"), default=None,
                      help="internal: be one side's worker, commanded through stdin")
  parser.add_argument("--attn-impl", default="absorb", help="internal, with --only dsjax")
  parser.add_argument("--layout", default="per_layer", help="internal, with --only dsjax")
  parser.add_argument("--projection-layout", default="auto", help="internal, with --only dsjax")
  parser.add_argument("--checkpoint", default=None, help="internal, with --only")
  return parser.parse_args()


def prompts(args) -> np.ndarray:
  return np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))


# ---- memory (Linux) ----

def _status_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def reset_peak() -> None:
  """Makes VmHWM (peak RSS) restart from the current RSS (Linux >= 4.0)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def lifetime_peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- one side, in its worker process ----

def dsjax_side(args):
  """(generate closure, label, versions). generate() -> (tokens [B][new], prefill s, token
  stamps, cache bytes, extras)."""
  import jax
  import dsjax
  from dsjax.infer import Generator
  from dsjax.infer.weight_layout import resolve_projection_layout
  from dsjax.model.moe import resolve_impl

  model = dsjax.load_hf_checkpoint(args.checkpoint)
  chunk = {} if args.decode_chunk is None else {"decode_chunk": args.decode_chunk}
  generator = Generator(model, attn_impl=args.attn_impl, moe_impl=args.moe_impl,
                        layout=args.layout, projection_layout=args.projection_layout, **chunk)
  impl = args.moe_impl or model.config.moe.impl
  moe = (f"{resolve_impl(impl, model.config.moe, args.batch * args.prompt)} in prefill, "
         f"{resolve_impl(impl, model.config.moe, args.batch)} in decode")
  del model
  ids = prompts(args).tolist()

  def generate():
    stamps = []  # (time, tokens streamed then): dsjax streams blocks of decode_chunk tokens
    stamp = lambda row, new: stamps.append((time.perf_counter(), len(new))) if row == 0 else None
    result = generator.generate(ids, max_new_tokens=args.new, temperature=0.0, eos_id=None,
                                on_tokens=stamp)
    # compile_seconds (where the library reports it) should be 0 after the warm-up.
    extras = {"compile_s": getattr(result, "compile_seconds", None)}
    return result.tokens, result.prefill_seconds, stamps, result.cache_bytes, extras

  projections = resolve_projection_layout(args.projection_layout, args.layout)
  return (generate, f"dsjax (jit, attn={args.attn_impl}, {args.layout} layout, {projections} "
          f"projections, moe={moe}, {generator.decode_chunk} decode steps per call)",
          f"jax {jax.__version__} ({jax.default_backend()})")


def torch_side(args):
  import torch
  import transformers
  from transformers import DeepseekV3ForCausalLM, LogitsProcessor, LogitsProcessorList

  class Stamps(LogitsProcessor):
    """Records the time of each call: one per generated token, after its forward pass."""

    def __init__(self):
      self.times = []

    def __call__(self, input_ids, scores):
      self.times.append(time.perf_counter())
      return scores

  model = DeepseekV3ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
  ids = torch.from_numpy(prompts(args))

  def generate():
    stamps = Stamps()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                         min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                         pad_token_id=None, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([stamps]))
    cache = out.past_key_values
    cache_bytes = sum(t.numel() * t.element_size()
                      for layer in cache.layers for t in (layer.keys, layer.values))
    return (out.sequences[:, ids.shape[1]:].tolist(), stamps.times[0] - start,
            [(t, 1) for t in stamps.times],
            cache_bytes, {"cache_tokens": cache.get_seq_length()})

  label = (f"transformers (eager, attn={model.config._attn_implementation}, "
           f"experts={model.config._experts_implementation}, {torch.get_num_threads()} threads)")
  return generate, label, f"torch {torch.__version__}, transformers {transformers.__version__}"


def median_token_ms(stamps: list[tuple[float, int]]) -> float | None:
  """Median over the stamps after the first of (time since the previous stamp) / (tokens
  streamed at this one)."""
  if len(stamps) < 3:
    return None
  return 1e3 * statistics.median((t - prev) / n for (prev, _), (t, n) in zip(stamps, stamps[1:]))


def worker(args) -> None:
  """Loads one side, then answers each stdin line ("warmup" or "run") with a RESULT line."""
  generate, label, versions = (dsjax_side if args.only == "dsjax" else torch_side)(args)
  baseline = _status_mib("VmRSS")
  reply({"label": label, "versions": versions, "baseline_mib": baseline})
  for command in sys.stdin:
    reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    tokens, prefill_s, stamps, cache_bytes, extras = generate()
    total = time.perf_counter() - start
    out = {"total_s": total, "prefill_s": prefill_s, "cache_bytes": cache_bytes,
           "step_ms": median_token_ms(stamps),
           "peak_mib": _status_mib("VmHWM") - before,
           "lifetime_peak_mib": lifetime_peak_mib() - baseline,
           "held_mib": _status_mib("VmRSS") - baseline, **extras}
    if command.strip() == "run":
      out["tokens"] = tokens
    reply(out)


def reply(obj: dict) -> None:
  print(RESULT_TAG + json.dumps(obj), flush=True)


# ---- parent: checkpoint, workers, report ----

def save_checkpoint(args, path: str) -> str:
  import torch
  from transformers import DeepseekV3ForCausalLM
  from v3_shape import v3_config

  heads = args.hidden // 64
  config = v3_config(args, max_position_embeddings=max(4096, args.prompt + args.new),
                     num_nextn_predict_layers=0, bos_token_id=None, eos_token_id=None,
                     pad_token_id=None)
  torch.manual_seed(0)
  DeepseekV3ForCausalLM(config).save_pretrained(path)
  return (f"model: DeepseekV3 layout, hidden {args.hidden}, {args.layers} layers (1 dense, MLP "
          f"{4 * args.hidden} + {args.layers - 1} MoE), {args.experts} routed experts top-"
          f"{args.topk} (+1 shared) of width {args.hidden // 2}, sigmoid + noaux_tc routing "
          f"(4 groups, top 2), {heads} heads, q_lora {args.hidden // 2}, kv_lora "
          f"{args.hidden // 4}, qk_nope 64, qk_rope 32, v 64, vocab {args.vocab}, no MTP; "
          f"transformers' random init (seed 0); fp32")


class Worker:
  """One side's worker process, commanded line by line."""

  def __init__(self, args, row: str, checkpoint: str, log):
    side = "torch" if row == "torch" else "dsjax"
    command = [sys.executable, os.path.abspath(__file__), "--only", side, "--checkpoint",
               checkpoint, "--attn-impl", "naive" if row == "naive" else "absorb",
               "--layout", "stacked" if row == "stacked" else "per_layer",
               "--projection-layout", "in_major" if row == "in_major" else "auto"]
    for name in ("batch", "prompt", "new", "vocab"):
      command += [f"--{name}", str(getattr(args, name))]
    if args.moe_impl:
      command += ["--moe-impl", args.moe_impl]
    if args.decode_chunk is not None:
      command += ["--decode-chunk", str(args.decode_chunk)]
    # The worker imports the dsjax of this checkout (the repository root holds benchmarks/).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    self.row, self.log = row, log
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, text=True, env=env)
    self.info = self.read()

  def read(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(RESULT_TAG):
        return json.loads(line[len(RESULT_TAG):])
    self.log.seek(0)
    raise RuntimeError(f"{self.row} worker exited ({self.process.wait()}):\n"
                       f"{self.log.read()[-3000:]}")

  def call(self, command: str) -> dict:
    start = time.perf_counter()
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return {**self.read(), "wall_s": time.perf_counter() - start}

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


def measure(args, rows: list[str], checkpoint: str) -> dict:
  """{row: worker info + warm-up + list of timed calls}; loads and warm-ups one worker at a
  time, then the timed calls alternate between workers."""
  workers, results = {}, {}
  with tempfile.TemporaryFile("w+") as log:
    try:
      for row in rows:
        workers[row] = Worker(args, row, checkpoint, log)
        results[row] = {**workers[row].info, "warmup": workers[row].call("warmup"), "runs": []}
      for _ in range(args.repeats):
        for row, w in workers.items():
          results[row]["runs"].append(w.call("run"))
    finally:
      for w in workers.values():
        w.close()
  return results


def summarise(r: dict) -> dict:
  runs = r["runs"]
  return {"prefill_s": min(x["prefill_s"] for x in runs),
          "decode_s": min(x["total_s"] - x["prefill_s"] for x in runs),
          "decodes": [x["total_s"] - x["prefill_s"] for x in runs],
          "step_ms": statistics.median(x["step_ms"] for x in runs),
          "first_peak_mib": r["warmup"]["lifetime_peak_mib"],
          "warm_peak_mib": max(x["peak_mib"] for x in runs),
          "cache_bytes": runs[-1]["cache_bytes"], "tokens": runs[-1]["tokens"]}


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
  a, b = np.asarray(a), np.asarray(b)
  prefix = [int(np.argmin(np.append(x == y, False))) for x, y in zip(a, b)]
  return f"{int((a == b).sum())}/{a.size} (common prefix per row {min(prefix)}-{max(prefix)})"


def compile_note(r: dict) -> str:
  seconds = [x.get("compile_s") for x in [r["warmup"]] + r["runs"]]
  if seconds[0] is None:
    return ""
  return (f"; compile {seconds[0]:.1f} s in the warm-up, "
          f"{sum(seconds[1:]):.1f} s in the timed calls")


def ratio(a: float, b: float) -> str:
  """a / b, or n/a where b is under 1 MiB (too small to measure as RSS)."""
  return f"{a / b:.2f}x" if b >= 1 else "n/a"


def report(args, results: dict, model_line: str) -> None:
  decoded = args.batch * (args.new - 1)
  cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
  versions = "; ".join(dict.fromkeys(r["versions"] for r in results.values()))
  print(f"machine: {cpu.group(1) if cpu else 'unknown CPU'}, {os.cpu_count()} cores; {versions}")
  print(model_line)
  print(f"batch {args.batch} x {args.prompt} prompt tokens, {args.new} new tokens per row "
        f"(greedy, no eos); best of {args.repeats} timed calls per side (alternating) after 1 "
        "warm-up")
  print("| side | prefill | decode | decode tok/s | median ms / token step | peak RSS, 1st call "
        "| peak RSS, warm call | cache | tokens equal to transformers |")
  print("|---|---|---|---|---|---|---|---|---|")
  s = {row: summarise(r) for row, r in results.items()}
  ref = s.get("torch")
  for row, x in s.items():
    same = agreement(x["tokens"], ref["tokens"]) if ref and row != "torch" else "-"
    prefill_speed = args.batch * args.prompt / x["prefill_s"]
    print(f"| {results[row]['label']} | {x['prefill_s']:.2f} s ({prefill_speed:,.0f} tok/s) | "
          f"{x['decode_s']:.2f} s | {decoded / x['decode_s']:,.0f} | {x['step_ms']:.1f} | "
          f"{x['first_peak_mib']:,.0f} MiB | {x['warm_peak_mib']:,.0f} MiB | "
          f"{x['cache_bytes'] / 2**20:.1f} MiB | {same} |")
  for row, r in results.items():
    extra = r["runs"][-1].get("cache_tokens")
    print(f"{row}: RSS after loading {r['baseline_mib']:,.0f} MiB, after the calls "
          f"+{r['runs'][-1]['held_mib']:,.0f} MiB; warm-up call {r['warmup']['wall_s']:.1f} s; "
          f"decode times {', '.join(f'{t:.2f}' for t in s[row]['decodes'])} s"
          + (f"; cache holds {extra} tokens" if extra else "") + compile_note(r))
  for row, x in s.items():
    if ref and row != "torch":
      print(f"ratios {row} / transformers: decode tok/s {ref['decode_s'] / x['decode_s']:.2f}x "
            f"(median step {ref['step_ms'] / x['step_ms']:.2f}x), prefill speed "
            f"{ref['prefill_s'] / x['prefill_s']:.2f}x, peak RSS 1st call "
            f"{ratio(x['first_peak_mib'], ref['first_peak_mib'])}, warm call "
            f"{ratio(x['warm_peak_mib'], ref['warm_peak_mib'])}, cache "
            f"{x['cache_bytes'] / ref['cache_bytes']:.2f}x")


def main():
  args = parse_args()
  if args.only:
    worker(args)
    return
  rows = [r for r in args.rows.split(",") if r]
  if set(rows) - set(ROWS):
    raise SystemExit(f"--rows: unknown {sorted(set(rows) - set(ROWS))}; use some of {ROWS}")
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as checkpoint:
    model_line = save_checkpoint(args, checkpoint)
    results = measure(args, rows, checkpoint)
  report(args, results, model_line)
  print(f"total runtime {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
