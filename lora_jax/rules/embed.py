"""The rule for `nn.Embed`: a lookup into A followed by B; `attend` (tied output heads) gets
the transposed product."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.adapters.geometry import Shape, Split
from lora_jax.rules.base import Rule

Array = jax.Array


class EmbedRule(Rule):
    """`nn.Embed`: the adapter adds a lookup into A followed by B; `attend` (tied output
    heads) gets the transposed delta. Initialized as PEFT does for embeddings: A zeros,
    B normal, so ΔW starts at zero."""

    param = "embedding"
    methods = ("__call__", "attend")

    def split(self, module: nn.Module, shape: Shape, args: tuple, kwargs: dict) -> Split:
        return Split(0, 1)

    def delta(
        self,
        module: nn.Module,
        method: str,
        args: tuple,
        kwargs: dict,
        a: Array,
        b: Array,
        dropout: Callable[[Array], Array],
    ) -> Array:
        if method == "attend":
            query = dropout(args[0].astype(a.dtype))
            return (query @ b.T) @ a.T
        return jnp.take(a, args[0], axis=0) @ b

    def init(
        self, which: str, init: str, key: Array, shape: Shape, dtype: Any, fan_in: int
    ) -> Array:
        if which == "a":
            return jnp.zeros(shape, dtype)
        return jax.random.normal(key, shape, dtype)

    def per_output(self, module: nn.Module, args: tuple, kwargs: dict, values: Array) -> Array:
        """`values` per embedding feature, (features,): the lookup's last axis. (`attend`'s
        output is over the vocabulary: a per-feature factor there scales its query instead,
        see `scales_input`.)"""
        ndim = jnp.ndim(args[0]) + 1  # the lookup adds the feature axis
        return values.reshape((1,) * (ndim - 1) + values.shape)

    def bias(self, module: nn.Module, args: tuple, kwargs: dict) -> Array | None:
        return None

    def scales_input(self, method: str) -> bool:
        """Whether the kernel's output axis is the method's input (`attend`: q @ Eᵀ), so a
        per-output factor scales the input rather than the output."""
        return method == "attend"
