"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts"; DeepSeek-V3 Sec. 2.1.2).

After each step every MoE layer's router bias moves each expert towards the mean load:
bias_i += gamma * sign(mean_load - load_i). The bias changes which experts are chosen, never
their weights, and it is updated outside the optimizer (no gradient, no weight decay).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.param import RouterBias


def bias_update_enabled(setting: str, model_cfg: ModelConfig) -> bool:
  """`train.router_bias_update`: "auto" is on for sigmoid- and sqrtsoftplus-scored routers
  (DeepSeek-V3 and V4 style, which have a selection bias), off for softmax (V2) ones; "on" /
  "off" force it."""
  if setting not in ("auto", "on", "off"):
    raise ValueError(f"train.router_bias_update={setting!r}; use 'auto', 'on' or 'off'.")
  if model_cfg.moe is None:
    return False
  if setting == "auto":
    return model_cfg.moe.scoring_func in ("sigmoid", "sqrtsoftplus")
  return setting == "on"


def sign_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """bias[..., E] + rate * sign(mean(load) - load), per layer (the last axis is experts)."""
  mean = jnp.mean(load, axis=-1, keepdims=True)
  return bias + rate * jnp.sign(mean - load).astype(bias.dtype)


def update_router_biases(router_bias: nnx.State, main_load: jax.Array | None,
                         mtp_loads: list[jax.Array], rate: float,
                         rows: dict[tuple, tuple[int, int]]) -> nnx.State:
  """New router-bias state. `router_bias` is the model's non-parameter state (TrainState's):
  the RouterBias of each stack's MoE layers ([L, E] under the stack's Block path) and of each
  MTP module's MoE layer ([E] under `mtp/k`), which move; other variables (FrozenTables, e.g.
  hash layers' tid2eid; hash layers have no bias) stay as they are. `main_load` float[L_moe, E]
  counts the tokens routed to each expert of the main model's routed layers (hash layers
  included) in this step, in the model's routing order; `rows` maps each Block path to
  its (first row, rows) there (dsjax.model.pattern.routed_rows); `mtp_loads[k]` float[E]."""
  def update(path, variable):
    if not isinstance(variable, RouterBias):
      return variable
    keys = tuple(getattr(k, "key", k) for k in path)
    if keys[0] == "mtp":
      load = mtp_loads[int(keys[1])]
    else:
      block = next((p for p in rows if keys[:len(p)] == p), None)
      if block is None:
        raise ValueError(f"Router bias at unexpected path {path}; it is in no MoE stack of "
                         "the layer pattern.")
      first, count = rows[block]
      load = main_load[first:first + count]
    return variable.replace(value=sign_update(variable.get_value(), load, rate))
  return nnx.map_state(update, router_bias)
