"""Test-wide settings. XLA's CPU backend optimisation level 0 compiles the tiny test models
3-5x faster; results agree with level 2 to ~1e-6, well inside every tolerance here. The suite
runs in pytest-xdist worker processes (pyproject.toml's addopts)."""

import gc
import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

if os.environ.get("PYTEST_XDIST_WORKER"):
  # Several test processes may share one GPU: none of them takes 75% of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Deviceless TPU/GPU compilation (libtpu and the CUDA plugin come with the [test] extra): their
# environment is read once, when they load; on a machine without accelerators JAX's own
# devices stay the CPU's.
from dsjax.compile import environment  # noqa: E402

environment.prepare()

import jax  # noqa: E402  (after XLA_FLAGS, which the backend reads once)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module. XLA's CPU backend maps memory for
  each executable; the whole suite in one process otherwise grows past the kernel's
  vm.max_map_count (65530 here), and a later compilation crashes (SIGSEGV/SIGABRT)."""
  yield
  jax.clear_caches()
  gc.collect()
