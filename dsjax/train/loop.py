"""The training loop: start or resume, step, log, evaluate, checkpoint, sample.

`train(cfg, workdir)` is what `python train.py` runs. Re-running it with the same workdir
resumes from the newest readable checkpoint (params, optimizer state, router biases, step, RNG
and data-iterator position), and the resumed run's losses equal an uninterrupted run's. A
second run on a workdir in use stops (WorkdirLock).

Multi-process runs (after dsjax.parallel.distributed.initialize) run this on every process:
each loads its share of every global batch, all save and restore the same checkpoints
together, and process 0 alone writes metrics.jsonl, TensorBoard, experiment.json and the
console output. Set-up steps that can fail are agreed on, so all processes stop alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from dsjax.infer.generation import Generator
from dsjax.parallel import distributed
from dsjax.train.checkpointing import TrainCheckpointer
from dsjax.train.workdir_lock import WorkdirLock
from dsjax.train.flops import peak_flops, train_flops_per_token
from dsjax.train.metrics import MetricsWriter
from dsjax.train.progress import ProgressBar
from dsjax.train.setup import Run, build_run
from dsjax.train.state import init_train_state, pretrained_train_state
from dsjax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"
EXPERIMENT_FILE = "experiment.json"


class TrainingDiverged(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def _device_batch(run: Run, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """The process-local numpy batch (this process's equal share of the rows) as global arrays
  sharded over the mesh's batch axes."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(run.batch_sharding, value, global_shape)
  return out


def _build_run(cfg: ml_collections.ConfigDict, devices) -> Run:
  """build_run, plus the multi-process condition that each process's devices hold exactly
  its share of a batch's rows (the share its data pipeline loads)."""
  run = build_run(cfg, devices)
  rows, processes = cfg.train.batch_size, jax.process_count()
  local = run.batch_sharding.addressable_devices_indices_map((rows, cfg.train.seq_len))
  held = len({r for index in local.values() for r in range(rows)[index[0]]})
  if held != rows // processes:
    raise ValueError(
        f"The mesh {dict(run.mesh.shape)} puts {held} of a batch's {rows} rows on each "
        f"process's devices, but each of the {processes} processes loads {rows // processes}: "
        f"split the batch over the processes (--config.mesh.data, fsdp or expert a multiple "
        f"of {processes}).")
  return run


def _initial_state(run: Run, checkpointer: TrainCheckpointer, iterator, log) -> TrainState:
  restored = checkpointer.restore_newest_readable(run.abstract_state, warn=log)
  if restored is not None:
    step, state, data_state = restored
    distributed.agree("data iterator state", iterator.set_state, data_state)
    log(f"Resumed from step {step} ({checkpointer.directory}).")
    return state
  init_from = run.cfg.train.init_from
  if init_from:
    log(f"Initialising from {init_from}.")
    return pretrained_train_state(init_from, run.model_cfg, run.optimizer, run.cfg.seed,
                                  run.state_shardings)
  return init_train_state(run.model_cfg, run.optimizer, run.cfg.seed, run.state_shardings)


def _evaluate(run: Run, state: TrainState) -> dict[str, float]:
  """eval_loss (per target token) and eval_accuracy (argmax hits per target token) over the
  held-out batches."""
  total, weight, hits = 0.0, 0.0, 0.0
  for batch in run.data.eval_batches(run.cfg.train.eval_batches):
    loss_sum, count, correct = run.eval_step(state, _device_batch(run, batch))
    total, weight, hits = total + float(loss_sum), weight + float(count), hits + float(correct)
  return {"eval_loss": total / max(weight, 1.0), "eval_accuracy": hits / max(weight, 1.0)}


class _Throughput:
  """Tokens/s and MFU over the steps since the last log: time inside train steps only (each
  step ends with a device sync), so compilation, evaluation and checkpoint writes are out."""

  def __init__(self, run: Run):
    devices = run.mesh.devices.flatten()
    per_device = peak_flops(devices[0])
    self.peak = per_device if devices[0].platform == "cpu" else per_device * len(devices)
    self.flops_per_token = train_flops_per_token(run.abstract_state.params, run.model_cfg,
                                                 run.cfg.train.seq_len)
    self.tokens_per_step = run.cfg.train.batch_size * run.cfg.train.seq_len
    self.reset()

  def reset(self):
    self.seconds, self.steps = 0.0, 0

  def add(self, seconds: float) -> None:
    self.seconds, self.steps = self.seconds + seconds, self.steps + 1

  def measure(self) -> dict[str, float]:
    rate = self.steps * self.tokens_per_step / self.seconds if self.seconds > 0 else float("nan")
    self.reset()
    return {"tokens_per_sec": rate, "mfu": rate * self.flops_per_token / self.peak}


def _summarise(pending: list[dict[str, Any]]) -> dict[str, Any]:
  """Means over the steps since the last log of the device metrics (fetched together)."""
  fetched = jax.device_get(pending)
  good = [m for m in fetched if bool(m["finite"])] or fetched
  out = {k: np.mean([m[k] for m in good], axis=0) for k in good[0] if k not in
         ("finite", "lr", "tokens")}
  out["lr"] = fetched[-1]["lr"]
  out["skipped_steps"] = len(fetched) - sum(bool(m["finite"]) for m in fetched)
  if "expert_imbalance" in out:
    out["max_expert_imbalance"] = np.max(out["expert_imbalance"])
  return out


def _write_experiment(workdir: Path, run: Run) -> None:
  (workdir / EXPERIMENT_FILE).write_text(run.cfg.to_json(indent=2) + "\n")


def _print_sample(run: Run, state: TrainState, log) -> str | None:
  """A sampled continuation of train.sample_prompt (temperature 0.7), generated with the
  model's decode cache (MLA's latents or NSA's decode state)."""
  prompt = run.cfg.train.sample_prompt
  ids = run.tokenizer.encode(prompt) if prompt else []
  room = run.model_cfg.max_position_embeddings - len(ids)
  if not ids or not run.cfg.train.sample_tokens or room < 1:
    return None
  model = nnx.merge(run.graphdef, state.params, state.router_bias)
  out = Generator(model).generate([ids], min(run.cfg.train.sample_tokens, room),
                                  temperature=0.7, seed=run.cfg.seed)
  text = prompt + run.tokenizer.decode(out.tokens[0])
  log("Sample:\n" + text)
  return text


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, devices=None,
          log=print) -> dict[str, Any]:
  """Trains (or resumes) the experiment `cfg` in `workdir`; returns a summary dict."""
  primary = distributed.is_primary()
  log = log if primary else (lambda *_: None)
  workdir = Path(workdir).absolute()
  distributed.check_same("experiment config or --workdir", f"{workdir}\n{cfg.to_json()}")
  # All validation happens before the workdir is used.
  run = distributed.agree("set-up", _build_run, cfg, devices)
  lock = WorkdirLock(workdir)
  note = distributed.agree("workdir lock", _lock, lock, primary_only=True)
  if note:
    log(note)
  try:
    return _train_in(run, workdir, primary, log)
  finally:
    lock.release()


def _lock(lock: WorkdirLock) -> str | None:
  lock.path.parent.mkdir(parents=True, exist_ok=True)
  return lock.acquire()


def _train_in(run: Run, workdir: Path, primary: bool, log) -> dict[str, Any]:
  cfg = run.cfg
  checkpointer = TrainCheckpointer(workdir / CHECKPOINT_DIR, keep=cfg.train.keep_checkpoints,
                                   async_save=cfg.train.async_checkpoint)
  iterator, writer = run.data.train_iterator(), None
  try:
    state = _initial_state(run, checkpointer, iterator, log)
    if primary:
      _write_experiment(workdir, run)
    start = int(state.step)
    log(f"dsjax: {run.model_cfg.num_hidden_layers}-layer model, mesh {dict(run.mesh.shape)}, "
        f"batch {cfg.train.batch_size}x{cfg.train.seq_len}, steps {start}->{cfg.train.steps}, "
        f"workdir {workdir}" + (f", {jax.process_count()} processes"
                                if jax.process_count() > 1 else ""))
    log(run.data.describe())
    writer = MetricsWriter(workdir, resume_step=start, enabled=primary)
    state, summary = _loop(run, state, iterator, checkpointer, writer, start, log, primary)
  finally:
    iterator.close()
    if writer is not None:
      writer.close()
    checkpointer.wait()
    checkpointer.close()
  summary["sample"] = _print_sample(run, state, log)
  return summary


def _check_finite(state: TrainState, step: int, limit: int, checkpointer) -> None:
  bad = int(state.bad_steps)  # one scalar per step, so a diverged run stops promptly
  if bad >= limit:
    latest = checkpointer.latest_step()
    kept = (f"the last good checkpoint (step {latest}) in {checkpointer.directory} is intact"
            if latest is not None else "no checkpoint was written yet")
    raise TrainingDiverged(
        f"Stopped at step {step}: {bad} consecutive steps had a non-finite loss or gradient "
        f"and were skipped; {kept}. Lower --config.optimizer.lr, raise "
        "--config.optimizer.warmup_steps or check the data.")


def _loop(run: Run, state: TrainState, iterator, checkpointer, writer, start: int, log,
          primary: bool = True):
  t = run.cfg.train
  bar, throughput = ProgressBar(t.steps, start, enabled=primary), _Throughput(run)
  pending, record = [], {}
  for step in range(start, t.steps):
    batch = _device_batch(run, next(iterator))
    began = time.perf_counter()
    state, metrics = run.train_step(state, batch)
    pending.append(metrics)
    done = step + 1
    _check_finite(state, done, t.max_bad_steps, checkpointer)
    if done == start + 1:
      bar.message(f"First step (with compilation) took {time.perf_counter() - began:.1f} s.")
    else:
      throughput.add(time.perf_counter() - began)
    evaluate = done % t.eval_every == 0 or done == t.steps
    eval_loss = None
    if done % t.log_every == 0 or evaluate:
      values = {**_summarise(pending), **throughput.measure()}
      pending = []
      if evaluate:
        values.update(_evaluate(run, state))
        eval_loss = values["eval_loss"]
      record = writer.write(done, values)
      bar.update(done, loss=record["loss"], lr=record["lr"], eval_loss=record.get("eval_loss"),
                 tokens_per_sec=record["tokens_per_sec"])
    if done % t.checkpoint_every == 0 or done == t.steps:
      checkpointer.save(done, state, iterator.get_state(), eval_loss=eval_loss)
  bar.close()
  return state, {"start_step": start, "final_step": max(start, int(t.steps)),
                 "last_record": record}
