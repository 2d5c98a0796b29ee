"""Reference Flax models used by examples, tests and benchmarks. They know nothing of LoRA."""

from lora_jax.models.llama import (
    REMAT_POLICIES,
    Llama,
    LlamaConfig,
    causal_lm_loss,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "REMAT_POLICIES",
    "Llama",
    "LlamaConfig",
    "causal_lm_loss",
    "stack_layers",
    "unstack_layers",
]
