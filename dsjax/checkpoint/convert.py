"""Converts a HuggingFace DeepSeek checkpoint directory into a dsjax Orbax model directory.

  python -m dsjax.checkpoint.convert --hf_dir=/path/to/DeepSeek-V2-Lite --out_dir=/tmp/v2lite \
      [--dtype=bfloat16]
"""

import sys

import jax.numpy as jnp
from absl import app, flags

from dsjax.checkpoint.hf_checkpoint import load_hf_checkpoint
from dsjax.checkpoint.orbax_io import save_model

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF directory: config.json + *.safetensors.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory for the Orbax checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv) -> int:
  del argv
  if not _HF_DIR.value or not _OUT_DIR.value:
    print("error: pass both --hf_dir and --out_dir", file=sys.stderr)
    return 2
  try:
    model = load_hf_checkpoint(_HF_DIR.value, dtype=getattr(jnp, _DTYPE.value))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  save_model(model, _OUT_DIR.value)
  print(f"wrote {_OUT_DIR.value} ({model.config.num_hidden_layers} layers, dtype {_DTYPE.value})")
  return 0


if __name__ == "__main__":
  app.run(main)
