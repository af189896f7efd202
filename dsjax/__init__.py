"""dsjax: DeepSeek's model family in JAX/Flax NNX.

The names below load on first use, so that a command line (train.py, infer.py) can import a
light module of the package, such as dsjax.parallel.launch_flags, before JAX is imported.
"""

import importlib

_EXPORTS = {
    "load_hf_checkpoint": "dsjax.checkpoint", "save_hf_checkpoint": "dsjax.checkpoint",
    "MLAConfig": "dsjax.config", "ModelConfig": "dsjax.config", "MoEConfig": "dsjax.config",
    "NSAConfig": "dsjax.config",
    "HyperConnectionsConfig": "dsjax.config", "RopeConfig": "dsjax.config",
    "load_config": "dsjax.experiment", "load_experiment": "dsjax.experiment",
    "Generator": "dsjax.infer", "generate": "dsjax.infer",
    "ModelOutput": "dsjax.model", "Transformer": "dsjax.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'dsjax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
