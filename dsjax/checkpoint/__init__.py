"""Checkpoint I/O: HuggingFace safetensors import/export (FP8 aware) and Orbax."""

from dsjax.checkpoint.hf_checkpoint import load_hf_checkpoint, read_hf_config, save_hf_checkpoint

__all__ = ["load_hf_checkpoint", "read_hf_config", "save_hf_checkpoint"]
