"""docs/architecture.md's lists match the code: the attention and feed-forward kinds against
the registries, the MoE dispatches against MOE_IMPLS, and what `auto` picks against
resolve_impl."""

import re
import types
from pathlib import Path

import pytest

from dsjax.config import MOE_IMPLS, MoEConfig
from dsjax.model import moe as moe_module
from dsjax.model.kinds import attention_kinds, ffn_kinds

DOC = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()


def _table_names(heading: str) -> list[str]:
  """First-column `names` of the table that follows `heading` (up to the next heading)."""
  section = DOC.split(heading, 1)[1]
  section = re.split(r"\n#+ ", section, maxsplit=1)[0]
  return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)


def _builtin(registry: dict) -> set[str]:
  # Tests register their own kinds (tests/model/test_kinds.py) in the same process.
  return {name for name, cls in registry.items() if cls.__module__.startswith("dsjax.")}


def test_attention_kinds_table_lists_the_registry():
  assert _table_names("### Attention kinds") == sorted(_builtin(attention_kinds()))


def test_feed_forward_kinds_table_lists_the_registry():
  assert _table_names("### Feed-forward kinds") == sorted(_builtin(ffn_kinds()))


def test_moe_dispatch_table_lists_every_impl():
  names = _table_names("### MoE dispatches")
  dispatches, auto_picks = names[:len(MOE_IMPLS) - 1], names[len(MOE_IMPLS) - 1:]
  assert set(dispatches) == set(MOE_IMPLS) - {"auto"} and len(dispatches) == len(set(dispatches))
  assert auto_picks == ["ep", "ragged", "dense", "blocked"]


@pytest.mark.parametrize("platform,mesh_expert,tokens,expected", [
    ("cpu", 4, 64, "ep"), ("tpu", 1, 64, "ragged"), ("gpu", 1, None, "ragged"),
    ("cpu", 1, 2, "dense"), ("cpu", 1, None, "blocked"), ("cpu", 1, 4096, "blocked")])
def test_auto_picks_what_the_doc_says(monkeypatch, platform, mesh_expert, tokens, expected):
  mesh = types.SimpleNamespace(shape={"expert": mesh_expert, "data": 1})
  monkeypatch.setattr(moe_module.expert_parallel, "context_mesh", lambda: mesh)
  monkeypatch.setattr(moe_module, "target_platform", lambda: platform)
  moe = MoEConfig(n_routed_experts=8, num_experts_per_tok=2)
  assert moe_module.resolve_impl("auto", moe, tokens) == expected
