"""Which platform a computation traced now compiles for, the one rule every `auto` choice
(MoE dispatch, attention and NSA kernels, interpret mode, weight layouts) reads."""

import jax


def target_platform() -> str:
  """"tpu", "gpu" or "cpu": the platform of the default device when one is set
  (dsjax.compile's compile-only TPU/GPU devices on a CPU host), else the default backend's."""
  device = jax.config.jax_default_device
  platform = getattr(device, "platform", None) or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform
