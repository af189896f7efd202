"""Loading a model for inference from whatever a user points `infer.py` at:

  - a train.py workdir (experiment.json + checkpoints/<step>/state): only the parameters and
    router biases are read from the Orbax train state (a partial restore; the optimizer
    moments are never loaded), from the latest finished step unless one is asked for;
  - a HuggingFace DeepSeek-V2/V3 directory (config.json + *.safetensors + tokenizer.json);
  - a dsjax Orbax model directory (model_config.json + state/, from dsjax.checkpoint.convert).

Each returns the model with its tokenizer, end-of-sequence id and chat template (when the
tokenizer files carry one). Every unusable path stops with one FileNotFoundError/ValueError
that says what was expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.data.tokenizer import Tokenizer, make_tokenizer
from dsjax.infer.cli_io import ChatTemplate
from dsjax.model.transformer import Transformer
from dsjax.train.checkpointing import flatten_by_name, one_line
from dsjax.train.read_noise import quiet_failed_reads
from dsjax.train.state import split_model

EXPERIMENT_FILE = "experiment.json"      # written by dsjax.train.loop
CHECKPOINT_DIR = "checkpoints"
_STATE_ITEM = "state"
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")
_MODEL_ITEMS = ("params", "router_bias")  # the TrainState fields a model needs
_EXPECTED = ("a train.py workdir (experiment.json + checkpoints/), a HuggingFace DeepSeek "
             "directory (config.json + *.safetensors) or a dsjax Orbax model directory "
             "(model_config.json + state/)")


class Loaded(NamedTuple):
  model: Transformer
  tokenizer: Tokenizer
  eos_id: int | None
  chat_template: ChatTemplate | None
  description: str


def load_for_inference(path: str | os.PathLike, step: int | None = None,
                       tokenizer: str | None = None, dtype: str = "auto") -> Loaded:
  """(model, tokenizer, eos_id, chat template or None, one-line description) of checkpoint
  `path`. `step` picks a train.py checkpoint (default: the latest); `tokenizer` ("byte", a
  tokenizer.json or a directory holding one) replaces the checkpoint's own. `dtype` is the
  parameter and compute dtype of a HuggingFace checkpoint ("auto": its config.json
  torch_dtype, float32 when absent); train.py workdirs keep their run's dtypes."""
  path = Path(os.fspath(path))
  if not path.exists():
    raise FileNotFoundError(f"--checkpoint={path} does not exist; pass {_EXPECTED}.")
  if not path.is_dir():
    raise FileNotFoundError(f"--checkpoint={path} is a file; pass {_EXPECTED}.")
  if step is not None and not (path / EXPERIMENT_FILE).is_file():
    raise ValueError(f"--step={step} applies to train.py workdirs only; {path} is not one "
                     f"({EXPERIMENT_FILE} is missing). Drop --step.")
  if (path / EXPERIMENT_FILE).is_file():
    return _load_workdir(path, step, tokenizer)
  if (path / "config.json").is_file():
    return _load_hf(path, tokenizer, dtype)
  from dsjax.checkpoint.orbax_io import CONFIG_FILE  # pylint: disable=import-outside-toplevel
  if (path / CONFIG_FILE).is_file():
    return _load_orbax_model(path, tokenizer)
  raise FileNotFoundError(f"--checkpoint={path} is not a checkpoint: it holds none of "
                          f"{EXPERIMENT_FILE}, config.json or {CONFIG_FILE}. Pass {_EXPECTED}.")


# ---- train.py workdirs ----

def checkpoint_steps(workdir: Path) -> list[int]:
  """Finished checkpoint steps of a workdir, oldest first (Orbax writes a step under a
  temporary name and renames it to the bare step number once complete)."""
  directory = workdir / CHECKPOINT_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / _STATE_ITEM).is_dir())


def _pick_step(workdir: Path, step: int | None) -> int:
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir} has no finished checkpoint in {CHECKPOINT_DIR}/; train "
                            "until the first save (train.checkpoint_every steps) or point "
                            "--checkpoint at another run.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint for --step={step}; available steps: "
                            f"{steps}.")
  return step


def _abstract_model(cfg: ModelConfig):
  """(graphdef, {"params": State, "router_bias": State} of ShapeDtypeStructs)."""
  out = {}

  def build():
    graphdef, params, router_bias = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    out["graphdef"] = graphdef
    return {"params": params, "router_bias": router_bias}
  abstract = jax.eval_shape(build)
  return out["graphdef"], abstract


def _restore_model(state_dir: Path, cfg: ModelConfig) -> Transformer:
  """The model's variables from a TrainCheckpointer `state` item, without the optimizer state.

  The item is a flat {leaf name: array} dict whose names are the TrainState's key paths, so
  the model's leaves are the names under params. and router_bias.: a partial restore of
  those names reads nothing else from disk."""
  graphdef, abstract = _abstract_model(cfg)
  flat, treedef = flatten_by_name(abstract)  # the same names TrainCheckpointer.save writes
  # The item's handler, not a Checkpointer: the step-level metadata file a Checkpointer
  # looks for sits one directory up, where the CheckpointManager wrote it.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    restored = _partial_restore(handler, state_dir, flat)
  finally:
    handler.close()
  state = jax.tree_util.tree_unflatten(treedef, [restored[n] for n in flat])
  return nnx.merge(graphdef, *(state[k] for k in _MODEL_ITEMS))


def _partial_restore(handler, state_dir: Path, flat: dict[str, Any]) -> dict[str, jax.Array]:
  """{name: array} of the names in `flat` (ShapeDtypeStructs), checked against the files."""
  try:
    with quiet_failed_reads():
      stored = handler.metadata(state_dir)
    stored = dict(getattr(stored, "tree", stored))
  except Exception as e:  # pylint: disable=broad-except  # a missing or corrupt _METADATA
    raise _unreadable(state_dir, e) from e
  missing = sorted(n for n in flat if n not in stored)
  wrong = sorted(n for n in flat if n in stored
                 and tuple(stored[n].shape) != tuple(flat[n].shape))
  if missing or wrong:
    listed = ", ".join((missing + wrong)[:4])
    raise ValueError(f"The checkpoint {state_dir.parent} does not match the model in "
                     f"{EXPERIMENT_FILE} ({len(missing)} missing and {len(wrong)} differently "
                     f"shaped leaves, e.g. {listed}); was the workdir reused with another "
                     "config?")
  # This process's own device: in a multi-host launch every process holds its own copy.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device) for n, x in flat.items()}
  try:
    with quiet_failed_reads():
      return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  # tensorstore's errors are plain
    raise _unreadable(state_dir, e) from e


def _unreadable(state_dir: Path, error: BaseException) -> ValueError:
  """One line naming the checkpoint that cannot be read and how to pick another."""
  step_dir = state_dir.parent
  older = [s for s in checkpoint_steps(step_dir.parent.parent) if s < int(step_dir.name)]
  detail = one_line(error)
  pick = (f"pass --step={older[-1]} (or another of {older}) to load an older one"
          if older else "no older checkpoint is left; train again")
  return ValueError(f"Checkpoint {step_dir} cannot be read ({detail}); {pick}.")


def _load_workdir(workdir: Path, step: int | None, tokenizer_spec: str | None) -> Loaded:
  try:
    experiment = ml_collections.ConfigDict(json.loads((workdir / EXPERIMENT_FILE).read_text()))
    cfg = ModelConfig.from_dict(experiment.model.to_dict())
  except (ValueError, KeyError, AttributeError) as e:
    raise ValueError(f"{workdir / EXPERIMENT_FILE} is not a readable experiment config ({e}); "
                     "was it written by train.py?") from e
  step = _pick_step(workdir, step)
  spec = tokenizer_spec or experiment.data.tokenizer
  if tokenizer_spec is None and spec.lower() != "byte" and not os.path.exists(spec):
    raise FileNotFoundError(f"The run's tokenizer {spec!r} (data.tokenizer in "
                            f"{EXPERIMENT_FILE}) does not exist here; pass --tokenizer=PATH.")
  tokenizer = make_tokenizer(spec, cfg.vocab_size)
  model = _restore_model(workdir.absolute() / CHECKPOINT_DIR / str(step) / _STATE_ITEM, cfg)
  description = (f"train.py workdir {workdir}, step {step} ({_summary(cfg)}, tokenizer "
                 f"{tokenizer.name})")
  return Loaded(model, tokenizer, tokenizer.eos_id, _chat_template(tokenizer, _side_dirs(spec)),
                description)


# ---- HuggingFace and dsjax Orbax model directories ----

def _directory_tokenizer(path: Path, spec: str | None, vocab_size: int) -> Tokenizer:
  if spec is None:
    if not (path / "tokenizer.json").is_file():
      raise FileNotFoundError(f"{path} has no tokenizer.json; pass --tokenizer=PATH (a "
                              "tokenizer.json, a directory holding one, or 'byte') or copy the "
                              "model's tokenizer.json into it.")
    spec = str(path)
  return make_tokenizer(spec, vocab_size)


def _hf_dtype(hf: dict[str, Any], dtype: str) -> str:
  """The dtype to load a HuggingFace checkpoint in: `dtype`, or with "auto" its config's."""
  if dtype == "auto":
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  if dtype not in LOAD_DTYPES[1:]:
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {LOAD_DTYPES}.")
  return dtype


def _load_hf(path: Path, tokenizer_spec: str | None, dtype: str) -> Loaded:
  from dsjax.checkpoint.hf_checkpoint import load_hf_checkpoint, read_hf_config
  from dsjax.checkpoint.hf_config import from_hf
  hf = read_hf_config(path)
  if not any(path.glob("*.safetensors")):
    raise FileNotFoundError(f"{path} has config.json but no *.safetensors weights; pass a "
                            "complete HuggingFace checkpoint directory.")
  cfg = from_hf(hf)
  tokenizer = _directory_tokenizer(path, tokenizer_spec, cfg.vocab_size)
  model = load_hf_checkpoint(path, dtype=_hf_dtype(hf, dtype))
  eos_id = _first_id(hf.get("eos_token_id"), tokenizer.eos_id)
  dirs = _side_dirs(tokenizer_spec) + [path] if tokenizer_spec else [path]
  description = (f"HuggingFace {hf.get('model_type')} {path} ({_summary(model.config)}, "
                 f"{model.config.dtype})")
  return Loaded(model, tokenizer, eos_id, _chat_template(tokenizer, dirs), description)


def _load_orbax_model(path: Path, tokenizer_spec: str | None) -> Loaded:
  from dsjax.checkpoint.orbax_io import load_model
  model = load_model(path)
  tokenizer = _directory_tokenizer(path, tokenizer_spec, model.config.vocab_size)
  eos_id = _first_id(model.config.eos_token_id, tokenizer.eos_id)
  dirs = _side_dirs(tokenizer_spec) + [path] if tokenizer_spec else [path]
  description = f"dsjax Orbax model {path} ({_summary(model.config)})"
  return Loaded(model, tokenizer, eos_id, _chat_template(tokenizer, dirs), description)


def _first_id(value, default: int | None) -> int | None:
  """An eos id from config: several stop ids mean the first is the end of sequence."""
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return value if isinstance(value, int) else default


def _summary(cfg: ModelConfig) -> str:
  experts = f", {cfg.moe.n_routed_experts} experts" if cfg.moe is not None else ""
  return f"{cfg.num_hidden_layers} layers{experts}, vocab {cfg.vocab_size}"


# ---- chat templates ----

def _side_dirs(tokenizer_spec: str) -> list[Path]:
  """Where a tokenizer's companion files (tokenizer_config.json) live: next to it."""
  if tokenizer_spec.lower() == "byte":
    return []
  path = Path(tokenizer_spec)
  return [path if path.is_dir() else path.parent]


def _template_source(directory: Path) -> str | None:
  """The chat template in `directory`: chat_template.jinja, else tokenizer_config.json's
  `chat_template` (a string, or a list of named templates of which "default" is used)."""
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.is_file():
    return jinja_file.read_text(encoding="utf-8")
  config = _tokenizer_config(directory)
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template.strip() else None


def _tokenizer_config(directory: Path) -> dict[str, Any]:
  file = directory / "tokenizer_config.json"
  if not file.is_file():
    return {}
  try:
    config = json.loads(file.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{file} is not valid JSON ({e}); fix or remove it.") from e
  return config if isinstance(config, dict) else {}


def _chat_template(tokenizer: Tokenizer, directories: list[Path]) -> ChatTemplate | None:
  for directory in directories:
    source = _template_source(directory)
    if source is not None:
      token = lambda i: tokenizer.decode([i]) if i is not None else ""
      return ChatTemplate(source, token(tokenizer.bos_id), token(tokenizer.eos_id))
  return None
