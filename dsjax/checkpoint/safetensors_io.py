"""Minimal safetensors reader/writer on numpy + ml_dtypes (no torch needed).

Format: 8-byte little-endian header length N, then N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes; offsets are relative to the end of the
header.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = [
  "SafetensorsReader",
  "dequantize_fp8_blockwise",
  "write_safetensors",
  "write_sharded",
]

_DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  # Power-of-two block scales (DeepSeek-V4's `.scale` tensors); safetensors' tag for torch's
  # float8_e8m0fnu. Its "F4" tag (float4_e2m1fn_x2) counts 4-bit elements in `shape`, which the
  # one-byte-per-element size check here cannot express; DeepSeek-V4 stores FP4 as I8 anyway.
  "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64),
  "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in _DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Guard against garbage files: real headers are at most a few MB.
_MAX_HEADER_BYTES = 100 * 2**20


def _read_header(path: Path) -> tuple[dict, int]:
  """Parse and validate one file's header; returns (tensor entries, data start)."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: file too small ({size} bytes) to be safetensors")
    (hlen,) = struct.unpack("<Q", raw)
    if hlen > min(size - 8, _MAX_HEADER_BYTES):
      raise ValueError(f"{path}: header length {hlen} exceeds file size {size}")
    header = json.loads(f.read(hlen))
  header.pop("__metadata__", None)
  data_start = 8 + hlen
  for name, entry in header.items():
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    nbytes = math.prod(entry["shape"]) * _DTYPES[entry["dtype"]].itemsize
    if not 0 <= begin <= end or data_start + end > size:
      raise ValueError(
        f"{path}: tensor {name!r} data_offsets [{begin}, {end}] point outside "
        f"the file ({size - data_start} data bytes); the file may be truncated"
      )
    if end - begin != nbytes:
      raise ValueError(
        f"{path}: tensor {name!r} spans {end - begin} bytes but dtype "
        f"{entry['dtype']} and shape {entry['shape']} need {nbytes}"
      )
  return header, data_start


class SafetensorsReader:
  """Lazy reader for a HuggingFace safetensors checkpoint directory.

  Supports a single ``model.safetensors``, sharded checkpoints with
  ``model.safetensors.index.json``, or any set of ``*.safetensors`` files
  (headers are scanned).  Files are memory-mapped on first use, so reading
  a tensor touches only that tensor's bytes.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    if not self.directory.is_dir():
      raise FileNotFoundError(
        f"checkpoint directory {self.directory} does not exist; pass the folder "
        f"containing model.safetensors or {INDEX_FILE}"
      )
    files = self._list_files()
    # name -> (file, dtype name, shape, absolute begin, absolute end)
    self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
    for path in files:
      header, data_start = _read_header(path)
      for name, e in header.items():
        if name in self._entries:
          raise ValueError(
            f"tensor {name!r} appears in both {self._entries[name][0]} and {path}"
          )
        begin, end = e["data_offsets"]
        self._entries[name] = (
          path, e["dtype"], tuple(e["shape"]), data_start + begin, data_start + end
        )
    self._mmaps: dict[Path, mmap.mmap] = {}

  def _list_files(self) -> list[Path]:
    index = self.directory / INDEX_FILE
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = [self.directory / f for f in sorted(set(weight_map.values()))]
      missing = [str(f) for f in files if not f.is_file()]
      if missing:
        raise FileNotFoundError(f"{index} references missing shard(s): {missing}")
      return files
    files = sorted(self.directory.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(
        f"no *.safetensors files in {self.directory}; expected model.safetensors "
        f"or sharded files with {INDEX_FILE} (download the checkpoint weights)"
      )
    return files

  def keys(self) -> list[str]:
    """Sorted list of tensor names."""
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def _entry(self, name: str):
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"tensor {name!r} not found in checkpoint {self.directory}") from None

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of tensor ``name``."""
    return self._entry(name)[2]

  def dtype(self, name: str) -> np.dtype:
    """numpy dtype of tensor ``name`` (ml_dtypes for bf16 / fp8)."""
    return _DTYPES[self._entry(name)[1]]

  def file_of(self, name: str) -> Path:
    """Path of the file that stores tensor ``name``."""
    return self._entry(name)[0]

  def get(self, name: str) -> np.ndarray:
    """Read tensor ``name`` as a fresh numpy array (a copy, not an mmap view)."""
    path, dt_name, shape, begin, end = self._entry(name)
    dt = _DTYPES[dt_name]
    if begin == end:
      return np.empty(shape, dt)
    mm = self._mmaps.get(path)
    if mm is None:
      with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      self._mmaps[path] = mm
    count = (end - begin) // dt.itemsize
    return np.frombuffer(mm, dtype=dt, count=count, offset=begin).reshape(shape).copy()

  def close(self) -> None:
    """Unmap all files. The reader can still be used; files are re-mapped lazily."""
    for mm in self._mmaps.values():
      mm.close()
    self._mmaps.clear()

  def __enter__(self) -> SafetensorsReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"SafetensorsReader({str(self.directory)!r}, {len(self)} tensors)"


def dequantize_fp8_blockwise(
  weight: np.ndarray,
  scale_inv: np.ndarray,
  block_size: tuple[int, int] = (128, 128),
  out_dtype=np.float32,
) -> np.ndarray:
  """Dequantize a DeepSeek-V3 block-scaled FP8 weight.

  ``weight`` is float8_e4m3fn ``[out, in]``; ``scale_inv`` has shape
  ``[ceil(out/bo), ceil(in/bi)]``.  Returns
  ``weight[i, j] * scale_inv[i // bo, j // bi]`` (computed in float32) as
  ``out_dtype``.  Edge blocks may be partial.
  """
  if weight.ndim != 2:
    raise ValueError(f"weight must be 2-D, got shape {weight.shape}")
  bo, bi = block_size
  rows, cols = weight.shape
  expected = (-(-rows // bo), -(-cols // bi))
  if tuple(scale_inv.shape) != expected:
    raise ValueError(
      f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape "
      f"{weight.shape} with block size {block_size}: expected {expected}"
    )
  scale = np.asarray(scale_inv, dtype=np.float32)
  out = np.empty((rows, cols), dtype=out_dtype)
  # One row-block at a time: peak extra memory is a float32 block of rows.
  for b in range(expected[0]):
    r0, r1 = b * bo, min((b + 1) * bo, rows)
    row_scale = np.repeat(scale[b], bi)[:cols]
    out[r0:r1] = weight[r0:r1].astype(np.float32) * row_scale
  return out


def _prepare(name: str, array) -> np.ndarray:
  arr = np.asarray(array)
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  if arr.dtype not in _DTYPE_NAMES:
    raise TypeError(f"tensor {name!r}: dtype {arr.dtype} is not supported by safetensors")
  # Not np.ascontiguousarray: it turns 0-d arrays into 1-d.
  return arr if arr.flags.c_contiguous else arr.copy(order="C")


def write_safetensors(
  path: str | os.PathLike,
  tensors: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Write ``tensors`` to one safetensors file at ``path``.

  ``metadata`` (str -> str) is merged over the default ``{"format": "pt"}``.
  """
  meta = {"format": "pt", **(metadata or {})}
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
    raise TypeError(f"safetensors metadata must map str to str, got {meta!r}")
  arrays = {name: _prepare(name, a) for name, a in tensors.items()}
  # Largest itemsize first keeps every tensor naturally aligned (the data
  # section must be contiguous, so there is no padding between tensors).
  order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
  header: dict = {"__metadata__": meta}
  offset = 0
  for name in order:
    a = arrays[name]
    header[name] = {
      "dtype": _DTYPE_NAMES[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + a.nbytes],
    }
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in order:
      a = arrays[name]
      if a.size:
        f.write(a.reshape(-1).view(np.uint8).data)


def write_sharded(
  directory: str | os.PathLike,
  tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
  max_shard_bytes: int = 5 * 2**30,
  metadata: Mapping[str, str] | None = None,
) -> list[Path]:
  """Write a HuggingFace-style (possibly sharded) safetensors checkpoint.

  ``tensors`` is a mapping or an iterable of ``(name, array)`` pairs, which is
  consumed lazily: shards are flushed as they fill, so at most one shard is
  held in memory.  Writes ``model.safetensors`` when everything fits in one
  shard, otherwise ``model-0000i-of-0000N.safetensors`` plus
  ``model.safetensors.index.json``.  Returns the written shard paths.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  partial: list[Path] = []
  names: list[list[str]] = []
  shard: dict[str, np.ndarray] = {}
  shard_bytes = total = 0
  seen: set[str] = set()

  def flush() -> None:
    path = directory / f".shard-{len(partial) + 1:05d}.safetensors.partial"
    write_safetensors(path, shard, metadata)
    partial.append(path)
    names.append(list(shard))

  for name, array in items:
    if name in seen:
      raise ValueError(f"duplicate tensor name {name!r}")
    seen.add(name)
    arr = _prepare(name, array)
    if shard and shard_bytes + arr.nbytes > max_shard_bytes:
      flush()
      shard, shard_bytes = {}, 0
    shard[name] = arr
    shard_bytes += arr.nbytes
    total += arr.nbytes
  if shard or not partial:
    flush()
  del shard

  index = directory / INDEX_FILE
  if len(partial) == 1:
    final = [directory / SINGLE_FILE]
    index.unlink(missing_ok=True)  # a stale index would shadow the new file
  else:
    n = len(partial)
    final = [directory / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  for src, dst in zip(partial, final):
    os.replace(src, dst)
  if len(final) > 1:
    weight_map = {k: f.name for f, ks in zip(final, names) for k in ks}
    index_json = {
      "metadata": {"total_size": total},
      "weight_map": dict(sorted(weight_map.items())),
    }
    index.write_text(json.dumps(index_json, indent=2) + "\n")
  return final
