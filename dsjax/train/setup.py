"""Everything a training run needs, built and validated before the workdir is touched: model
config, tokenizer and data, mesh and shardings, optimizer, and the compiled step functions.

Every bad setting fails here with a ValueError/FileNotFoundError that says what to change, so
a mistyped command never harms the checkpoints of an existing workdir.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from dsjax.config import ModelConfig
from dsjax.data import build_data, make_tokenizer
from dsjax.parallel.activations import under_mesh
from dsjax.parallel.mesh import batch_parallelism, batch_sharding, make_mesh, tree_shardings
from dsjax.train.balance import bias_update_enabled
from dsjax.train.dsa_stages import check_stage, dsa_stage, model_stage, trainable_mask
from dsjax.train.optimizer import learning_rate_schedule, make_optimizer
from dsjax.train.state import abstract_train_state
from dsjax.train.step import StepSettings, TrainState, eval_step, train_step


def _check_train_section(train: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  positive = ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every", "eval_every",
              "grad_accum_steps", "keep_checkpoints", "max_bad_steps")
  for key in positive:
    if int(train[key]) < 1:
      raise ValueError(f"train.{key}={train[key]} must be >= 1; set --config.train.{key}.")
  if train.seq_len > model_cfg.max_position_embeddings:
    raise ValueError(f"train.seq_len={train.seq_len} exceeds the model's "
                     f"max_position_embeddings={model_cfg.max_position_embeddings}; lower "
                     "--config.train.seq_len or raise --config.model.max_position_embeddings.")
  if train.batch_size % train.grad_accum_steps:
    raise ValueError(f"train.batch_size={train.batch_size} is not divisible by "
                     f"train.grad_accum_steps={train.grad_accum_steps}; change either.")
  check_stage(dsa_stage(train), model_cfg)


def resolve_batch_size(train: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """With train.batch_per_shard > 0, sets train.batch_size to it times the batch's split over
  the mesh (data x fsdp x expert) times grad_accum_steps, so one config scales with the
  device count."""
  per_shard = int(train.get("batch_per_shard", 0))
  if per_shard < 0:
    raise ValueError(f"train.batch_per_shard={per_shard}; use 0 (train.batch_size is the "
                     "global batch) or the sequences per batch shard.")
  if per_shard:
    train.batch_size = per_shard * batch_parallelism(mesh) * int(train.grad_accum_steps)


def _check_batch_fits_mesh(train, mesh: Mesh) -> None:
  ways = batch_parallelism(mesh) * train.grad_accum_steps
  if train.batch_size % ways:
    axes = ", ".join(f"{a}={mesh.shape[a]}" for a in ("data", "fsdp", "expert"))
    raise ValueError(
        f"train.batch_size={train.batch_size} is not divisible by the batch's split over the "
        f"mesh ({axes}) x grad_accum_steps={train.grad_accum_steps} = {ways}; set "
        f"--config.train.batch_size to a multiple of {ways}.")
  if train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={train.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes; use a multiple.")


def step_settings(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig) -> StepSettings:
  t = cfg.train
  stage = dsa_stage(t)
  return StepSettings(
      grad_accum_steps=int(t.grad_accum_steps), mtp_weight=float(t.mtp_weight),
      balance_alpha=float(t.balance_alpha) if model_cfg.moe is not None else 0.0,
      z_loss=float(t.z_loss),
      bias_update=(bias_update_enabled(t.router_bias_update, model_cfg)
                   and stage != "dense_warmup"),  # the rest is frozen then
      bias_rate=float(t.router_bias_rate), dsa_stage=model_stage(stage),
      indexer_loss_weight=float(t.get("indexer_loss_weight", 1.0)))


def _compile_steps(run_parts: dict, settings: StepSettings):
  shardings, batch = run_parts["state_shardings"], run_parts["batch_sharding"]
  mesh = batch.mesh
  step = functools.partial(train_step, graphdef=run_parts["graphdef"],
                           optimizer=run_parts["optimizer"], schedule=run_parts["schedule"],
                           settings=settings)
  jitted_train = jax.jit(under_mesh(step, mesh), in_shardings=(shardings, batch),
                         out_shardings=(shardings, None), donate_argnums=0)
  evaluate = functools.partial(eval_step, graphdef=run_parts["graphdef"])
  jitted_eval = jax.jit(under_mesh(evaluate, mesh), in_shardings=(shardings, batch))
  return jitted_train, jitted_eval


@dataclasses.dataclass
class Steps:
  """The validated model, mesh, optimizer and jitted steps of an experiment: everything but
  its data (what `python -m dsjax.compile` compiles for a topology)."""
  model_cfg: ModelConfig
  mesh: Mesh
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  graphdef: Any
  abstract_state: TrainState       # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  train_step: Any                  # jitted (state, batch) -> (state, metrics)
  eval_step: Any                   # jitted (state, batch) -> (loss_sum, weight, correct)


@dataclasses.dataclass
class Run(Steps):
  """A validated, ready-to-train experiment: its Steps plus the config and data."""
  cfg: ml_collections.ConfigDict
  tokenizer: Any
  data: Any


def build_steps(cfg: ml_collections.ConfigDict, devices=None) -> Steps:
  """Validates `cfg`'s model, train, optimizer and mesh sections and builds its jitted steps
  on `devices` (default: all; compile-only devices work too). Sets cfg.train.batch_size when
  cfg.train.batch_per_shard is given (resolve_batch_size)."""
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  _check_train_section(cfg.train, model_cfg)
  mesh = make_mesh(cfg.mesh, devices)
  resolve_batch_size(cfg.train, mesh)
  _check_batch_fits_mesh(cfg.train, mesh)
  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
  settings = step_settings(cfg, model_cfg)
  _, abstract_params = abstract_train_state(model_cfg, optax.identity(), cfg.seed)
  trainable = trainable_mask(abstract_params.params, dsa_stage(cfg.train))
  optimizer = make_optimizer(cfg.optimizer, cfg.train.steps, abstract_params.params, trainable)
  graphdef, abstract = abstract_train_state(model_cfg, optimizer, cfg.seed)
  shardings = tree_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  parts = dict(graphdef=graphdef, optimizer=optimizer, schedule=schedule,
               state_shardings=shardings, batch_sharding=batch_sharding(mesh))
  jitted_train, jitted_eval = _compile_steps(parts, settings)
  return Steps(model_cfg=model_cfg, mesh=mesh, abstract_state=abstract,
               train_step=jitted_train, eval_step=jitted_eval, **parts)


def build_run(cfg: ml_collections.ConfigDict, devices=None) -> Run:
  """Validates `cfg` and builds its Run on `devices` (default: all)."""
  steps = build_steps(cfg, devices)
  tokenizer = make_tokenizer(cfg.data.tokenizer, model_vocab_size=steps.model_cfg.vocab_size)
  data = build_data(cfg.data, tokenizer, seq_len=cfg.train.seq_len,
                    batch_size=cfg.train.batch_size // jax.process_count(), seed=cfg.seed,
                    vocab_size=steps.model_cfg.vocab_size, process_index=jax.process_index(),
                    process_count=jax.process_count())
  fields = {f.name: getattr(steps, f.name) for f in dataclasses.fields(steps)}
  return Run(cfg=cfg, tokenizer=tokenizer, data=data, **fields)
