"""Reference Flax models used by examples, tests and benchmarks, and text generation with
them. They know nothing of LoRA (a `lora_jax.LoRA` wraps them from outside)."""

from lora_jax.models.generate import Generation, generate
from lora_jax.models.llama import (
    REMAT_POLICIES,
    Llama,
    LlamaConfig,
    causal_lm_loss,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.rope import RopeScaling, rope_frequencies

__all__ = [
    "REMAT_POLICIES",
    "Generation",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "causal_lm_loss",
    "generate",
    "rope_frequencies",
    "stack_layers",
    "unstack_layers",
]
