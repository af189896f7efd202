"""Config layering: dsjax/config.py imports nothing from the packages built on it, and HF
config.json conversion is a registry keyed by model_type that new families join."""

import ast
import dataclasses
from pathlib import Path

import pytest

import dsjax
from tests.model_fixtures import tiny_config
from dsjax.checkpoint import hf_config
from dsjax.checkpoint.hf_config import CONVERTERS, HFConverter, from_hf, register_converter, to_hf

CONFIG_PY = Path(__file__).resolve().parents[1] / "dsjax" / "config.py"
UPPER_PACKAGES = ("checkpoint", "model", "train", "infer")


def _imported_modules(tree: ast.AST) -> list[str]:
  """Every module an Import/ImportFrom anywhere in `tree` names, relative ones resolved against
  the dsjax package (config.py's own)."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # `from . import model`, `from .checkpoint import x`, `from .. import y`
        base = "dsjax" if node.level == 1 else ""
        module = ".".join(p for p in (base, node.module or "") if p)
        names += [f"{module}.{alias.name}" if module else alias.name for alias in node.names]
        names.append(module)
      else:
        names.append(node.module or "")
        names += [f"{node.module}.{alias.name}" for alias in node.names]
  return names


def _is_upper(module: str) -> bool:
  return any(module == f"dsjax.{p}" or module.startswith(f"dsjax.{p}.") for p in UPPER_PACKAGES)


def test_config_imports_nothing_from_checkpoint_model_train_infer():
  tree = ast.parse(CONFIG_PY.read_text(), filename=str(CONFIG_PY))
  bad = sorted({m for m in _imported_modules(tree) if _is_upper(m)})
  assert not bad, f"dsjax/config.py imports {bad}; it must stay below those packages."


def test_the_import_check_sees_nested_and_relative_imports():
  source = ("def f():\n  from dsjax.checkpoint import hf_config\n"
            "class C:\n  def g(self):\n    from . import model\n"
            "    from .train.state import x\n    import dsjax.infer.load\n")
  found = {m for m in _imported_modules(ast.parse(source)) if _is_upper(m)}
  assert {"dsjax.checkpoint", "dsjax.model", "dsjax.train.state", "dsjax.infer.load"} <= found


def test_config_has_no_hf_methods():
  assert not hasattr(dsjax.ModelConfig, "from_hf")
  assert not hasattr(dsjax.ModelConfig, "to_hf")


@pytest.fixture
def made_up_converter():
  model_type = "dsjax_test_made_up"
  assert model_type not in CONVERTERS
  seen = []

  def _from(hf):
    seen.append(hf)
    return dsjax.ModelConfig(vocab_size=hf["vocab_size"])

  def _to(cfg):
    return {"model_type": model_type, "vocab_size": cfg.vocab_size}

  register_converter(model_type, HFConverter(from_hf=_from, to_hf=_to))
  try:
    yield model_type, seen
  finally:
    CONVERTERS.pop(model_type, None)


def test_registered_converter_is_used_by_from_hf(made_up_converter):
  model_type, seen = made_up_converter
  assert model_type in hf_config.SUPPORTED_MODEL_TYPES
  hf = {"model_type": model_type, "vocab_size": 1234}
  cfg = from_hf(hf)
  assert seen == [hf]
  assert cfg.vocab_size == 1234
  with pytest.raises(ValueError, match="already registered"):
    register_converter(model_type, CONVERTERS[model_type])


def test_made_up_converter_is_gone_after_its_test():
  assert "dsjax_test_made_up" not in CONVERTERS
  assert "dsjax_test_made_up" not in hf_config.SUPPORTED_MODEL_TYPES


def test_unknown_model_type_names_the_registered_types():
  with pytest.raises(ValueError) as info:
    from_hf({"model_type": "llama", "vocab_size": 10})
  message = str(info.value)
  assert "llama" in message
  for model_type in CONVERTERS:
    assert model_type in message
  assert "deepseek_v2" in message and "deepseek_v3" in message


@pytest.mark.parametrize("scoring_func, topk_method, model_type",
                         [("softmax", "greedy", "deepseek_v2"),
                          ("sigmoid", "noaux_tc", "deepseek_v3")])
def test_moe_layer_freq_round_trips(scoring_func, topk_method, model_type):
  cfg = dsjax.ModelConfig(
      vocab_size=256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
      intermediate_size=128,
      moe=dsjax.MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                          moe_intermediate_size=32, n_group=2, topk_group=1,
                          scoring_func=scoring_func, topk_method=topk_method,
                          first_k_dense_replace=1, moe_layer_freq=2))
  hf = to_hf(cfg)
  assert hf["model_type"] == model_type
  assert hf["moe_layer_freq"] == 2
  back = from_hf(hf)
  assert back.moe.moe_layer_freq == 2
  assert back.moe == dataclasses.replace(cfg.moe, impl=back.moe.impl)
  assert from_hf(dict(hf, moe_layer_freq=1)).moe.moe_layer_freq == 1
  missing = {k: v for k, v in hf.items() if k != "moe_layer_freq"}
  assert from_hf(missing).moe.moe_layer_freq == 1


def test_to_hf_refuses_a_pattern_deepseek_cannot_describe():
  from dsjax.config import LayerSpec
  cfg = tiny_config()
  pattern = tuple(LayerSpec("mla", "moe" if i % 2 else "dense")
                  for i in range(cfg.num_hidden_layers))
  with pytest.raises(ValueError, match="layer_pattern"):
    to_hf(cfg.replace(layer_pattern=pattern))
  # The derived pattern written out explicitly is the same model.
  assert to_hf(cfg.replace(layer_pattern=cfg.layer_specs)) == to_hf(cfg)
