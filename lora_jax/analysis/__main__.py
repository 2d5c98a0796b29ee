"""``python -m lora_jax.analysis ADAPTER [OTHER] --base MODEL``: see `lora_jax.analysis.report`."""

from lora_jax.analysis.report import main

main()
