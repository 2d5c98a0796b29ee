"""lora_jax: LoRA for JAX and Flax.

Adapters on unmodified Flax models, pure tree transforms (labels, partition, merge), and a
jit-compiled train step that differentiates only the adapters. Extension points live in their
own namespaces: `lora_jax.rules` (layer kinds), `lora_jax.adapters` (geometry, records,
variants), `lora_jax.quant` (4-bit formats and matmul), `lora_jax.io` (files). Tools:
`lora_jax.analysis` (what an adapter learned) and `lora_jax.memory` (a train step's bytes).
"""

from lora_jax import adapters, io, quant, rules
from lora_jax.config import LoraConfig, QuantConfig
from lora_jax.io import Checkpoint, CheckpointManager, load_adapter, save_adapter
from lora_jax.linen import LoRA, init, plan
from lora_jax.memory import MemoryEstimate, estimate_memory
from lora_jax.ops import (
    Combination,
    RequantizeReport,
    Summary,
    adapter_bank,
    adapter_names,
    add_adapter,
    add_weighted_adapter,
    combine,
    delete_adapter,
    keep_adapters,
    labels,
    merge,
    partition,
    quantization_errors,
    rename_adapter,
    summary,
    to_original_base,
    trainable_paths,
    unmerge,
)
from lora_jax.optim import optimizer
from lora_jax.quant import QuantizedTensor, dequantize, quantize
from lora_jax.sharding import param_shardings, partition_specs, shard
from lora_jax.train import TrainStep, make_train_step

__version__ = "0.2.0"

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "Combination",
    "LoRA",
    "LoraConfig",
    "MemoryEstimate",
    "QuantConfig",
    "QuantizedTensor",
    "RequantizeReport",
    "Summary",
    "TrainStep",
    "__version__",
    "adapter_bank",
    "adapter_names",
    "adapters",
    "add_adapter",
    "add_weighted_adapter",
    "combine",
    "delete_adapter",
    "dequantize",
    "estimate_memory",
    "init",
    "io",
    "keep_adapters",
    "labels",
    "load_adapter",
    "make_train_step",
    "merge",
    "optimizer",
    "param_shardings",
    "partition",
    "partition_specs",
    "plan",
    "quant",
    "quantization_errors",
    "quantize",
    "rename_adapter",
    "rules",
    "save_adapter",
    "shard",
    "summary",
    "to_original_base",
    "trainable_paths",
    "unmerge",
]
