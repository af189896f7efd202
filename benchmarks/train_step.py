"""Training throughput of one dsjax train step vs transformers' PyTorch DeepseekV3, same model
config, same batch, AdamW, fp32, same machine, one run. Prints tokens/s and the ratio; nothing
here is asserted.

dsjax: the jitted `train_step` of `build_run(load_experiment("configs/tiny.py", overrides))`
(AdamW + global-norm clipping, next-token loss, router-bias update on; MTP and the balance
loss off, as transformers' DeepseekV3ForCausalLM trains neither).
transformers: DeepseekV3ForCausalLM built from `to_hf(model_cfg)`, eager, forward with labels,
backward, clip_grad_norm_(1.0), torch.optim.AdamW step, zero_grad. Both sides start from their
own random init (same shapes). Each timed step is synchronous (block_until_ready / loss.item());
the two sides alternate step by step so that background load on a shared machine hits both.

  python benchmarks/train_step.py [--batch 8 --seq 128 --hidden 128 --layers 4 --experts 8
                                   --topk 2 --steps 20 --moe-impl auto]
"""

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from dsjax.checkpoint.hf_config import to_hf
from dsjax.experiment import load_experiment
from dsjax.model.moe import resolve_impl
from dsjax.train.setup import build_run
from dsjax.train.state import init_train_state

CONFIG_FILE = "configs/tiny.py"
LR, BETAS, WEIGHT_DECAY, EPS, CLIP = 3e-3, (0.9, 0.95), 0.1, 1e-8, 1.0


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for name, default in (("batch", 8), ("seq", 128), ("hidden", 128), ("layers", 4),
                        ("experts", 8), ("topk", 2), ("steps", 20), ("warmup", 3)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--moe-impl", default="auto", choices=("auto", "dense", "blocked"))
  parser.add_argument("--remat", default="none", help="dsjax model.remat_policy")
  parser.add_argument("--no-scan", action="store_true", help="dsjax: unroll the layer stacks")
  parser.add_argument("--torch-experts", default=None,
                      help="transformers experts_implementation (default: its own choice)")
  parser.add_argument("--only", choices=("dsjax", "torch"), default=None)
  return parser.parse_args()


def overrides(args) -> dict:
  """configs/tiny.py with the benchmark's shape; MTP and the balance loss off, constant lr."""
  width = args.hidden
  return {
      "model.hidden_size": width, "model.intermediate_size": 3 * width,
      "model.num_hidden_layers": args.layers, "model.num_mtp_layers": 0,
      "model.max_position_embeddings": max(512, args.seq),
      "model.moe.n_routed_experts": args.experts, "model.moe.num_experts_per_tok": args.topk,
      "model.moe.moe_intermediate_size": width // 2, "model.moe.impl": args.moe_impl,
      "model.scan_layers": not args.no_scan, "model.remat_policy": args.remat,
      "train.batch_size": args.batch, "train.seq_len": args.seq, "train.balance_alpha": 0.0,
      "optimizer.schedule": "constant", "optimizer.warmup_steps": 0, "optimizer.lr": LR,
      "optimizer.b1": BETAS[0], "optimizer.b2": BETAS[1], "optimizer.eps": EPS,
      "optimizer.weight_decay": WEIGHT_DECAY, "optimizer.clip": CLIP,
  }


def token_batch(args, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 [B, T]: random tokens, targets the next token of each input."""
  ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq + 1), dtype=np.int32)
  return ids[:, :-1], ids[:, 1:]


def seconds(step) -> float:
  start = time.perf_counter()
  step()
  return time.perf_counter() - start


def timed_steps(steps_by_side: dict, warmup: int, count: int) -> dict[str, list[float]]:
  """Seconds of each of `count` calls of every side's step (each call blocks until done),
  after `warmup` calls. The sides alternate step by step, so background load on a shared
  machine hits both alike."""
  for _ in range(warmup):
    for step in steps_by_side.values():
      step()
  times = {name: [] for name in steps_by_side}
  for _ in range(count):
    for name, step in steps_by_side.items():
      times[name].append(seconds(step))
  return times


# ---- dsjax ----

def dsjax_batch(run, inputs: np.ndarray, targets: np.ndarray) -> dict:
  b, t = inputs.shape
  host = {"inputs": inputs, "targets": targets,
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "loss_mask": np.ones((b, t), np.float32)}
  return {k: jax.device_put(v, run.batch_sharding) for k, v in host.items()}


def dsjax_step(run, inputs, targets):
  """(step closure, compile seconds, last-loss getter) of the dsjax train step."""
  state = init_train_state(run.model_cfg, run.optimizer, run.cfg.seed, run.state_shardings)
  batch = dsjax_batch(run, inputs, targets)
  holder = {"state": state}

  def step():
    holder["state"], metrics = run.train_step(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))
    holder["loss"] = metrics["loss"]

  compile_s = seconds(step)  # the first call compiles
  return step, compile_s, lambda: float(holder["loss"])


# ---- transformers ----

def torch_model(run, experts_impl: str | None) -> DeepseekV3ForCausalLM:
  hf = to_hf(run.model_cfg)
  hf.pop("architectures")
  hf.pop("model_type")
  config = DeepseekV3Config(**hf)
  if experts_impl:
    config._experts_implementation = experts_impl
  torch.manual_seed(run.cfg.seed)
  return DeepseekV3ForCausalLM(config).train()


def torch_optimizer(model) -> torch.optim.AdamW:
  """AdamW as dsjax's: weight decay on matrices only, same lr/betas/eps."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=True)


def torch_step(run, inputs, targets, experts_impl: str | None):
  """(step closure, implementation names, last-loss getter) of the PyTorch train step."""
  model = torch_model(run, experts_impl)
  optimizer = torch_optimizer(model)
  ids, labels = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
  holder = {}

  def step():
    # shift_labels: `targets` are already the next tokens, so all B*T positions count.
    loss = model(input_ids=ids, labels=labels, shift_labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    holder["loss"] = loss.item()

  impls = (f"attention={model.config._attn_implementation}, "
           f"experts={model.config._experts_implementation}")
  return step, impls, lambda: holder["loss"]


# ---- report ----

def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe(run, args) -> str:
  m = run.model_cfg
  moe, mla = m.moe, m.mla
  model = (f"model (configs/tiny.py layout, MTP off): hidden {m.hidden_size}, "
           f"{m.num_hidden_layers} layers ({moe.first_k_dense_replace} dense + "
           f"{m.num_moe_layers} MoE), dense MLP {m.intermediate_size}, {moe.n_routed_experts} "
           f"routed experts top-{moe.num_experts_per_tok} (+{moe.n_shared_experts} shared) of "
           f"width {moe.moe_intermediate_size}, {m.num_attention_heads} heads, q_lora "
           f"{mla.q_lora_rank}, kv_lora {mla.kv_lora_rank}, vocab {m.vocab_size}")
  run_line = (f"batch {args.batch} x {args.seq} tokens, fp32; AdamW lr {LR} betas {BETAS} "
              f"wd {WEIGHT_DECAY} (matrices), clip {CLIP}; {args.steps} timed steps per side "
              f"after {args.warmup} warm-up")
  return model + "\n" + run_line


def summary(name: str, times: list[float], loss: float, tokens: int) -> float:
  median = statistics.median(times)
  print(f"{name}: median {median * 1e3:.1f} ms/step = {tokens / median:,.0f} tok/s "
        f"(best {min(times) * 1e3:.1f} ms, worst {max(times) * 1e3:.1f} ms; last loss {loss:.3f})")
  return tokens / median


def sides(run, inputs, targets, args) -> dict:
  """{name: (label, step closure, last-loss getter)} of the sides to time."""
  out = {}
  if args.only != "torch":
    step, compile_s, loss = dsjax_step(run, inputs, targets)
    m = run.model_cfg
    out["dsjax"] = (f"dsjax (jit, moe={resolve_impl(m.moe.impl, m.moe)}, scan={m.scan_layers}, "
                    f"remat={m.remat_policy}; compile {compile_s:.1f} s)", step, loss)
  if args.only != "dsjax":
    step, impls, loss = torch_step(run, inputs, targets, args.torch_experts)
    out["torch"] = (f"transformers (eager, {impls})", step, loss)
  return out


def main():
  args = parse_args()
  torch.set_num_threads(os.cpu_count())
  run = build_run(load_experiment(CONFIG_FILE, overrides(args)))
  inputs, targets = token_batch(args, run.model_cfg.vocab_size)
  tokens = args.batch * args.seq
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), transformers {transformers.__version__}")
  print(describe(run, args))
  timed = sides(run, inputs, targets, args)
  times = timed_steps({name: step for name, (_, step, _) in timed.items()}, args.warmup,
                      args.steps)
  speeds = {name: summary(label, times[name], loss(), tokens)
            for name, (label, _, loss) in timed.items()}
  if len(speeds) == 2:
    print(f"speed ratio dsjax / transformers: {speeds['dsjax'] / speeds['torch']:.2f}x")


if __name__ == "__main__":
  main()
