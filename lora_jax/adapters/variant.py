"""The variant protocol: what an adapter adds to a layer, beyond its geometry.

A variant says which leaves an adapter has, how they start, what they add to a layer's output
and what they add to the parameter when merged. Plain LoRA (`lora_jax.adapters.lora`) is one;
a variant that needs the base weight to start (PiSSA, OLoRA, ...) reads it in `init`. The
layer-kind rules (`lora_jax.rules`) stay unaware of variants: a variant calls its rule for the
layer-specific contraction.

Most variants add to the output and to the weight (`forward`, `delta_weight`); `Additive`
gives them `output` (base output + `forward`) and `merged_weight` (kernel + `delta_weight`).
A variant that rescales the whole output, as DoRA does (`lora_jax.adapters.dora`), overrides
`output` and `merged_weight`, which see the base output and the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

from lora_jax.adapters.geometry import Geometry, Shape

Array = jax.Array
Dropout = Callable[[Array], Array]


class Call(Protocol):
    """One intercepted layer call: the module, the method's name and its arguments."""

    module: Any
    method: str
    args: tuple
    kwargs: dict


class Variant(Protocol):
    """An adapter variant. Implementations are stateless; register one with
    `register_variant`."""

    name: str

    def leaves(self, geometry: Geometry) -> dict[str, Shape]:
        """The adapter's leaves by leaf name ("a", "b", ...), with their shapes."""
        ...

    def axes(
        self, geometry: Geometry, kernel_axes: tuple, ndim: int | None = None
    ) -> dict[str, tuple]:
        """Axis annotations (mesh axes or logical names) of each leaf from the kernel's, as
        `Geometry.leaf_axes` gives them for A and B; `ndim` is the stored kernel's."""
        ...

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
        """The initial value of one leaf. `init` is `LoraConfig.init`; `kernel` the adapted
        parameter's (dense) value, for variants that start from it."""
        ...

    def forward(
        self,
        rule: Any,
        call: Call,
        leaves: Mapping[str, Array],
        scale: float,
        dropout: Dropout,
        dtype: Any,
    ) -> Array:
        """What the adapter adds to the method's output, in `dtype`."""
        ...

    def delta_weight(self, geometry: Geometry, leaves: Mapping[str, Array], scale: float) -> Array:
        """What the adapter adds to the parameter when merged, as a dense float32 array (with
        the leaves' leading stacked axes, if any)."""
        ...

    def output(
        self,
        rule: Any,
        call: Call,
        leaves: Mapping[str, Array],
        scale: float,
        dropout: Dropout,
        dtype: Any,
        base: Array,
        kernel: Array,
    ) -> Array:
        """The method's output with the adapter, from its output without (`base`, in its own
        dtype, which the result keeps) and the layer's (dense) `kernel` as the layer sees it."""
        ...

    def merged_weight(
        self, geometry: Geometry, kernel: Array, leaves: Mapping[str, Array], scale: float
    ) -> Array:
        """The merged parameter in float32, from the float32 `kernel` (leading stacked axes as
        the leaves have them)."""
        ...

    def refuses(self, rule: Any, quantized: bool) -> str | None:
        """Why this variant cannot adapt a layer of `rule`'s kind (a 4-bit kernel when
        `quantized`), for the error message; None when it can."""
        ...


class Additive:
    """The defaults of a variant that adds to the output and to the weight: `output` is
    ``base + forward(...)``, `merged_weight` is ``kernel + delta_weight(...)``."""

    def output(
        self,
        rule: Any,
        call: Call,
        leaves: Mapping[str, Array],
        scale: float,
        dropout: Dropout,
        dtype: Any,
        base: Array,
        kernel: Array,
    ) -> Array:
        delta = self.forward(rule, call, leaves, scale, dropout, dtype)  # type: ignore[attr-defined]
        return base + delta.astype(base.dtype)

    def merged_weight(
        self, geometry: Geometry, kernel: Array, leaves: Mapping[str, Array], scale: float
    ) -> Array:
        return kernel + self.delta_weight(geometry, leaves, scale)  # type: ignore[attr-defined]

    def refuses(self, rule: Any, quantized: bool) -> str | None:
        return None


_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> None:
    """Registers (or replaces) a variant under its `name`."""
    _VARIANTS[variant.name] = variant


def variant_for(name: str) -> Variant:
    """The registered variant called `name`."""
    if name not in _VARIANTS:
        raise ValueError(f"Unknown adapter variant {name!r}; known: {sorted(_VARIANTS)}.")
    return _VARIANTS[name]
