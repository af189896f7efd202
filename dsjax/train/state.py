"""Creating the train state: abstract (for shardings and restore targets), freshly initialised
on the mesh, or initialised from a converted HF / Orbax checkpoint (fine-tuning)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.param import NON_PARAMS
from dsjax.model.transformer import Transformer
from dsjax.train.step import TrainState

# Fields that say how the model runs, not what it is: a fine-tuning run may change them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


def split_model(model: Transformer):
  """(graphdef, params, router_bias) of `model`: its nnx.Param variables, and the rest of its
  state (dsjax.model.param.NON_PARAMS: RouterBias variables, which the sign rule updates, and
  FrozenTables such as hash routing's tid2eid, which nothing updates). The rest stays out of
  gradients and the optimizer; TrainState.router_bias holds it."""
  return nnx.split(model, nnx.Param, NON_PARAMS)


def _new_state(model: Transformer, optimizer, seed) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, router_bias = split_model(model)
  zero = jnp.zeros((), jnp.int32)
  return graphdef, TrainState(step=zero, params=params, router_bias=router_bias,
                              opt_state=optimizer.init(params), rng=jax.random.key(seed),
                              bad_steps=zero, skipped=zero)


def abstract_train_state(cfg: ModelConfig, optimizer, seed: int):
  """(graphdef, TrainState of ShapeDtypeStructs) without allocating anything."""
  out = {}

  def build():
    graphdef, state = _new_state(Transformer(cfg, rngs=nnx.Rngs(seed)), optimizer, seed)
    out["graphdef"] = graphdef
    return state
  abstract = jax.eval_shape(build)
  return out["graphdef"], abstract


def init_train_state(cfg: ModelConfig, optimizer, seed: int, shardings) -> TrainState:
  """A fresh TrainState created directly with `shardings` (compiled: eager init is slow)."""
  return jax.jit(lambda: _new_state(Transformer(cfg, rngs=nnx.Rngs(seed)), optimizer, seed)[1],
                 out_shardings=shardings)()


def _checkpoint_format(path: str) -> str:
  """"orbax" for a dsjax Orbax model directory (model_config.json), "hf" for a HuggingFace
  checkpoint (config.json)."""
  from dsjax.checkpoint.orbax_io import CONFIG_FILE
  if not os.path.isdir(path):
    raise FileNotFoundError(f"train.init_from={path!r} does not exist; set "
                            "--config.train.init_from to a checkpoint directory.")
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return "orbax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise FileNotFoundError(f"train.init_from={path!r} is neither a HuggingFace checkpoint "
                          "(config.json) nor a dsjax Orbax model (model_config.json); point "
                          "--config.train.init_from at a converted checkpoint directory.")


def checkpoint_model_config(path: str) -> ModelConfig:
  """The ModelConfig stored in a HF checkpoint (config.json) or a dsjax Orbax model directory
  (model_config.json)."""
  from dsjax.checkpoint.hf_checkpoint import read_hf_config
  from dsjax.checkpoint.hf_config import from_hf
  from dsjax.checkpoint.orbax_io import CONFIG_FILE
  if _checkpoint_format(path) == "orbax":
    return ModelConfig.from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))
  return from_hf(read_hf_config(path))


def _runtime_overrides(cfg: ModelConfig) -> dict:
  """`cfg`'s RUNTIME_FIELDS and max_position_embeddings: what a fine-tuning run may change."""
  return {**{f: getattr(cfg, f) for f in RUNTIME_FIELDS},
          "max_position_embeddings": cfg.max_position_embeddings}


def check_same_architecture(expected: ModelConfig, found: ModelConfig, path: str) -> None:
  """Raises ValueError listing the fields where the checkpoint's model differs."""
  found = found.replace(**_runtime_overrides(expected))
  if found.moe is not None and expected.moe is not None:
    found = found.replace(moe=dataclasses.replace(
        found.moe, impl=expected.moe.impl, capacity_factor=expected.moe.capacity_factor))
  found = found.replace(mla=dataclasses.replace(found.mla,
                                                attention_impl=expected.mla.attention_impl))
  a, b = expected.to_dict(), found.to_dict()
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  if diff:
    details = "; ".join(f"{k}: config {a.get(k)!r} vs checkpoint {b.get(k)!r}" for k in diff)
    raise ValueError(f"train.init_from={path!r} holds a different model ({details}); use the "
                     "experiment config that matches the checkpoint.")


def load_pretrained(path: str, cfg: ModelConfig) -> Transformer:
  """The model of checkpoint `path`, run with `cfg`'s runtime fields (dtype, scan, remat)."""
  path = os.fspath(path)
  check_same_architecture(cfg, checkpoint_model_config(path), path)
  if _checkpoint_format(path) == "hf":
    from dsjax.checkpoint.hf_checkpoint import load_hf_checkpoint
    return load_hf_checkpoint(path, dtype=jnp.dtype(cfg.param_dtype),
                              config_overrides=_runtime_overrides(cfg))
  from dsjax.checkpoint.orbax_io import load_model
  return load_model(path, config_overrides=_runtime_overrides(cfg))


def pretrained_train_state(path: str, cfg: ModelConfig, optimizer, seed: int,
                           shardings) -> TrainState:
  """A TrainState whose params and router biases come from checkpoint `path`."""
  _, state = _new_state(load_pretrained(path, cfg), optimizer, seed)
  return jax.device_put(state, shardings)
