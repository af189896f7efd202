"""configs/tiny.py with DeepSeek-V4's residual: mHC's 4 residual streams, mixed around every
sublayer by Sinkhorn-projected doubly-stochastic matrices (docs/v4.md). Everything else is the
tiny DeepSeek-V3-style MoE model, so its loss curve sits beside the plain residual's."""

from pathlib import Path

from dsjax.experiment import load_experiment


def get_config():
  cfg = load_experiment(Path(__file__).with_name("tiny.py"))  # configs are not a package
  cfg.model.mhc = dict(hc_mult=4, sinkhorn_iters=20, eps=1e-6, init_scale=0.01)
  return cfg
