"""Train a dsjax model.

  python train.py                                   # configs/tiny.py on the embedded corpus
  python train.py --config=configs/tiny.py --workdir=runs/exp --config.train.steps=500
  python train.py --config.mesh.fsdp=8 --config.model.dtype=bfloat16

Re-running the same command with the same --workdir resumes from its latest checkpoint.
Bad settings stop with one `error:` line before anything in the workdir changes.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, TensorBoard); "
                    "default: runs/<config file name>.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of setting errors.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs (Orbax, Grain).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  # Imported here so that --help is fast and XLA flags set by the caller apply.
  from dsjax.train.loop import TrainingDiverged, train
  config_path = config_flags.get_config_filename(FLAGS["config"])
  workdir = FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path))[0])
  try:
    train(FLAGS.config, workdir)
  except (ValueError, FileNotFoundError, TrainingDiverged) as error:
    if FLAGS.traceback:
      raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
