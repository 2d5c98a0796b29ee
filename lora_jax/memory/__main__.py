"""``python -m lora_jax.memory``: the memory table of `lora_jax.memory.estimate_memory`."""

from lora_jax.memory import main

main()
