"""Compile an experiment's step ahead of time for a TPU slice or GPU cluster and report what
it needs per device; no TPU or GPU needed.

  python -m dsjax.compile --config=configs/deepseek_v2_lite.py --topology=v5p:4x4x4
  python -m dsjax.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8 \\
      --config.train.batch_per_shard=1 --json=v3.json
  python -m dsjax.compile --config=configs/deepseek_v3_671b.py --topology=v5p:4x4x4 \\
      --step=decode --batch=64 --context=32768

Exit 0 when the step fits the chips' HBM; 1 with one `error:` line when it does not (what it
needs, what dominates, which knobs to try), or for a bad topology, mesh or setting.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice (v5p:2x2x1, v6e:16x16, tpu7x:2x2x1, ...) or "
                    "GPU cluster (h100:8 for one host of 8 GPUs, h100:8x4 for four).")
flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice, over the data network).")
flags.DEFINE_enum("step", "train", ["train", "prefill", "decode"], "The step to compile.")
flags.DEFINE_integer("batch", None, "Serving: rows (default: one per batch shard).")
flags.DEFINE_integer("context", None, "Serving: prompt tokens for prefill, cached tokens for "
                     "decode (default: train.seq_len).")
flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.DEFINE_bool("traceback", False, "Show the full traceback of errors.")
flags.mark_flag_as_required("topology")
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
  if FLAGS.traceback:
    raise
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from dsjax.compile import environment
  environment.prepare()
  from dsjax.compile.report import compile_program, error_line, format_report
  from dsjax.compile.steps import build_program
  from dsjax.compile.topology import get_topology
  try:
    topology = get_topology(FLAGS.topology, FLAGS.num_slices)
    program = build_program(FLAGS.config, topology.devices, FLAGS.step, FLAGS.batch,
                            FLAGS.context)
    report = compile_program(program, topology)
  except (ValueError, FileNotFoundError) as error:
    _fail(str(error))
  except Exception as error:  # the compiler's refusal (Mosaic, XLA): its first line
    first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    _fail(f"compiling the {FLAGS.step} step for {FLAGS.topology} failed: "
          f"{type(error).__name__}: {first} (--traceback shows where)")
  print(format_report(report))
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report.to_json(), f, indent=2)
      f.write("\n")
  if not report.fits:
    print(f"error: {error_line(report)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
