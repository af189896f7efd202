"""The pure train and eval steps: (state, batch) -> (state, metrics), jit-compiled by the loop.

A step computes the loss of the global batch (optionally as several micro-batches whose
gradients are summed), skips the update when the loss or gradient is not finite, applies
AdamW, and moves the router biases (aux-loss-free balancing) outside the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.model.options import RunOptions
from dsjax.model.pattern import routed_rows
from dsjax.train import loss as losses
from dsjax.train.balance import update_router_biases

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions int32[B,T]; loss_mask


class TrainState(NamedTuple):
  """Everything a resumed run needs besides the data iterator (a pytree of arrays)."""
  step: jax.Array          # int32: steps run, skipped ones included
  params: nnx.State        # nnx.Param variables (fp32 master weights)
  router_bias: nnx.State   # RouterBias variables, updated by the sign rule; FrozenTables
  opt_state: Any           # optax state of `params`
  rng: jax.Array           # typed PRNG key, for stochastic parts (sampling, future dropout)
  bad_steps: jax.Array     # int32: consecutive non-finite steps up to now
  skipped: jax.Array       # int32: non-finite steps skipped in total


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The static knobs of a train step (from the experiment's `train` section)."""
  grad_accum_steps: int = 1
  mtp_weight: float = 0.3
  balance_alpha: float = 1e-4
  z_loss: float = 0.0
  bias_update: bool = True
  bias_rate: float = 1e-3
  moe_impl: str | None = None
  dsa_stage: str | None = None      # RunOptions.dsa_stage (dsjax.train.dsa_stages)
  indexer_loss_weight: float = 1.0


class _Weights(NamedTuple):
  """Token counts of the whole batch, so micro-batch losses add up to the batch mean."""
  main: jax.Array
  mtp: tuple[jax.Array, ...]
  micro_batches: int


def _batch_weights(batch: Batch, depths: int, micro_batches: int) -> _Weights:
  mtp = tuple(jnp.maximum(jnp.sum(losses.mtp_targets(batch["targets"], batch["segment_ids"],
                                                     batch["loss_mask"], k)[1]), 1.0)
              for k in range(1, depths + 1))
  return _Weights(jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0), mtp, micro_batches)


def _token_mask(segment_ids: jax.Array) -> jax.Array:
  """float[B*T]: 1 for real tokens, 0 for padding, in the routing's flattened token order."""
  return (segment_ids > 0).reshape(-1).astype(jnp.float32)


def _routing_terms(routing, segment_ids: jax.Array, moe, s: StepSettings):
  """(balance loss summed over layers, expert load [L,E]) of one routing [L, B*T, ...]."""
  token_mask = _token_mask(segment_ids)
  load = losses.expert_load(routing.expert_ids, moe.n_routed_experts, token_mask)
  if not s.balance_alpha:
    return jnp.zeros(()), load
  balance = losses.sequence_balance_loss(routing.scores, routing.expert_ids, segment_ids,
                                         moe.num_experts_per_tok, token_mask)
  return jnp.sum(balance), load


def _micro_loss(params, router_bias, graphdef, batch: Batch, w: _Weights, s: StepSettings):
  """Scalar loss of one micro-batch (scaled so micro-batches sum to the batch loss) and aux."""
  model = nnx.merge(graphdef, params, router_bias)
  options = RunOptions(moe_impl=s.moe_impl, dsa_stage=s.dsa_stage)
  out = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                      options=options)
  ce = losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
  aux = {"loss": ce.loss_sum / w.main, "z_loss": ce.z_sum / w.main}
  total = aux["loss"] + s.z_loss * aux["z_loss"]
  moe = model.config.moe
  loads, balance = {}, jnp.zeros(())
  if out.routing is not None:
    balance, loads["main"] = _routing_terms(out.routing, batch["segment_ids"], moe, s)
    if out.routing.dropped is not None:  # expert parallelism with a capacity factor
      aux["moe_dropped_fraction"] = jnp.mean(out.routing.dropped) / w.micro_batches
  indexer_kl = [out.attention_losses["indexer_kl"]] if "indexer_kl" in out.attention_losses else []
  if len(w.mtp):
    mtp_loss = jnp.zeros(())
    outputs = model.mtp_forward(batch["inputs"], out.hidden, batch["positions"],
                                batch["segment_ids"], options=options)
    for k, depth in enumerate(outputs, start=1):
      targets, mask = losses.mtp_targets(batch["targets"], batch["segment_ids"],
                                         batch["loss_mask"], k)
      mtp_loss += losses.cross_entropy(depth.logits, targets, mask).loss_sum / w.mtp[k - 1]
      if "indexer_kl" in depth.attention_losses:
        indexer_kl.append(depth.attention_losses["indexer_kl"])
      if depth.routing is not None:  # the module's single MoE layer: load [E], no balance loss
        loads[f"mtp{k - 1}"] = losses.expert_load(
            depth.routing.expert_ids, moe.n_routed_experts,
            _token_mask(batch["segment_ids"][:, k:]))[0]
    aux["mtp_loss"] = mtp_loss / len(w.mtp)
    total += s.mtp_weight * aux["mtp_loss"]
  aux["balance_loss"] = balance / w.micro_batches
  total += s.balance_alpha * aux["balance_loss"]
  if indexer_kl:  # mean over the DSA layers, MTP modules' included
    aux["indexer_kl"] = jnp.mean(jnp.concatenate(indexer_kl)) / w.micro_batches
    # the warm-up trains the indexers alone; the LM terms stay as metrics
    total = (aux["indexer_kl"] if s.dsa_stage == "dense_warmup"
             else total + s.indexer_loss_weight * aux["indexer_kl"])
  return total, (aux, loads)


def _split_micro(batch: Batch, n: int) -> Batch:
  return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def _loss_and_grads(state: TrainState, graphdef, batch: Batch, s: StepSettings, depths: int):
  """Summed (loss, aux, loads) and gradients over the micro-batches of `batch`."""
  n = s.grad_accum_steps
  w = _batch_weights(batch, depths, n)
  grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)
  if n == 1:
    (total, (aux, loads)), grads = grad_fn(state.params, state.router_bias, graphdef, batch, w, s)
    return total, aux, loads, grads

  def body(carry, micro):
    (total, (aux, loads)), grads = grad_fn(state.params, state.router_bias, graphdef, micro, w, s)
    return jax.tree.map(jnp.add, carry, (total, aux, loads, grads)), None

  micro = _split_micro(batch, n)
  first = jax.tree.map(lambda v: v[0], micro)
  shapes = jax.eval_shape(lambda: grad_fn(state.params, state.router_bias, graphdef, first, w, s))
  (total, (aux, loads)), grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  (total, aux, loads, grads), _ = jax.lax.scan(body, (total, aux, loads, grads), micro)
  return total, aux, loads, grads


def _where(flag: jax.Array, new, old):
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def train_step(state: TrainState, batch: Batch, *, graphdef, optimizer, schedule,
               settings: StepSettings) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on the global `batch` (all arrays [B, T])."""
  model = nnx.merge(graphdef, state.params, state.router_bias)
  depths = len(model.mtp)
  total, aux, loads, grads = _loss_and_grads(state, graphdef, batch, settings, depths)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  router_bias = state.router_bias
  if settings.bias_update and "main" in loads:
    mtp_loads = [loads[f"mtp{k}"] for k in range(depths) if f"mtp{k}" in loads]
    router_bias = update_router_biases(router_bias, loads["main"], mtp_loads, settings.bias_rate,
                                       routed_rows(model.config))
  params, opt_state, router_bias = _where(finite, (params, opt_state, router_bias),
                                          (state.params, state.opt_state, state.router_bias))
  new_state = TrainState(
      step=state.step + 1, params=params, router_bias=router_bias, opt_state=opt_state,
      rng=state.rng, bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
      skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = dict(aux, total_loss=total, grad_norm=grad_norm, finite=finite,
                 lr=schedule(state.step - state.skipped), tokens=jnp.sum(batch["loss_mask"]))
  if "main" in loads:
    metrics["expert_imbalance"] = losses.load_imbalance(loads["main"])
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, graphdef, moe_impl: str | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed next-token loss, token count, correctly predicted (argmax) tokens) of `batch`
  under the current parameters, over its loss-bearing positions."""
  model = nnx.merge(graphdef, state.params, state.router_bias)
  logits = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                         moe_impl).logits
  ce = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
  hits = (jnp.argmax(logits, axis=-1) == batch["targets"]) & (batch["loss_mask"] != 0)
  return ce.loss_sum, ce.weight_sum, jnp.sum(hits.astype(jnp.float32))
