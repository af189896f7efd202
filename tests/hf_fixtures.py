"""Tiny random transformers DeepseekV3/V2 models and routing capture, for parity tests.

Models follow the project's rule for random test models (DESIGN.md): weight matrices drawn with
std 0.2, norm weights uniform in [0.5, 1.5], V3 router correction biases normal(0, 0.1), so that
routing has no near-ties and a wrong norm or bias would show. Rope is YaRN with
original_max_position_embeddings=16, so the test sequences (T > 16) reach the interpolated range.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM)

import dsjax

ORIGINAL_MAX_POSITIONS = 16
SEQ_LEN = 40  # > ORIGINAL_MAX_POSITIONS: YaRN's interpolated frequencies matter


def yarn(mscale: float, mscale_all_dim: float, factor: float = 4.0) -> dict:
  return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
          "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS, "beta_fast": 32.0,
          "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


def _common(**overrides) -> dict:
  kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
            tie_word_embeddings=False)
  kw.update(overrides)
  # transformers' default num_key_value_heads (128) breaks tiny MLA models: MLA has N kv heads.
  kw["num_key_value_heads"] = kw["num_attention_heads"]
  return kw


def v3_config(**overrides) -> DeepseekV3Config:
  kw = dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_parameters=yarn(1.0, 1.0))
  kw.update(overrides)
  return DeepseekV3Config(**_common(**kw))


def v2_config(**overrides) -> DeepseekV2Config:
  # transformers' DeepseekV2 ignores norm_topk_prob (never renormalises); dsjax applies it as
  # DeepSeek's reference does, so parity needs norm_topk_prob=False.
  kw = dict(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
            routed_scaling_factor=1.5, rope_parameters=yarn(0.707, 0.707))
  kw.update(overrides)
  return DeepseekV2Config(**_common(**kw))


V32_TOPK = 12  # < SEQ_LEN: the indexer's selection matters


def v32_config(**overrides) -> DeepseekV32Config:
  """DeepSeek-V3.2 (DSA): V3's tiny config plus an indexer; 16 indexer heads keep exact ties
  at the k-th score (a key scores exactly 0 when every head's ReLU is 0) improbable, so that
  top-k has one answer."""
  kw = dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_parameters=yarn(1.0, 1.0), index_n_heads=16, index_head_dim=16,
            index_topk=V32_TOPK)
  kw.update(overrides)
  return DeepseekV32Config(**_common(**kw))


TORCH_CLASSES = {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM,
                 "deepseek_v32": DeepseekV32ForCausalLM}


def randomize_torch(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Weights ~ N(0, 0.2), norm weights ~ U(0.5, 1.5), router correction bias ~ N(0, 0.1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
  return model


def build_torch_model(config, seed: int = 0) -> torch.nn.Module:
  """A seeded, randomised fp32 eager transformers model for `config` (V2, V3, V3.2), in eval
  mode."""
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  cls = TORCH_CLASSES[config.model_type]
  model = cls(config).to(torch.float32)
  return randomize_torch(model, seed).eval()


def load_torch_model(path, dtype=torch.float32) -> torch.nn.Module:
  config = json.loads((Path(path) / "config.json").read_text())
  cls = TORCH_CLASSES[config["model_type"]]
  return cls.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def random_ids(vocab_size: int, batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1):
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len)).astype(np.int64)


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module):
  """Yields a list that fills with (router_logits [B*T,E], topk_indices [B*T,K]) per MoE layer,
  in layer order, from forward hooks on the routers (`mlp.gate` returns
  (router_logits, topk_weights, topk_indices))."""
  captured: list[tuple[torch.Tensor, torch.Tensor]] = []
  handles = []
  for layer in model.model.layers:
    gate = getattr(layer.mlp, "gate", None)
    if isinstance(gate, torch.nn.Module):
      handles.append(gate.register_forward_hook(
          lambda _m, _in, out: captured.append((out[0].detach().clone(),
                                                out[2].detach().clone()))))
  try:
    yield captured
  finally:
    for h in handles:
      h.remove()


def torch_forward(model: torch.nn.Module, ids: np.ndarray):
  """(logits float32[B,T,V], expert ids int[L_moe,B*T,K], router logits float32[L_moe,B*T,E])
  of a transformers model."""
  with torch.no_grad(), capture_routing(model) as routes:
    logits = model(torch.as_tensor(ids)).logits.float().numpy()
  return (logits, torch.stack([r[1] for r in routes]).numpy(),
          torch.stack([r[0] for r in routes]).float().numpy())


# On XLA:CPU, LLVM optimisation makes compiling these tiny models ~3x slower than level 0 (about
# 6 s vs 2 s each on 2 cores) and changes nothing the tests check (tolerances are 1e-4).
_COMPILER_OPTIONS = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
                     else None)


@functools.partial(jax.jit, static_argnums=0, compiler_options=_COMPILER_OPTIONS)
def _forward(graphdef, state, ids):
  out = nnx.merge(graphdef, state).forward(ids)
  return out.logits, out.routing.expert_ids


@functools.partial(jax.jit, static_argnums=0, compiler_options=_COMPILER_OPTIONS)
def _forward_with_mtp(graphdef, state, ids):
  model = nnx.merge(graphdef, state)
  out = model.forward(ids)
  return out.logits, out.routing.expert_ids, model.mtp_logits(ids, hidden=out.hidden)


def dsjax_forward(model: dsjax.Transformer, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits [B,T,V], expert ids [L_moe,B*T,K]) of `model`, jitted with the graph static so
  that models of one config share a compilation (XLA:CPU compiles are the slow part)."""
  graphdef, state = nnx.split(model)
  logits, expert_ids = _forward(graphdef, state, jnp.asarray(ids, jnp.int32))
  return np.asarray(logits), np.asarray(expert_ids)


def dsjax_forward_with_mtp(model: dsjax.Transformer, ids: np.ndarray):
  """dsjax_forward plus the list of MTP logits [B,T-k,V] (model.mtp_logits)."""
  graphdef, state = nnx.split(model)
  logits, expert_ids, mtp = _forward_with_mtp(graphdef, state, jnp.asarray(ids, jnp.int32))
  return np.asarray(logits), np.asarray(expert_ids), [np.asarray(m) for m in mtp]


def assert_same_expert_sets(a: np.ndarray, b: np.ndarray) -> None:
  """Equal routed expert sets per layer and token (torch's topk(sorted=False) has no order)."""
  assert a.shape == b.shape, (a.shape, b.shape)
  sa, sb = np.sort(a, axis=-1), np.sort(b, axis=-1)
  differ = np.argwhere((sa != sb).any(-1))
  assert differ.size == 0, (f"{len(differ)} (layer, token) pairs route differently, first "
                            f"{differ[:3].tolist()}: {sa[tuple(differ[0])]} vs {sb[tuple(differ[0])]}")


def dsjax_params(model: dsjax.Transformer) -> dict[tuple, np.ndarray]:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def checkpoint_files(path) -> list[Path]:
  return sorted(Path(path).glob("*.safetensors"))


def rewrite_tensor(path, name: str, tensor: torch.Tensor | None) -> None:
  """Replaces (or with None deletes) tensor `name` in whichever safetensors file holds it."""
  for file in checkpoint_files(path):
    tensors = load_file(file)
    if name in tensors:
      if tensor is None:
        del tensors[name]
      else:
        tensors[name] = tensor
      save_file(tensors, file, metadata={"format": "pt"})
      index = Path(path) / "model.safetensors.index.json"
      if tensor is None and index.exists():
        meta = json.loads(index.read_text())
        meta["weight_map"].pop(name, None)
        index.write_text(json.dumps(meta))
      return
  raise KeyError(f"{name} is in no safetensors file under {path}")


def tiny_v4_config(layer_types, mlp_layer_types, **changes):
  """A tiny transformers DeepseekV4Config (eager attention): hidden 32, 4 heads of 16 dims (8
  rotary), window 5, CSA every 2 tokens (indexer 8 x 8, top 3), HCA every 4."""
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as ref
  fields = dict(
      vocab_size=64, hidden_size=32, num_hidden_layers=len(layer_types), num_attention_heads=4,
      head_dim=16, qk_rope_head_dim=8, q_lora_rank=12, o_groups=2, o_lora_rank=6,
      sliding_window=5,
      compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
      index_n_heads=8, index_head_dim=8, index_topk=3, layer_types=list(layer_types),
      mlp_layer_types=list(mlp_layer_types), rms_norm_eps=1e-6, num_nextn_predict_layers=0)
  config = ref.DeepseekV4Config(**{**fields, **changes})
  config._attn_implementation = "eager"
  return config
