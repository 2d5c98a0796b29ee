"""The flax.linen front end: the `LoRA` wrapper module, `plan` and `init`."""

from lora_jax.linen.init import init, plan
from lora_jax.linen.module import LoRA

__all__ = ["LoRA", "init", "plan"]
