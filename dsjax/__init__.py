"""dsjax: DeepSeek's model family in JAX/Flax NNX."""

from dsjax.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from dsjax.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from dsjax.model import ModelOutput, Transformer

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "MLAConfig", "ModelConfig", "MoEConfig", "ModelOutput", "RopeConfig", "Transformer"]
