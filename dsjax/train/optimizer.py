"""AdamW with global-norm clipping, a learning-rate schedule and a matrices-only weight decay.

The `optimizer` config section (see dsjax.experiment.DEFAULTS) has lr, warmup_steps, schedule,
decay_fraction, min_lr_ratio, weight_decay, clip, b1, b2 and eps. The optimizer works directly
on the nnx.State of the model's nnx.Param variables (fp32 master weights).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.model.param import logical_axes

SCHEDULES = ("deepseek_v3", "wsd", "cosine", "constant")
_STACK_AXIS = "layers"  # leading axis of layer-stacked parameters; not a matrix dimension


def _config_error(key: str, value, why: str) -> ValueError:
  return ValueError(f"optimizer.{key}={value!r}: {why}; change --config.optimizer.{key}.")


def _decay_steps(opt_cfg, total_steps: int) -> int:
  """Length of the final decay phase of deepseek_v3 / wsd, in whole steps."""
  return int(round(opt_cfg.decay_fraction * total_steps))


def _validate_schedule(opt_cfg, total_steps: int) -> None:
  if opt_cfg.schedule not in SCHEDULES:
    raise _config_error("schedule", opt_cfg.schedule, f"unknown schedule; use one of {SCHEDULES}")
  if total_steps < 0:
    raise ValueError(f"total_steps={total_steps} is negative; set --config.train.steps >= 0.")
  if not opt_cfg.lr > 0:
    raise _config_error("lr", opt_cfg.lr, "the peak learning rate must be > 0")
  if opt_cfg.warmup_steps < 0:
    raise _config_error("warmup_steps", opt_cfg.warmup_steps, "must be >= 0")
  if total_steps > 0 and opt_cfg.warmup_steps >= total_steps:
    raise _config_error("warmup_steps", opt_cfg.warmup_steps,
                        f"the warm-up must be shorter than the run ({total_steps} steps; "
                        "or raise --config.train.steps)")
  if not 0.0 <= opt_cfg.decay_fraction <= 1.0:
    raise _config_error("decay_fraction", opt_cfg.decay_fraction, "must lie in [0, 1]")
  if not 0.0 <= opt_cfg.min_lr_ratio <= 1.0:
    raise _config_error("min_lr_ratio", opt_cfg.min_lr_ratio, "must lie in [0, 1]")
  decay = _decay_steps(opt_cfg, total_steps)
  if opt_cfg.schedule in ("deepseek_v3", "wsd") and opt_cfg.warmup_steps + decay > total_steps:
    raise _config_error(
        "decay_fraction", opt_cfg.decay_fraction,
        f"warm-up ({opt_cfg.warmup_steps} steps) plus decay ({decay} of {total_steps} steps) is "
        "longer than the run (or lower --config.optimizer.warmup_steps)")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step count (int scalar -> float32).

  Every schedule warms up linearly from lr/warmup_steps at step 0 to `lr` at step
  warmup_steps - 1. Then:
    deepseek_v3: constant `lr`, then a cosine decay to lr*min_lr_ratio over the last
                 round(decay_fraction * total_steps) steps, reaching the minimum at total_steps;
    wsd:         the same with a linear decay (warmup-stable-decay);
    cosine:      a cosine decay to lr*min_lr_ratio from the end of warm-up to total_steps;
    constant:    constant `lr`.
  The decaying schedules stay at the minimum after total_steps.
  """
  _validate_schedule(opt_cfg, total_steps)
  peak = float(opt_cfg.lr)
  floor = peak * float(opt_cfg.min_lr_ratio)
  warmup = int(opt_cfg.warmup_steps)
  kind = opt_cfg.schedule
  if kind == "cosine":
    decay_start, decay_len = warmup, max(total_steps - warmup, 0)
  elif kind == "constant":
    decay_start, decay_len = math.inf, 0
  else:
    decay_len = _decay_steps(opt_cfg, total_steps)
    decay_start = total_steps - decay_len
  linear = kind == "wsd"

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    # (step + 1): the first update already moves the weights; the peak is reached at step
    # warmup_steps - 1.
    ramp = (step + 1) / warmup if warmup else jnp.ones_like(step)
    if decay_len:
      progress = jnp.clip((step - decay_start) / decay_len, 0.0, 1.0)
    else:  # no decay phase: drop to the minimum once the run is over
      progress = (step >= decay_start).astype(jnp.float32)
    shape = 1.0 - progress if linear else 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    after_warmup = floor + (peak - floor) * shape
    return jnp.where(step < warmup, peak * ramp, after_warmup).astype(jnp.float32)

  return schedule


def _decays(variable) -> bool:
  """Whether a variable is a weight-decayed matrix: an nnx.Param with >= 2 logical axes
  besides the layer-stacking axis (norm scales and vectors are left alone)."""
  if not isinstance(variable, nnx.Param):
    return False
  return sum(axis != _STACK_AXIS for axis in logical_axes(variable)) >= 2


def weight_decay_mask(params: nnx.State) -> nnx.State:
  """A State shaped like `params` with a Python bool in place of each Variable: True for
  the matrices that get weight decay.

  The bools replace whole Variables, so the mask is a tree prefix of `params` (and of
  gradients and optimizer moments): optax.masked maps it over them without comparing
  Variable metadata, and it stays valid when sharding metadata is added to the params.
  Works on abstract params (ShapeDtypeStruct values) too; only metadata is read.
  """
  return jax.tree.map(_decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(opt_cfg, total_steps: int, params: nnx.State, trainable=None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping (skipped when clip <= 0) followed by AdamW with the configured
  schedule and decoupled weight decay on matrices only (`weight_decay_mask`). `trainable`
  (a bool per Variable, dsjax.train.dsa_stages.trainable_mask) freezes the False ones: zero
  updates, no weight decay, no optimizer state.

  Use as opt.init(params) and opt.update(grads, opt_state, params) with `params` and `grads`
  nnx.States of the same structure. The first moment is kept in float32; the second has the
  dtype of the params, float32 for the usual fp32 master weights (model.param_dtype).
  """
  for key in ("b1", "b2"):
    if not 0.0 <= getattr(opt_cfg, key) < 1.0:
      raise _config_error(key, getattr(opt_cfg, key), "must lie in [0, 1)")
  if opt_cfg.eps < 0:
    raise _config_error("eps", opt_cfg.eps, "must be >= 0")
  if opt_cfg.weight_decay < 0:
    raise _config_error("weight_decay", opt_cfg.weight_decay, "must be >= 0 (0 disables it)")
  adamw = optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1,
                      b2=opt_cfg.b2, eps=opt_cfg.eps, mu_dtype=jnp.float32,
                      weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask(params))
  optimizer = adamw if opt_cfg.clip <= 0 else optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip), adamw)
  if trainable is None:
    return optimizer
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
