"""DeepSeekMoE layer: shared experts + routed experts with aux-loss-free bias routing.

The routing step (`route`, and the variables it reads besides the gate, `_init_selection`) is
what other routed kinds override: dsjax.model.hash_moe chooses the experts by token id."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import MOE_IMPLS, ModelConfig, MoEConfig
from dsjax.model.kinds import FeedForwardKind, TokenContext, register_ffn
from dsjax.model.mlp import MLP
from dsjax.model.param import AXES, RouterBias, normal_param
from dsjax.ops import moe_dispatch
from dsjax.ops.linear import OutMajor
from dsjax.ops.platform import target_platform
from dsjax.ops.routing import Routing, route
from dsjax.parallel import expert_parallel
from dsjax.parallel.activations import constrain


_DISPATCH = {"dense": moe_dispatch.experts_dense, "blocked": moe_dispatch.experts_blocked,
             "ragged": moe_dispatch.experts_sorted,
             "pallas": functools.partial(moe_dispatch.experts_sorted,
                                         grouped_matmul=moe_dispatch.pallas_gmm)}
# The dispatches that take output-major expert weights (dsjax.ops.linear.OutMajor) as they are.
_DISPATCH_OUT_MAJOR = {
    "dense": moe_dispatch.experts_dense_out_major,
    "blocked": functools.partial(moe_dispatch.experts_blocked, out_major=True)}


def resolve_impl(impl: str, moe: MoEConfig, tokens: int | None = None) -> str:
  """'auto' -> 'ep' (expert parallelism, dsjax.parallel.expert_parallel) when the context
  mesh has an expert axis > 1 that divides the experts and the batch axes divide the tokens;
  else 'ragged' on TPU/GPU. On CPU, where ragged_dot is emulated densely: 'dense' when every
  expert on every token costs no more rows than the block-padded sorted dispatch (few
  tokens, as in decoding), else 'blocked' (`tokens` None: a training-size batch)."""
  if impl != "auto":
    return impl
  mesh = expert_parallel.context_mesh()
  if tokens is not None and expert_parallel.expert_parallelism(
      mesh, moe.n_routed_experts, tokens) > 1:
    return "ep"
  if target_platform() != "cpu":
    return "ragged"
  if tokens is None:
    return "blocked"
  e, k = moe.n_routed_experts, moe.num_experts_per_tok
  padded_rows = tokens * k + e * moe_dispatch.default_block(tokens, k, e)
  return "dense" if tokens * e <= padded_rows else "blocked"


@register_ffn("moe")
class MoE(FeedForwardKind):
  """x [B,T,D] -> ([B,T,D], Routing over the B*T tokens)."""

  routed = True

  # Projection weights: (batch axes, input axes), see dsjax.infer.weight_layout. w2 contracts
  # experts and hidden units together: the routing weights scale the hidden units first.
  PROJECTIONS = {"w1": (1, 1), "w3": (1, 1), "w2": (0, 2)}

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    moe, d = cfg.moe, cfg.hidden_size
    e, f = moe.n_routed_experts, moe.moe_intermediate_size
    std, pdt = cfg.initializer_range, cfg.param_dtype
    self.gate = normal_param(rngs, (d, e), ("embed", "experts"), std, pdt)
    self._init_selection(cfg)
    self.w1 = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w3 = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w2 = normal_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pdt)
    self.shared_experts = nnx.data(
        MLP(d, moe.n_shared_experts * f, std=std, dtype=cfg.dtype, param_dtype=pdt, rngs=rngs,
            swiglu_limit=moe.swiglu_limit) if moe.n_shared_experts else None)
    self.moe = moe
    self.dtype = cfg.dtype

  def _init_selection(self, cfg: ModelConfig) -> None:
    """The variables that choose experts besides the gate: the load-balancing bias [E]."""
    self.router_bias = RouterBias(jnp.zeros((cfg.moe.n_routed_experts,), jnp.float32),
                                  **{AXES: ("experts",)})

  @classmethod
  def create(cls, cfg: ModelConfig, *, rngs: nnx.Rngs) -> "MoE":
    return cls(cfg, rngs=rngs)

  def feed_forward(self, x, tokens, options) -> tuple[jax.Array, Routing]:
    return self(x, options.moe_impl, tokens)

  def router_logits(self, x: jax.Array) -> jax.Array:
    """float32[M,E] router logits of x [M,D] (float32 as in DeepSeek's reference)."""
    return jnp.einsum("MD,DE->ME", x.astype(jnp.float32), self.gate[...].astype(jnp.float32))

  def route(self, x: jax.Array, tokens: TokenContext | None = None) -> Routing:
    """Routing of x [M,D] (M = B*T tokens of `tokens`, which the top-k routing ignores)."""
    return route(self.router_logits(x), self.router_bias[...], self.moe)

  def __call__(self, x: jax.Array, impl: str | None = None,
               tokens: TokenContext | None = None) -> tuple[jax.Array, Routing]:
    """x [B,T,D] of `tokens` (ids [B,T]; needed by routings that read them)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    # Rows of the flattened tokens keep the batch split: the stacked routing outputs
    # ([L, B*T, E] scores for the balance loss) must not be gathered onto every device.
    routing = Routing(*(constrain(a, ("batch", None)) for a in self.route(flat, tokens)[:3]))
    w1, w3, w2 = (w[...].astype(self.dtype) for w in (self.w1, self.w3, self.w2))
    impl = resolve_impl(impl or self.moe.impl, self.moe, b * t)
    if impl == "ep":
      y, dropped = expert_parallel.expert_parallel_moe(
          flat, routing.expert_ids, routing.expert_weights,
          *(w.in_major() if isinstance(w, OutMajor) else w for w in (w1, w3, w2)),
          capacity_factor=self.moe.capacity_factor, swiglu_limit=self.moe.swiglu_limit)
      return self._with_shared(y.reshape(b, t, d).astype(x.dtype), x), routing._replace(
          dropped=dropped)
    if impl not in _DISPATCH:
      raise ValueError(f"moe impl={impl!r}; use one of {MOE_IMPLS}.")
    dispatch = _DISPATCH[impl]
    if isinstance(w1, OutMajor):
      if impl in _DISPATCH_OUT_MAJOR:
        dispatch, (w1, w3, w2) = _DISPATCH_OUT_MAJOR[impl], (w.t for w in (w1, w3, w2))
      else:
        w1, w3, w2 = (w.in_major() for w in (w1, w3, w2))
    y = dispatch(flat, routing.expert_ids, routing.expert_weights, w1, w3, w2,
                 swiglu_limit=self.moe.swiglu_limit)
    return self._with_shared(y.reshape(b, t, d).astype(x.dtype), x), routing

  def _with_shared(self, y: jax.Array, x: jax.Array) -> jax.Array:
    return y if self.shared_experts is None else y + self.shared_experts(x)
