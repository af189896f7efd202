"""Orbax checkpoints of a dsjax model: `model_config.json` + an Orbax `state/` directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model.transformer import Transformer

CONFIG_FILE = "model_config.json"
STATE_DIR = "state"


def save_model(model: Transformer, directory: str | os.PathLike) -> None:
  """Writes the model's config and all its variables (params and router biases)."""
  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / STATE_DIR, nnx.to_pure_dict(nnx.state(model)), force=True)
  checkpointer.wait_until_finished()
  (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def load_model(directory: str | os.PathLike, config_overrides: dict | None = None) -> Transformer:
  """A Transformer restored from `save_model`'s directory."""
  directory = Path(directory).absolute()
  config_file = directory / CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} is missing: {directory} is not a dsjax Orbax model "
                            "directory (create one with `python -m dsjax.checkpoint.convert`).")
  cfg = ModelConfig.from_dict(json.loads(config_file.read_text()))
  cfg = cfg.replace(**(config_overrides or {}))
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
  restored = ocp.StandardCheckpointer().restore(directory / STATE_DIR, target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
