"""lora_jax: LoRA for JAX and Flax.

Adapters on unmodified Flax models, pure tree transforms (labels, partition, merge), and a
jit-compiled train step that differentiates only the adapters.
"""

from lora_jax.config import LoraConfig
from lora_jax.layers import ConvRule, EmbedRule, LinearRule, Rule, Split, register_rule
from lora_jax.optim import optimizer
from lora_jax.train import TrainStep, make_train_step
from lora_jax.tree import Summary, combine, labels, merge, partition, summary, trainable_paths
from lora_jax.wrapper import LoRA, init

__version__ = "0.1.0"

__all__ = [
    "ConvRule",
    "EmbedRule",
    "LinearRule",
    "LoRA",
    "LoraConfig",
    "Rule",
    "Split",
    "Summary",
    "TrainStep",
    "__version__",
    "combine",
    "init",
    "labels",
    "make_train_step",
    "merge",
    "optimizer",
    "partition",
    "register_rule",
    "summary",
    "trainable_paths",
]
