"""dsjax: DeepSeek's model family in JAX/Flax NNX."""

from dsjax.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from dsjax.model import ModelOutput, Transformer

__all__ = ["MLAConfig", "ModelConfig", "MoEConfig", "ModelOutput", "RopeConfig", "Transformer"]
