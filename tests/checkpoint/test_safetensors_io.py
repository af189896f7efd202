import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsjax.checkpoint.safetensors_io import (
  SafetensorsReader,
  dequantize_fp8_blockwise,
  write_safetensors,
  write_sharded,
)


def _sample_tensors(rng):
  return {
    "f64": rng.standard_normal((3, 5)),
    "f32": rng.standard_normal((4, 7)).astype(np.float32),
    "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
    "bf16": rng.standard_normal((5, 9)).astype(ml_dtypes.bfloat16),
    "fp8": rng.standard_normal((6, 3)).astype(ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e5m2),
    "i64": rng.integers(-(2**40), 2**40, (3,)),
    "i32": rng.integers(-1000, 1000, (2, 2)).astype(np.int32),
    "i16": rng.integers(-1000, 1000, (7,)).astype(np.int16),
    "i8": rng.integers(-100, 100, (3, 1)).astype(np.int8),
    "u8": rng.integers(0, 255, (9,)).astype(np.uint8),
    "bool": rng.random((4, 4)) > 0.5,
    "scalar": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
  }


def _bytes_equal(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  assert a.tobytes() == b.tobytes()


def test_round_trip_bytes_identical(tmp_path):
  tensors = _sample_tensors(np.random.default_rng(0))
  write_safetensors(tmp_path / "model.safetensors", tensors)
  with SafetensorsReader(tmp_path) as r:
    assert r.keys() == sorted(tensors)
    for name, ref in tensors.items():
      assert name in r
      assert r.shape(name) == ref.shape
      assert r.dtype(name) == ref.dtype
      got = r.get(name)
      _bytes_equal(got, ref)
      assert got.flags.writeable and got.flags.owndata  # a copy, not an mmap view
  assert "missing" not in r


def test_data_section_aligned_and_metadata(tmp_path):
  path = tmp_path / "x.safetensors"
  write_safetensors(path, _sample_tensors(np.random.default_rng(1)), {"k": "v"})
  raw = path.read_bytes()
  hlen = int.from_bytes(raw[:8], "little")
  assert (8 + hlen) % 8 == 0
  with safe_open(str(path), "pt") as f:
    assert f.metadata() == {"format": "pt", "k": "v"}


def test_reads_files_written_by_torch(tmp_path):
  g = torch.Generator().manual_seed(0)
  ref = {
    "a.bf16": torch.randn(17, 33, generator=g).to(torch.bfloat16),
    "b.fp8": torch.randn(8, 16, generator=g).to(torch.float8_e4m3fn),
    "c.f32": torch.randn(3, 4, generator=g),
    "d.f16": torch.randn(5, generator=g).to(torch.float16),
    "e.i64": torch.arange(10),
    "f.bool": torch.tensor([True, False, True]),
  }
  save_file(ref, str(tmp_path / "model.safetensors"))
  with SafetensorsReader(tmp_path) as r:
    assert r.keys() == sorted(ref)
    for name, t in ref.items():
      got = r.get(name)
      assert got.shape == tuple(t.shape)
      if t.is_floating_point():
        np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
      else:
        np.testing.assert_array_equal(got, t.numpy())
  assert r.dtype("a.bf16") == np.dtype(ml_dtypes.bfloat16)
  assert r.dtype("b.fp8") == np.dtype(ml_dtypes.float8_e4m3fn)


def test_torch_loads_our_files(tmp_path):
  tensors = _sample_tensors(np.random.default_rng(2))
  path = tmp_path / "model.safetensors"
  write_safetensors(path, tensors)
  loaded = load_file(str(path))
  assert set(loaded) == set(tensors)
  assert loaded["bf16"].dtype == torch.bfloat16
  assert loaded["fp8"].dtype == torch.float8_e4m3fn
  for name, ref in tensors.items():
    t = loaded[name]
    assert tuple(t.shape) == ref.shape
    if t.is_floating_point():
      np.testing.assert_array_equal(t.float().numpy(), ref.astype(np.float32))
    else:
      np.testing.assert_array_equal(t.numpy(), ref)


def test_sharded_round_trip_streaming(tmp_path):
  rng = np.random.default_rng(3)
  tensors = {f"layer.{i}.w": rng.standard_normal((16, 16)).astype(np.float32) for i in range(7)}
  tensors["emb"] = rng.standard_normal((64, 16)).astype(ml_dtypes.bfloat16)
  gen = ((k, v) for k, v in tensors.items())  # streamed, not a dict
  files = write_sharded(tmp_path, gen, max_shard_bytes=2 * 16 * 16 * 4)
  assert len(files) >= 4
  n = len(files)
  expected_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert [f.name for f in files] == expected_names
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
  assert set(index["weight_map"]) == set(tensors)
  assert set(index["weight_map"].values()) == {f.name for f in files}
  assert not list(tmp_path.glob("*.partial"))
  with SafetensorsReader(tmp_path) as r:
    assert r.keys() == sorted(tensors)
    for name, ref in tensors.items():
      assert r.file_of(name).name == index["weight_map"][name]
      _bytes_equal(r.get(name), ref)


def test_sharded_single_file_and_no_index_scan(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.int32), "b": np.ones((2, 2), np.float16)}
  files = write_sharded(tmp_path / "one", tensors)
  assert [f.name for f in files] == ["model.safetensors"]
  assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
  # several files, no index: headers are scanned
  (tmp_path / "many").mkdir()
  write_safetensors(tmp_path / "many" / "x.safetensors", {"a": tensors["a"]})
  write_safetensors(tmp_path / "many" / "y.safetensors", {"b": tensors["b"]})
  with SafetensorsReader(tmp_path / "many") as r:
    assert r.keys() == ["a", "b"]
    _bytes_equal(r.get("b"), tensors["b"])


def _torch_dequant_reference(w, s, block=128):
  out = torch.empty(w.shape, dtype=torch.float32)
  for bi in range(s.shape[0]):
    for bj in range(s.shape[1]):
      rs = slice(bi * block, (bi + 1) * block)
      cs = slice(bj * block, (bj + 1) * block)
      out[rs, cs] = w[rs, cs].float() * s[bi, bj]
  return out


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 7), (257, 129)])
def test_dequantize_fp8_matches_torch(shape):
  g = torch.Generator().manual_seed(sum(shape))
  w = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
  s = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g) + 0.01
  ref = _torch_dequant_reference(w, s).numpy()
  w_np = w.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
  got = dequantize_fp8_blockwise(w_np, s.numpy())
  assert got.dtype == np.float32 and got.shape == shape
  np.testing.assert_array_equal(got, ref)
  got_bf16 = dequantize_fp8_blockwise(w_np, s.numpy(), out_dtype=ml_dtypes.bfloat16)
  assert got_bf16.dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(got_bf16, ref.astype(ml_dtypes.bfloat16))


def test_dequantize_wrong_scale_shape():
  w = np.zeros((300, 200), dtype=ml_dtypes.float8_e4m3fn)
  with pytest.raises(ValueError, match=r"\(2, 2\).*\(300, 200\)"):
    dequantize_fp8_blockwise(w, np.ones((2, 2), np.float32))


def test_missing_dir_and_empty_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    SafetensorsReader(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    SafetensorsReader(tmp_path)


def test_unknown_key(tmp_path):
  write_safetensors(tmp_path / "model.safetensors", {"a": np.zeros(3, np.float32)})
  with SafetensorsReader(tmp_path) as r:
    with pytest.raises(KeyError, match="model.layers.0.missing"):
      r.get("model.layers.0.missing")
    with pytest.raises(KeyError, match=str(tmp_path)):
      r.shape("nope")


def test_truncated_file(tmp_path):
  path = tmp_path / "model.safetensors"
  write_safetensors(path, {"a": np.zeros(3, np.float32), "big": np.ones((64, 64), np.float32)})
  raw = path.read_bytes()
  path.write_bytes(raw[:-100])
  with pytest.raises(ValueError, match=r"model\.safetensors.*'big'"):
    SafetensorsReader(tmp_path)
  path.write_bytes(raw[:5])
  with pytest.raises(ValueError, match="too small"):
    SafetensorsReader(tmp_path)
  path.write_bytes(raw[:40])
  with pytest.raises(ValueError, match="header length"):
    SafetensorsReader(tmp_path)
