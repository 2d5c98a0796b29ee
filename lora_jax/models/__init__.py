"""Reference Flax models used by examples, tests and benchmarks. They know nothing of LoRA."""

from lora_jax.models.llama import (
    Llama,
    LlamaConfig,
    causal_lm_loss,
    stack_layers,
    unstack_layers,
)

__all__ = ["Llama", "LlamaConfig", "causal_lm_loss", "stack_layers", "unstack_layers"]
