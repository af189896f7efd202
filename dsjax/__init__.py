"""dsjax: DeepSeek's model family in JAX/Flax NNX."""

from dsjax.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from dsjax.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from dsjax.experiment import load_config
from dsjax.infer import Generator, generate
from dsjax.model import ModelOutput, Transformer

__all__ = [
    "Generator", "MLAConfig", "ModelConfig", "MoEConfig", "ModelOutput", "RopeConfig",
    "Transformer", "generate", "load_config", "load_hf_checkpoint", "save_hf_checkpoint",
]
