"""dsjax: DeepSeek's model family in JAX/Flax NNX."""

from dsjax.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from dsjax.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from dsjax.experiment import load_config
from dsjax.model import ModelOutput, Transformer

__all__ = [
    "MLAConfig", "ModelConfig", "MoEConfig", "ModelOutput", "RopeConfig", "Transformer",
    "load_config", "load_hf_checkpoint", "save_hf_checkpoint",
]
