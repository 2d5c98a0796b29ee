"""lora_jax: LoRA for JAX and Flax.

Adapters on unmodified Flax models, pure tree transforms (labels, partition, merge), and a
jit-compiled train step that differentiates only the adapters.
"""

from lora_jax.checkpoint import CheckpointManager, TrainState, load_adapter, save_adapter
from lora_jax.config import LoraConfig, QuantConfig
from lora_jax.layers import ConvRule, EmbedRule, LinearRule, Rule, Split, register_rule
from lora_jax.optim import optimizer
from lora_jax.quant import QuantizedTensor, dequantize, quantize
from lora_jax.sharding import param_shardings, partition_specs, shard
from lora_jax.train import TrainStep, make_train_step
from lora_jax.tree import (
    RequantizeReport,
    Summary,
    combine,
    labels,
    merge,
    partition,
    summary,
    trainable_paths,
)
from lora_jax.wrapper import LoRA, init

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "ConvRule",
    "EmbedRule",
    "LinearRule",
    "LoRA",
    "LoraConfig",
    "QuantConfig",
    "QuantizedTensor",
    "RequantizeReport",
    "Rule",
    "Split",
    "Summary",
    "TrainState",
    "TrainStep",
    "__version__",
    "combine",
    "dequantize",
    "init",
    "labels",
    "load_adapter",
    "make_train_step",
    "merge",
    "optimizer",
    "param_shardings",
    "partition",
    "partition_specs",
    "quantize",
    "register_rule",
    "save_adapter",
    "shard",
    "summary",
    "trainable_paths",
]
