"""The adapter: its geometry, its record in the tree, and its variants."""

from lora_jax.adapters import dora as _dora  # registers the DoRA variant
from lora_jax.adapters import lora as _lora  # registers the plain LoRA variant
from lora_jax.adapters.geometry import Geometry, Shape, Split
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Adapter, Quantized, Record, Trainable
from lora_jax.adapters.variant import Additive, Call, Variant, register_variant, variant_for

__all__ = [
    "Adapter",
    "Additive",
    "Call",
    "Geometry",
    "Plan",
    "Quantized",
    "Record",
    "Shape",
    "Split",
    "Trainable",
    "Variant",
    "register_variant",
    "variant_for",
]
del _dora, _lora
