"""Loading streams tensor by tensor: host memory (numpy allocations, seen by tracemalloc) peaks
near the loaded parameters plus a few single tensors, not at twice the checkpoint."""

import tracemalloc

import numpy as np
import pytest

import dsjax
from dsjax.checkpoint.safetensors_io import SafetensorsReader
from tests import hf_fixtures as hf
from tests.checkpoint.test_fp8 import write_fp8_pair


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("memory")
  config = hf.v3_config(hidden_size=64, intermediate_size=192, moe_intermediate_size=48,
                        vocab_size=128, n_routed_experts=16, n_group=4, topk_group=2,
                        num_hidden_layers=4)
  hf.build_torch_model(config, seed=8).save_pretrained(root / "fp32")
  write_fp8_pair(root / "fp32", root / "fp8", root / "deq", (32, 32), write_block_size=True)
  return root


@pytest.mark.parametrize("name", ["fp32", "fp8"])
def test_peak_host_memory_is_result_plus_a_few_tensors(checkpoints, name):
  path = checkpoints / name
  with SafetensorsReader(path) as reader:
    largest = max(int(np.prod(reader.shape(k))) * 4 for k in reader.keys())  # as float32
  dsjax.load_hf_checkpoint(path)  # warm up imports and compilation caches
  tracemalloc.start()
  model = dsjax.load_hf_checkpoint(path)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  result = sum(v.nbytes for v in hf.dsjax_params(model).values())
  print(f"{name}: result {result / 1e6:.2f} MB, largest tensor {largest / 1e6:.2f} MB, "
        f"numpy peak {peak / 1e6:.2f} MB")
  assert result > 20 * largest  # many tensors, so loading all at once would show
  assert peak < result + 4 * largest + 2**18
