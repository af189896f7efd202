"""RMSNorm module."""

from flax import nnx

from dsjax.model.param import ones_param
from dsjax.ops.norm import rms_norm


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis; `axis_name` is the logical name of that axis."""

  def __init__(self, dim: int, eps: float, axis_name: str, dtype):
    self.weight = ones_param((dim,), (axis_name,), dtype)
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.weight[...].astype(x.dtype), self.eps)
