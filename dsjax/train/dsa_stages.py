"""DeepSeek-V3.2's two DSA training stages (train.dsa_stage), as the train step and the
optimizer see them.

  "dense_warmup": dense attention; only the lightning indexers train, on their KL loss
                  against the main attention's distribution (the rest is frozen: no update,
                  no weight decay, no router-bias moves);
  "sparse":       sparse attention; every parameter trains, the indexers on their KL loss over
                  the selected keys only, the rest on the LM loss only (the indexers' inputs
                  are detached in dsjax.model.dsa);
  "off":          the plain LM objective; the indexers, which no loss reaches, are frozen
                  (otherwise weight decay alone would shrink them).
"""

from __future__ import annotations

import jax
from flax import nnx

from dsjax.config import ModelConfig

DSA_TRAIN_STAGES = ("off", "dense_warmup", "sparse")
INDEXER = "indexer"  # the parameter-path key of every DSA layer's lightning indexer


def dsa_stage(train) -> str:
  """The train section's dsa_stage ("off" where a section predates it)."""
  return train.get("dsa_stage", "off")


def check_stage(stage: str, model_cfg: ModelConfig) -> None:
  """A clear error for an unknown stage or a stage on a model without DSA layers."""
  if stage not in DSA_TRAIN_STAGES:
    raise ValueError(f"train.dsa_stage={stage!r}; use one of {DSA_TRAIN_STAGES}.")
  if stage != "off" and not any(s.attention == "dsa" for s in model_cfg.layer_specs):
    raise ValueError(f"train.dsa_stage={stage!r} trains DSA's indexers, but the model has no "
                     "DSA layer; set --config.model.attention=dsa or --config.train.dsa_stage=off.")


def model_stage(stage: str) -> str | None:
  """The stage as the model's RunOptions.dsa_stage (None: the inference forward)."""
  return None if stage == "off" else stage


def _is_indexer(path) -> bool:
  return any(getattr(key, "key", key) == INDEXER for key in path)


def trainable_mask(params: nnx.State, stage: str):
  """A tree prefix of `params` with a bool per Variable: which parameters the optimizer
  updates in `stage`; None when all of them are (no DSA indexer, or the sparse stage)."""
  indexer = jax.tree_util.tree_map_with_path(
      lambda path, _: _is_indexer(path), params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  flags = jax.tree.leaves(indexer)
  if stage == "sparse" or not any(flags):
    return None
  if stage == "dense_warmup":
    return indexer
  return jax.tree.map(lambda f: not f, indexer)
