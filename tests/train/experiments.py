"""Small experiment configs for training tests: configs/tiny.py shrunk so that a train step
compiles and runs in seconds on a 2-core CPU, and a runner for train.py in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dsjax.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")

SMALL = {
    "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_hidden_layers": 3,
    "model.moe.moe_intermediate_size": 32, "model.mla.q_lora_rank": 32,
    "model.mla.kv_lora_rank": 16, "model.mla.qk_nope_head_dim": 16,
    "model.mla.qk_rope_head_dim": 8, "model.mla.v_head_dim": 16,
    "train.steps": 8, "train.batch_size": 8, "train.seq_len": 32, "train.log_every": 1,
    "train.checkpoint_every": 4, "train.eval_every": 4, "train.eval_batches": 1,
    "train.sample_tokens": 8, "optimizer.warmup_steps": 2,
}


def small_experiment(**overrides):
  """configs/tiny.py with SMALL and `overrides` ({"train.steps": 4} style, dots as keys)."""
  return load_experiment(TINY, {**SMALL, **overrides})


def cli_args(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_train_cli(workdir, overrides: dict | None = None, env_extra: dict | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
  """`python train.py --config=configs/tiny.py` with SMALL + `overrides` in a subprocess."""
  args = [sys.executable, str(ROOT / "train.py"), f"--config={TINY}", f"--workdir={workdir}"]
  args += cli_args({**SMALL, **(overrides or {})})
  env = {**os.environ, **(env_extra or {})}
  return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=timeout)


def losses(workdir) -> dict[int, float]:
  """{step: loss} from workdir/metrics.jsonl."""
  path = Path(workdir) / "metrics.jsonl"
  return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}
