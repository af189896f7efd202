"""Runs train.py, but SIGKILLs the process right after the checkpoint save of step
$DSJAX_KILL_AT_SAVE has started (the asynchronous write is still in flight)."""

import os
import runpy
import signal
import sys
from pathlib import Path

from dsjax.train.checkpointing import TrainCheckpointer

KILL_AT = int(os.environ["DSJAX_KILL_AT_SAVE"])
_save = TrainCheckpointer.save


def save_then_die(self, step, *args, **kwargs):
  started = _save(self, step, *args, **kwargs)
  if step == KILL_AT:
    print(f"killing during the save of step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  return started


TrainCheckpointer.save = save_then_die
train_py = Path(__file__).resolve().parents[2] / "train.py"
sys.argv[0] = str(train_py)
runpy.run_path(str(train_py), run_name="__main__")
