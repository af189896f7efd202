"""Train a dsjax model.

  python train.py                                   # configs/tiny.py on the embedded corpus
  python train.py --config=configs/tiny.py --workdir=runs/exp --config.train.steps=500
  python train.py --config.mesh.fsdp=8 --config.model.dtype=bfloat16

  python train.py --distributed ...                 # every host of a TPU pod / SLURM job
  python train.py --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...

Re-running the same command with the same --workdir resumes from its latest readable
checkpoint. Bad settings stop with one `error:` line (on every process) before anything in the
workdir changes, as does a second run on a workdir in use.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dsjax.parallel import launch_flags

# Found from any working directory: the default is next to this file.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, TensorBoard); "
                    "default: runs/<config file name>.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of setting errors.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs (Orbax, Grain).")
# Multi-host runs; every process runs the same command.
launch_flags.define()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  # Imported here so that --help is fast and XLA flags set by the caller apply.
  from dsjax.parallel import distributed
  from dsjax.train.loop import TrainingDiverged, train
  config_path = config_flags.get_config_filename(FLAGS["config"])
  workdir = FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path))[0])
  try:
    launch_flags.initialize(FLAGS)
    train(FLAGS.config, workdir)
  except (*distributed.USER_ERRORS, TrainingDiverged) as error:
    if FLAGS.traceback:
      raise
    print(f"error: {error}", file=sys.stderr)
    distributed.exit_process(1)


if __name__ == "__main__":
  app.run(main)
