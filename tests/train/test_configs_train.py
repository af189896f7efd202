"""Every experiment config's training sections validate: schedule, optimizer, loss and
balancing settings, and the mesh on 8 devices."""

import pytest

from dsjax.config import ModelConfig
from dsjax.experiment import load_experiment
from dsjax.parallel.mesh import mesh_shape
from dsjax.train.optimizer import learning_rate_schedule
from dsjax.train.setup import step_settings
from tests.test_configs_load import CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_training_sections_validate(path):
  cfg = load_experiment(str(path))
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
  assert float(schedule(cfg.optimizer.warmup_steps)) == pytest.approx(cfg.optimizer.lr)
  settings = step_settings(cfg, model_cfg)
  # Aux-loss-free balancing is on for the routers DeepSeek trains with a selection bias.
  biased = model_cfg.moe is not None and model_cfg.moe.scoring_func in ("sigmoid", "sqrtsoftplus")
  assert settings.bias_update == biased
  shape = mesh_shape(cfg.mesh, 8)
  assert shape["data"] * shape["fsdp"] * shape["expert"] * shape["tensor"] == 8
