"""The real steps of an experiment as compile-ready programs for a topology: the train step
(optimizer, remat policy, micro-batches and mesh from the config) and the serving steps
(prefill of a batch of prompts into the latent cache, one decode step over that cache).

A Program pairs a jitted function with abstract arguments (ShapeDtypeStructs carrying their
NamedShardings on the topology's devices) and the analytic work of one call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsjax.config import ModelConfig
from dsjax.infer.generation import _decode_step, _prefill
from dsjax.infer.sampling import SamplingParams
from dsjax.model.transformer import Transformer
from dsjax.parallel.activations import under_mesh
from dsjax.parallel.mesh import BATCH_AXES, batch_parallelism, make_mesh, tree_shardings
from dsjax.train.flops import active_matmul_params, train_flops_per_token
from dsjax.train.setup import build_steps

STEPS = ("train", "prefill", "decode")


@dataclasses.dataclass
class Program:
  """One compiled entry point: `jitted(*args)`. `groups` names subtrees of args (parameters,
  optimizer state, cache, ...) for the per-device memory report."""
  step: str
  jitted: Any
  args: tuple
  mesh: Mesh
  groups: dict[str, Any]
  batch: int
  seq_len: int
  tokens: int             # tokens processed per call
  flops: float            # analytic FLOPs per call (the whole mesh)
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _rows_sharding(mesh: Mesh, rows: int, ndim: int) -> NamedSharding:
  """A [rows, ...] array split over the batch axes, or replicated when they do not divide
  rows."""
  axes = BATCH_AXES if rows % batch_parallelism(mesh) == 0 else None
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def abstract_batch(batch: int, seq_len: int, sharding: NamedSharding) -> dict[str, Any]:
  """The train step's batch as ShapeDtypeStructs (dsjax.data.packing's layout)."""
  ints = ("inputs", "targets", "segment_ids", "positions")
  spec = {name: jnp.int32 for name in ints} | {"loss_mask": jnp.float32}
  return {name: jax.ShapeDtypeStruct((batch, seq_len), dtype, sharding=sharding)
          for name, dtype in spec.items()}


def train_program(cfg: ml_collections.ConfigDict, devices) -> Program:
  """The experiment's train step on `devices` (validated as train.py validates it)."""
  steps = build_steps(cfg, devices)
  t = cfg.train
  batch = abstract_batch(t.batch_size, t.seq_len, steps.batch_sharding)
  state = steps.abstract_state
  tokens = t.batch_size * t.seq_len
  flops = train_flops_per_token(state.params, steps.model_cfg, t.seq_len) * tokens
  groups = {"parameters": (state.params, state.router_bias), "optimizer state": state.opt_state,
            "batch": batch}
  settings = dict(remat_policy=steps.model_cfg.remat_policy, grad_accum_steps=t.grad_accum_steps,
                  dtype=steps.model_cfg.dtype, param_dtype=steps.model_cfg.param_dtype)
  return Program("train", steps.train_step, (state, batch), steps.mesh, groups, t.batch_size,
                 t.seq_len, tokens, flops, settings)


def _serving_model(cfg: ml_collections.ConfigDict, mesh: Mesh):
  """(ModelConfig, graphdef, abstract sharded state) of the model as served: parameters stored
  in the compute dtype (as dsjax.load_hf_checkpoint(dtype=bfloat16) gives them)."""
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  model_cfg = model_cfg.replace(param_dtype=model_cfg.dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  return model_cfg, graphdef, _with_shardings(state, tree_shardings(state, mesh))


def _abstract_key():
  return jax.eval_shape(lambda: jax.random.key(0))


def _forward_flops(state, model_cfg: ModelConfig, seq_len: int, tokens: int) -> float:
  return train_flops_per_token(state, model_cfg, seq_len) / 3 * tokens


def _decode_flops(state, model_cfg: ModelConfig, context: int, rows: int) -> float:
  """Matmuls over the active parameters plus absorbed attention over `context` cached
  latents: logits over C + R dims and values over C, per head and layer."""
  mla = model_cfg.mla
  layers = model_cfg.num_hidden_layers
  attention = 2 * layers * model_cfg.num_attention_heads * context * (
      2 * mla.kv_lora_rank + mla.qk_rope_head_dim)
  return (2 * active_matmul_params(state, model_cfg) + attention) * rows


def serving_program(cfg: ml_collections.ConfigDict, devices, step: str, batch: int,
                    context: int) -> Program:
  """Prefill of `batch` prompts of `context` tokens into a cache of `context` slots, or one
  greedy decode step of `batch` rows over such a cache (stacked layers, scanned)."""
  if batch < 1 or context < 2:
    raise ValueError(f"batch={batch}, context={context}: serving needs batch >= 1 and "
                     "context >= 2 tokens.")
  mesh = make_mesh(cfg.mesh, devices)
  model_cfg, graphdef, state = _serving_model(cfg, mesh)
  if context > model_cfg.max_position_embeddings:
    raise ValueError(f"context={context} exceeds the model's max_position_embeddings="
                     f"{model_cfg.max_position_embeddings}; lower --context.")
  greedy = SamplingParams()
  rows = _rows_sharding(mesh, batch, 2)
  ids = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=rows)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=_rows_sharding(mesh, batch, 1))
  prefill = functools.partial(_prefill, graphdef, slots=context, sampling=greedy,
                              moe_impl=None, draft=False, layout="stacked")
  settings = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, context=context)
  if step == "prefill":
    jitted = jax.jit(under_mesh(prefill, mesh))
    args = (state, ids, lengths, _abstract_key())
    flops = _forward_flops(state, model_cfg, context, batch * context)
    groups = {"parameters": state}
    return Program("prefill", jitted, args, mesh, groups, batch, context, batch * context,
                   flops, settings)
  cache = jax.eval_shape(prefill, state, ids, lengths, _abstract_key())[2]
  cache = _with_shardings(cache, jax.tree.map(lambda a: _cache_sharding(mesh, a, batch), cache))
  token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=_rows_sharding(mesh, batch, 1))
  decode = functools.partial(_decode_step, graphdef, sampling=greedy, attn_impl="absorb",
                             moe_impl=None)
  jitted = jax.jit(under_mesh(decode, mesh), donate_argnums=(1,))
  args = (state, cache, token, token, _abstract_key(), jax.ShapeDtypeStruct((), jnp.int32))
  flops = _decode_flops(state, model_cfg, context, batch)
  return Program("decode", jitted, args, mesh, {"parameters": state, "cache": cache}, batch,
                 context, batch, flops, settings)


def _cache_sharding(mesh: Mesh, a, batch: int) -> NamedSharding:
  """A stacked cache array [L,B,S,...]: rows over the batch axes where they divide B."""
  axes = BATCH_AXES if batch % batch_parallelism(mesh) == 0 else None
  return NamedSharding(mesh, PartitionSpec(None, axes, *([None] * (a.ndim - 2))))


def build_program(cfg: ml_collections.ConfigDict, devices, step: str = "train",
                  batch: int | None = None, context: int | None = None) -> Program:
  """The `step` program of experiment `cfg` on `devices`. Serving defaults: one sequence per
  batch shard and train.seq_len tokens of context."""
  if step not in STEPS:
    raise ValueError(f"step={step!r}; use one of {STEPS}.")
  if step == "train":
    return train_program(cfg, devices)
  if batch is None:
    mesh = make_mesh(cfg.mesh, devices)
    batch = batch_parallelism(mesh)
  return serving_program(cfg, devices, step, batch, context or int(cfg.train.seq_len))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += math.prod(shape) * _itemsize(leaf.dtype)
  return total


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # a threefry key: two uint32 words
  return jnp.dtype(dtype).itemsize
