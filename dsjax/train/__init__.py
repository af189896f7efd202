"""Training: optimizer, losses, aux-loss-free balancing, train state, the pure train step, the
loop with checkpoints and metrics. `python train.py` runs `dsjax.train.train`."""

from dsjax.train.loop import TrainingDiverged, train
from dsjax.train.setup import Run, build_run
from dsjax.train.step import StepSettings, TrainState, eval_step, train_step

__all__ = ["Run", "StepSettings", "TrainState", "TrainingDiverged", "build_run", "eval_step",
           "train", "train_step"]
