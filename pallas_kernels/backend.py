"""Which backend's kernel runs: the same rule for every kernel family."""

import jax

BACKENDS = ("tpu", "gpu")


def resolve_backend(backend: str | None, interpret: bool, kernel: str,
                    cpu_alternative: str) -> str:
  """'tpu' or 'gpu': `backend` when given, else this machine's. On CPU only interpret mode can
  run a kernel; it defaults to the TPU kernel, whose interpreter also checks that every block
  index, DMA and SMEM read is in bounds. `kernel` and `cpu_alternative` name the operation
  and what to use on CPU instead, for the error message."""
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"backend={backend!r}; use one of {BACKENDS} (or None for this "
                       "machine's).")
    return backend
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if interpret:
    return "tpu"
  raise ValueError(f"{kernel} has kernels for TPU and GPU, not {platform!r}: pass "
                   f"interpret=True (slow; for tests) or use {cpu_alternative}.")
