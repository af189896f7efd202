"""The multi-host flags of train.py and infer.py (jax.distributed.initialize's argument names),
defined without importing JAX so that --help stays fast.

  launch_flags.define()              # at import time, next to the CLI's other flags
  launch_flags.initialize(FLAGS)     # in main, before anything touches JAX's devices
"""

from absl import flags


def define() -> None:
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-host runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_bool("distributed", False, "Multi-host run on a cluster JAX detects (TPU pod, "
                    "SLURM, Open MPI): jax.distributed.initialize() finds the rest.")
  flags.DEFINE_integer("initialization_timeout", 300, "Seconds for all processes to connect.")


def initialize(values: flags.FlagValues) -> bool:
  """dsjax.parallel.distributed.initialize with the parsed flags; whether the run spans
  several processes."""
  from dsjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  return distributed.initialize(values.coordinator_address, values.num_processes,
                                values.process_id, auto=values.distributed,
                                timeout_s=values.initialization_timeout)
