"""Pure functions over LoRA trees: labels, partition and combine, merge and unmerge, named
adapters and their weighted combination, summary."""

from lora_jax.ops.merge import RequantizeReport, merge, unmerge
from lora_jax.ops.named import (
    adapter_bank,
    adapter_names,
    add_adapter,
    delete_adapter,
    keep_adapters,
    rename_adapter,
)
from lora_jax.ops.partition import FROZEN, TRAINABLE, combine, labels, partition, trainable_paths
from lora_jax.ops.residual import quantization_errors, to_original_base
from lora_jax.ops.summary import Summary, summary
from lora_jax.ops.weighted import Combination, add_weighted_adapter

__all__ = [
    "FROZEN",
    "TRAINABLE",
    "Combination",
    "RequantizeReport",
    "Summary",
    "adapter_bank",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "combine",
    "delete_adapter",
    "keep_adapters",
    "labels",
    "merge",
    "partition",
    "quantization_errors",
    "rename_adapter",
    "summary",
    "to_original_base",
    "trainable_paths",
    "unmerge",
]
