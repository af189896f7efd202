"""Process environment for ahead-of-time compilation without the hardware.

libtpu reads its settings from the environment once, when it is first loaded, and the CUDA
plugin checks for a driver when JAX discovers it. `prepare()` must therefore run before JAX
creates any backend: the CLI calls it before importing jax, the test suite from conftest.py.
"""

from __future__ import annotations

import os
import tempfile

# libtpu on a machine that is not a TPU VM: no metadata server to ask (its queries time out
# and print warnings), one local "worker", and several processes may load it at once
# (pytest-xdist workers, a CLI beside a test run).
_TPU_DEFAULTS = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_STDERR_LOG_LEVEL": "3",
    "TPU_MIN_LOG_LEVEL": "3",
}


def has_accelerator() -> bool:
  """Whether this machine has a TPU or an NVIDIA GPU attached (device files present)."""
  if os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia"):
    return True
  dev = "/dev"
  try:
    names = os.listdir(dev)
  except OSError:
    return False
  return any(name.startswith("accel") for name in names)  # TPU VMs: /dev/accel0, ...


def prepare(log_dir: str | None = None) -> None:
  """Sets (without overriding what the caller set) the environment for deviceless TPU and GPU
  compilation. On a machine without accelerators JAX's own devices are the CPU's
  (JAX_PLATFORMS=cpu), so that neither libtpu nor the CUDA plugin tries to open hardware;
  compile-only TPU/GPU devices come from `dsjax.compile.topology` all the same."""
  if not has_accelerator():
    for key, value in _TPU_DEFAULTS.items():
      os.environ.setdefault(key, value)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import sys
    if "jax" in sys.modules:  # jax read JAX_PLATFORMS at import; its backends start later
      import jax
      if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
  # libtpu writes its logs to /tmp/tpu_logs by default; keep them in one place we choose.
  os.environ.setdefault("TPU_LOG_DIR", log_dir or os.path.join(tempfile.gettempdir(),
                                                               "dsjax_tpu_logs"))
