"""Pure functions over LoRA trees: labels, partition and combine, merge, summary."""

from lora_jax.ops.merge import RequantizeReport, merge
from lora_jax.ops.partition import FROZEN, TRAINABLE, combine, labels, partition, trainable_paths
from lora_jax.ops.summary import Summary, summary

__all__ = [
    "FROZEN",
    "TRAINABLE",
    "RequantizeReport",
    "Summary",
    "combine",
    "labels",
    "merge",
    "partition",
    "summary",
    "trainable_paths",
]
