"""Plain LoRA (Hu et al. 2021): ΔW = scale · A @ B, A (in, r) and B (r, out), B starting at
zero (embeddings: A at zero, as PEFT does) so the adapted model starts as the base model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters.geometry import Geometry, Shape
from lora_jax.adapters.variant import Additive, Call, Dropout, register_variant

Array = jax.Array


class Lora(Additive):
    """The "lora" variant: leaves "a" and "b"."""

    name = "lora"

    def leaves(self, geometry: Geometry) -> dict[str, Shape]:
        return {"a": geometry.a_shape, "b": geometry.b_shape}

    def axes(
        self, geometry: Geometry, kernel_axes: tuple, ndim: int | None = None
    ) -> dict[str, tuple]:
        return geometry.leaf_axes(kernel_axes, ndim)

    def init(
        self,
        leaf: str,
        key: Array,
        geometry: Geometry,
        rule: Any,
        init: str,
        dtype: Any,
        kernel: Array,
    ) -> Array:
        shape = self.leaves(geometry)[leaf]
        return rule.init(leaf, init, key, shape, dtype, geometry.fan_in)

    def forward(
        self,
        rule: Any,
        call: Call,
        leaves: Mapping[str, Array],
        scale: float,
        dropout: Dropout,
        dtype: Any,
    ) -> Array:
        # The delta is linear in B: scaling B (rank x out) costs far less than scaling the
        # (tokens x out) delta (measured: 9% fewer bytes accessed per all-linear train step).
        b = (leaves["b"].astype(jnp.float32) * scale).astype(dtype)
        a = leaves["a"].astype(dtype)
        return rule.delta(call.module, call.method, call.args, call.kwargs, a, b, dropout)

    def delta_weight(self, geometry: Geometry, leaves: Mapping[str, Array], scale: float) -> Array:
        return geometry.delta(leaves["a"], leaves["b"], scale)


LORA = Lora()
register_variant(LORA)
