"""dsjax: DeepSeek's model family in JAX/Flax NNX."""

from dsjax.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from dsjax.config import MLAConfig, ModelConfig, MoEConfig, NSAConfig, RopeConfig
from dsjax.experiment import load_config, load_experiment
from dsjax.infer import Generator, generate
from dsjax.model import ModelOutput, Transformer

__all__ = [
    "Generator", "MLAConfig", "ModelConfig", "MoEConfig", "ModelOutput", "NSAConfig",
    "RopeConfig", "Transformer", "generate", "load_config", "load_experiment",
    "load_hf_checkpoint", "save_hf_checkpoint",
]
