"""Fused dequantize-matmul kernels (Pallas) for 4-bit base weights.

`lora_jax.quant` holds the pure-jnp reference (dequantize, then `dot_general`), which is also
the fallback on every backend that the kernels do not serve.
"""
