"""Orbax model directories and the `python -m dsjax.checkpoint.convert` CLI."""

import subprocess
import sys

import numpy as np
import pytest

import dsjax
from dsjax.checkpoint.orbax_io import load_model, save_model
from tests import hf_fixtures as hf
from tests.model_fixtures import randomized_model, tiny_config


def test_orbax_save_load_restores_every_variable(tmp_path):
  model = randomized_model(tiny_config(), seed=7)  # has an MTP module and router biases
  save_model(model, tmp_path / "orbax")
  restored = load_model(tmp_path / "orbax")
  assert restored.config == model.config
  ours, ref = hf.dsjax_params(restored), hf.dsjax_params(model)
  assert ours.keys() == ref.keys()
  for path in ref:
    np.testing.assert_array_equal(ours[path], ref[path], err_msg=str(path))


def test_convert_cli_writes_a_loadable_orbax_checkpoint(tmp_path):
  hf.build_torch_model(hf.v3_config(), seed=3).save_pretrained(tmp_path / "hf")
  result = subprocess.run(
      [sys.executable, "-m", "dsjax.checkpoint.convert", f"--hf_dir={tmp_path / 'hf'}",
       f"--out_dir={tmp_path / 'out'}", "--dtype=float32"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  converted = hf.dsjax_params(load_model(tmp_path / "out"))
  direct = hf.dsjax_params(dsjax.load_hf_checkpoint(tmp_path / "hf"))
  assert converted.keys() == direct.keys()
  for path in direct:
    np.testing.assert_array_equal(converted[path], direct[path], err_msg=str(path))


def test_convert_cli_reports_a_missing_directory(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dsjax.checkpoint.convert", f"--hf_dir={tmp_path / 'nope'}",
       f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "does not exist" in errors[0]
  assert not (tmp_path / "out").exists()


def test_load_model_explains_a_wrong_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    load_model(tmp_path)

