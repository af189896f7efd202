"""Load and save HuggingFace / DeepSeek checkpoint directories (config.json + safetensors).

Loading dequantises DeepSeek's FP8 e4m3 weights (128x128 `weight_scale_inv` blocks) tensor by
tensor, so host memory peaks near the result plus one tensor. Saving writes DeepSeek's layout
(per-expert tensors, MTP modules as layers num_hidden_layers + k), which transformers'
DeepseekV3/V2ForCausalLM and MtpModel load.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from dsjax.checkpoint import hf_config
from dsjax.checkpoint.hf_names import (GROUPED, VEC, Entry, checkpoint_entries, hf_shape,
                                       mtp_copy_names)
from dsjax.checkpoint.quant_formats import (dequantize_fp4_blockwise,
                                            dequantize_fp8_e8m0_blockwise)
from dsjax.checkpoint.safetensors_io import (SafetensorsReader, dequantize_fp8_blockwise,
                                             write_sharded)
from dsjax.config import ModelConfig
from dsjax.model.transformer import Transformer

_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The config.json dictionary of a checkpoint directory, with a clear error if absent."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"Checkpoint directory {path} does not exist; pass the directory "
                            "that holds config.json and the *.safetensors files.")
  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} is missing: a HuggingFace checkpoint directory needs "
                            "config.json next to its *.safetensors files.")
  return json.loads(config_file.read_text())


def _fp8_block_size(hf: dict[str, Any]) -> tuple[int, int]:
  quant = hf.get("quantization_config") or {}
  return tuple(quant.get("weight_block_size", (128, 128)))


def _read_tensor(reader: SafetensorsReader, name: str, block: tuple[int, int],
                 dtype: np.dtype) -> np.ndarray:
  """One checkpoint tensor as `dtype`, dequantised when stored as FP8 with a scale
  (`<name>_scale_inv`, DeepSeek-V3; `<prefix>.scale` in e8m0 or float32, DeepSeek-V4) or, for
  DeepSeek-V4's routed experts, as packed FP4 (int8 with a `.scale` per 1x32 block)."""
  array = reader.get(name)
  v4_scale = name.removesuffix(".weight") + ".scale"
  if array.dtype in _FP8:
    if name + "_scale_inv" in reader:
      return dequantize_fp8_blockwise(array, reader.get(name + "_scale_inv"), block,
                                      out_dtype=dtype)
    if v4_scale in reader:
      return dequantize_fp8_e8m0_blockwise(array, reader.get(v4_scale), block, out_dtype=dtype)
    raise ValueError(f"{name} is stored as {array.dtype} but neither {name}_scale_inv nor "
                     f"{v4_scale} is present; the checkpoint is incomplete.")
  if array.dtype == np.int8 and np.issubdtype(dtype, np.floating) and v4_scale in reader:
    return dequantize_fp4_blockwise(array, reader.get(v4_scale), out_dtype=dtype)
  return array.astype(dtype, copy=False)


def _present_name(reader: SafetensorsReader, entry: Entry) -> str | None:
  """The name `entry`'s tensor has in the files (its own or an alias), or None."""
  return next((n for n in (entry.hf_name, *entry.aliases) if n in reader), None)


def _to_dsjax(array: np.ndarray, entry: Entry, our_shape: tuple[int, ...]) -> np.ndarray:
  expected = hf_shape(our_shape, entry.layout)
  if tuple(array.shape) != expected:
    raise ValueError(f"Shape mismatch for {entry.hf_name}: the checkpoint has "
                     f"{tuple(array.shape)}, the model config expects {expected}. Check that "
                     "config.json belongs to these weights.")
  if entry.layout == GROUPED:
    groups, n_in, n_out = our_shape
    return array.reshape(groups, n_out, n_in).transpose(0, 2, 1)
  return array if entry.layout == VEC else array.T.reshape(our_shape)


def _from_dsjax(array: np.ndarray, entry: Entry) -> np.ndarray:
  if entry.layout == VEC:
    return array
  if entry.layout == GROUPED:
    return np.ascontiguousarray(array.transpose(0, 2, 1).reshape(-1, array.shape[1]))
  n_out, n_in = hf_shape(array.shape, entry.layout)
  return np.ascontiguousarray(array.reshape(n_in, n_out).T)


def _abstract_model(cfg: ModelConfig):
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, state, dict(nnx.to_flat_state(state))


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.float32,
                       config_overrides: dict[str, Any] | None = None) -> Transformer:
  """A dsjax.Transformer from a HuggingFace DeepSeek-V2/V3 checkpoint directory.

  Args:
    path: directory with config.json and (sharded, indexed) *.safetensors files.
    dtype: parameter and compute dtype of the returned model (router biases stay float32).
    config_overrides: ModelConfig fields to change, e.g. {"scan_layers": False}.
  """
  hf = read_hf_config(path)
  dtype_name = jnp.dtype(dtype).name
  cfg = hf_config.from_hf(hf).replace(param_dtype=dtype_name, dtype=dtype_name)
  block = _fp8_block_size(hf)
  with SafetensorsReader(path) as reader:
    cfg = _present_mtp_layers(cfg, reader).replace(**(config_overrides or {}))
    graphdef, state, flat = _abstract_model(cfg)
    buffers = {p: np.zeros(v.get_value().shape, v.get_value().dtype) for p, v in flat.items()}
    used = set()
    for entry in checkpoint_entries(cfg, set(flat)):
      name = _present_name(reader, entry)
      if entry.optional and name is None:
        continue
      if name is None:
        raise ValueError(f"Tensor {entry.hf_name} is missing from {path}; the checkpoint does not "
                         "match its config.json.")
      target = buffers[entry.path]
      our_shape = target.shape[len(entry.index):]
      target[entry.index] = _to_dsjax(_read_tensor(reader, name, block, target.dtype),
                                      entry, our_shape)
      used.add(name)
    _warn_unused(reader.keys(), used, cfg)
  for p, variable in flat.items():
    variable.set_value(jnp.asarray(buffers.pop(p)))
  return nnx.merge(graphdef, state)


def _present_mtp_layers(cfg: ModelConfig, reader: SafetensorsReader) -> ModelConfig:
  """transformers saves no MTP weights although its config keeps num_nextn_predict_layers:
  load the MTP modules that are present."""
  present = 0
  while (present < cfg.num_mtp_layers and
         f"model.layers.{cfg.num_hidden_layers + present}.eh_proj.weight" in reader):
    present += 1
  if present < cfg.num_mtp_layers:
    logging.warning("config.json declares %d MTP layers but the checkpoint holds %d; loading %d.",
                    cfg.num_mtp_layers, present, present)
    cfg = cfg.replace(num_mtp_layers=present)
  return cfg


def _warn_unused(names: list[str], used: set[str], cfg: ModelConfig) -> None:
  ignorable = set(mtp_copy_names(cfg))
  unused = [n for n in names if n not in used and n not in ignorable
            and not n.endswith(("_scale_inv", ".scale", "rotary_emb.inv_freq"))]
  if unused:
    logging.warning("Ignored %d checkpoint tensors not used by the model, e.g. %s",
                    len(unused), unused[:5])


def _hf_tensors(model: Transformer, dtype) -> Iterator[tuple[str, np.ndarray]]:
  cfg = model.config
  flat = dict(nnx.to_flat_state(nnx.state(model)))

  @functools.lru_cache(maxsize=4)  # entries walk a layer's experts w1, w3, w2 in turn
  def host_slice(path: tuple, layer: int | None) -> np.ndarray:
    value = flat[path].get_value()
    return np.asarray(jax.device_get(value if layer is None else value[layer]))

  v2 = hf_config.hf_model_type(cfg) == "deepseek_v2"
  for entry in checkpoint_entries(cfg, set(flat)):
    if v2 and entry.optional:
      continue  # transformers' DeepseekV2 has no router correction bias
    layer, rest = (entry.index[0], entry.index[1:]) if entry.index else (None, ())
    array = host_slice(entry.path, layer)[rest]
    if np.issubdtype(array.dtype, np.integer):
      out_dtype = np.int64  # tables (DeepSeek-V4's tid2eid), as torch's long buffers
    else:
      out_dtype = np.float32 if entry.float32_in_file else dtype
    yield entry.hf_name, _from_dsjax(array, entry).astype(out_dtype)
  # DeepSeek stores copies of the shared embedding and output head in every MTP layer.
  embed = host_slice(("embed",), None)
  head = embed if ("head",) not in flat else host_slice(("head",), None).T
  for name in mtp_copy_names(cfg):
    yield name, (embed if name.endswith("embed_tokens.weight") else head).astype(dtype)


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike, dtype=None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json and safetensors shards that transformers loads to the same logits.

  Args:
    model: a dsjax.Transformer.
    path: output directory (created; existing checkpoint files there are replaced).
    dtype: storage dtype (default: the model's param_dtype); the router's weight and bias
      are stored as float32 whatever it is.
  """
  cfg = model.config
  if hf_config.hf_model_type(cfg) == "deepseek_v2" and cfg.moe is not None:
    biases = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))
              if p[-1] == "router_bias"]
    if any(bool(jnp.any(b != 0)) for b in biases):
      raise ValueError("This softmax-routed model has non-zero router biases, which "
                       "transformers' DeepseekV2 cannot represent; zero them or use sigmoid "
                       "scoring (DeepseekV3) before saving.")
  np_dtype = jnp.dtype(dtype or cfg.param_dtype)
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf = hf_config.to_hf(cfg)
  hf["torch_dtype"] = hf["dtype"] = np_dtype.name
  write_sharded(path, _hf_tensors(model, np_dtype), max_shard_bytes=max_shard_bytes)
  (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
