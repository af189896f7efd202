"""Parameter counts of the published configs, from abstract models (nnx.eval_shape allocates
nothing), against the published numbers and an independent closed-form count."""

import math
import pathlib

import jax
import pytest
from flax import nnx

import dsjax
from dsjax.model.param import RouterBias

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _abstract_model(name: str) -> dsjax.Transformer:
  cfg = dsjax.load_config(str(CONFIGS / f"{name}.py"))
  return nnx.eval_shape(lambda: dsjax.Transformer(cfg, rngs=nnx.Rngs(0)))


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _param_counts(model) -> tuple[int, int]:
  """(main model, MTP modules' own) counts of nnx.Param leaves."""
  total = _size(nnx.state(model, nnx.Param))
  mtp = _size(nnx.state(model.mtp, nnx.Param))
  return total - mtp, mtp


def closed_form(cfg: dsjax.ModelConfig) -> dict[str, int]:
  """Counts derived from the hyper-parameters alone (DeepSeek's module list, SwiGLU = 3 mats)."""
  d, n, mla, moe = cfg.hidden_size, cfg.num_attention_heads, cfg.mla, cfg.moe
  if mla.q_lora_rank is None:
    q = d * n * mla.qk_head_dim
  else:  # wq_a, q_norm, wq_b
    q = d * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * n * mla.qk_head_dim
  attn = (q + d * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank
          + mla.kv_lora_rank * n * (mla.qk_nope_head_dim + mla.v_head_dim) + n * mla.v_head_dim * d)
  norms = 2 * d
  dense_layer = attn + norms + 3 * d * cfg.intermediate_size
  expert = 3 * d * moe.moe_intermediate_size
  moe_layer = (attn + norms + d * moe.n_routed_experts + moe.n_routed_experts * expert
               + moe.n_shared_experts * expert)
  n_dense = moe.first_k_dense_replace
  n_moe = cfg.num_hidden_layers - n_dense
  embed = cfg.vocab_size * d
  main = 2 * embed + d + n_dense * dense_layer + n_moe * moe_layer
  mtp = cfg.num_mtp_layers * (3 * d + 2 * d * d + moe_layer)  # enorm, hnorm, norm, eh_proj
  inactive = n_moe * (moe.n_routed_experts - moe.num_experts_per_tok) * expert
  return dict(main=main, mtp=mtp, embed=embed, activated=main - inactive)


@pytest.fixture(scope="module")
def v3():
  return _abstract_model("deepseek_v3_671b")


def test_v3_main_is_671b(v3):
  main, _ = _param_counts(v3)
  assert main == closed_form(v3.config)["main"]
  assert main == pytest.approx(671e9, rel=0.005)


def test_v3_with_mtp_is_685b(v3):
  # DeepSeek's checkpoint stores the MTP module with its own copy of the embedding and the
  # output head: 14B on top of the 671B main model, 685B in all.
  main, mtp = _param_counts(v3)
  ref = closed_form(v3.config)
  assert mtp == ref["mtp"]
  mtp_as_stored = mtp + 2 * ref["embed"]
  assert mtp_as_stored == pytest.approx(14e9, rel=0.05)
  assert main + mtp_as_stored == pytest.approx(685e9, rel=0.005)


def test_v3_activated_is_37b(v3):
  assert closed_form(v3.config)["activated"] == pytest.approx(37e9, rel=0.02)


def test_router_biases_are_not_params(v3):
  biases = jax.tree.leaves(nnx.state(v3, RouterBias))
  cfg = v3.config
  # One bias vector per MoE layer: the scanned stack's [L_moe, E] plus one per MTP module.
  assert sorted(b.shape for b in biases) == sorted(
      [(cfg.num_moe_layers, cfg.moe.n_routed_experts)]
      + [(cfg.moe.n_routed_experts,)] * cfg.num_mtp_layers)
  assert not issubclass(RouterBias, nnx.Param)
  param_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(nnx.state(v3, nnx.Param))]
  assert param_paths and not any("router_bias" in p for p in param_paths)

def test_v2_lite_is_15_7b():
  model = _abstract_model("deepseek_v2_lite")
  main, mtp = _param_counts(model)
  assert mtp == 0
  assert main == closed_form(model.config)["main"]
  assert main == pytest.approx(15.7e9, rel=0.01)


def test_moonlight_is_15_29b_without_embeddings():
  # Moonlight's published 15.29B total / 2.24B activated exclude the embedding and the head.
  model = _abstract_model("moonlight_16b")
  main, mtp = _param_counts(model)
  ref = closed_form(model.config)
  assert mtp == 0 and main == ref["main"]
  assert main - 2 * ref["embed"] == pytest.approx(15.29e9, rel=0.005)
  assert ref["activated"] - 2 * ref["embed"] == pytest.approx(2.24e9, rel=0.01)


def test_v4_flash_is_284b_without_mtp():
  """DeepSeek-V4-Flash: 284B published; dsjax counts every nnx.Param (mHC and compressor
  position biases included; the MTP block is not built yet)."""
  model = _abstract_model("deepseek_v4_flash")
  main, mtp = _param_counts(model)
  assert mtp == 0
  assert abs(main - 284e9) / 284e9 < 0.005, main
  specs = model.config.layer_specs
  assert [s.attention for s in specs[:5]] == ["v4_sliding", "v4_sliding", "v4_csa", "v4_hca",
                                              "v4_csa"]
  assert [s.ffn for s in specs[:4]] == ["hash_moe"] * 3 + ["moe"]
