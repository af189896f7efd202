"""Experiment configs: ml_collections `get_config()` files (configs/*.py) -> ConfigDict /
ModelConfig.

An experiment config has the keys `seed`, `model` (exactly ModelConfig's fields, with nested
`mla`, `rope` and `moe` sub-dicts; `moe` None for dense models), `train`, `optimizer`, `data`
and `mesh`. Config files build it with `experiment_config`, which fills every section with
the defaults below and the model with ModelConfig's documented defaults, so each file states
only what defines its experiment and every field is still overridable (`--config.x.y=...`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from dsjax.config import SUB_CONFIGS, ModelConfig

# Section defaults: sized for the tiny model on a 2-core CPU. Config files override them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": dict(
        steps=200, batch_size=8, seq_len=128, log_every=10, checkpoint_every=100,
        eval_every=100, eval_batches=4,
        batch_per_shard=0,       # > 0: batch_size = this x the mesh's batch split x grad_accum
        grad_accum_steps=1,      # micro-batches per step; batch_size is the global batch
        keep_checkpoints=3,      # the last K checkpoints, plus the best by eval loss
        async_checkpoint=True,
        max_bad_steps=5,         # stop after this many consecutive non-finite steps
        mtp_weight=0.3,          # lambda of the MTP loss (DeepSeek-V3: 0.3, later 0.1)
        balance_alpha=1e-4,      # sequence-wise balance loss weight (DeepSeek-V3: 1e-4)
        z_loss=0.0,              # weight of mean(logsumexp(logits)^2); 0 disables
        router_bias_update="auto",  # aux-loss-free balancing: auto (= on for sigmoid and
                                    # sqrtsoftplus routers), on, off
        router_bias_rate=1e-3,   # gamma of bias += gamma * sign(mean_load - load)
        dsa_stage="off",         # DSA models: off, dense_warmup or sparse (DeepSeek-V3.2)
        indexer_loss_weight=1.0,  # weight of the DSA indexers' KL loss in the sparse stage
        init_from="",            # HF or dsjax Orbax model dir to fine-tune from
        sample_prompt="The ",    # prompt of the sample printed at the end ("" disables)
        sample_tokens=160),
    "optimizer": dict(
        lr=3e-3, warmup_steps=20,
        schedule="deepseek_v3",  # deepseek_v3 (warm-up, constant, cosine), wsd, cosine, constant
        decay_fraction=0.3,      # deepseek_v3 / wsd: share of the steps spent decaying
        min_lr_ratio=0.1,        # final lr = lr * min_lr_ratio
        weight_decay=0.1, clip=1.0, b1=0.9, b2=0.95, eps=1e-8),
    "data": dict(
        source="default",        # default (embedded corpus), or a .txt/.jsonl/.array_record path
        tokenizer="byte",        # byte, or a HuggingFace tokenizer.json path
        text_field="text",       # JSONL / ArrayRecord JSON field holding the text
        eval_fraction=0.05,      # held-out share of the documents for eval loss
        num_workers=0,           # Grain worker processes (0: in the main process)
        shuffle=True),
    # -1: all devices not used by the other axes (at most one axis may be -1).
    "mesh": dict(data=-1, fsdp=1, expert=1, tensor=1),
}


def _model_fields(model: dict[str, Any]) -> dict[str, Any]:
  """`model` completed with ModelConfig's defaults; unknown keys are kept for from_dict to
  report."""
  full = {f.name: f.default for f in dataclasses.fields(ModelConfig)
          if f.name not in SUB_CONFIGS}
  full.update({k: v for k, v in model.items() if k not in SUB_CONFIGS})
  for key, cls in SUB_CONFIGS.items():
    # moe None: a dense model; nsa / dsa None: their defaults when attention selects them;
    # mhc None: the plain residual; v4 None: its defaults when a v4_* kind selects it.
    given = model.get(key, None if key in ("moe", "nsa", "dsa", "mhc", "v4") else {})
    full[key] = None if given is None else {**dataclasses.asdict(cls()), **given}
  return full


def experiment_config(model: dict[str, Any], *, seed: int = 0,
                      **sections: dict[str, Any]) -> ml_collections.ConfigDict:
  """An experiment ConfigDict: `model` (ModelConfig fields, nested mla/rope/moe dicts) plus
  `train`, `optimizer`, `data`, `mesh` sections, each `DEFAULTS[section]` updated by
  `sections[section]`."""
  unknown = set(sections) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"Unknown experiment sections {sorted(unknown)}; use {sorted(DEFAULTS)}.")
  cfg = {"seed": seed, "model": _model_fields(model)}
  for name, defaults in DEFAULTS.items():
    given = sections.get(name, {})
    bad = set(given) - set(defaults)
    if bad:
      raise ValueError(f"Unknown {name} keys {sorted(bad)}; use {sorted(defaults)}.")
    cfg[name] = {**defaults, **given}
  return ml_collections.ConfigDict(cfg)


def _apply_override(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ValueError(f"Override {dotted!r}: {'.'.join(parents[:i + 1])!r} is not a section "
                       "of the config; check the key.")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"Override {dotted!r}: no key {leaf!r} there; check for typos.")
  node[leaf] = value  # ConfigDict keeps the field's type (int -> float is allowed)


def load_experiment(path: str, overrides: dict[str, Any] | None = None
                    ) -> ml_collections.ConfigDict:
  """Imports the config file at `path`, calls its `get_config()` and applies `overrides`,
  a {dotted key: value} dict such as {"train.steps": 10, "model.hidden_size": 64}."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Experiment config file {path!r} does not exist.")
  name = "dsjax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path} has no get_config(); define get_config() returning an "
                     "ml_collections.ConfigDict.")
  cfg = module.get_config()
  for key, value in (overrides or {}).items():
    _apply_override(cfg, key, value)
  return cfg


def load_config(path: str) -> ModelConfig:
  """The ModelConfig of the experiment config file at `path` (e.g. "configs/tiny.py")."""
  return ModelConfig.from_dict(load_experiment(path).model.to_dict())
