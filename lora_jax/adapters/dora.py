"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), for linear layers.

DoRA splits the adapted kernel into a direction and a magnitude per output feature: besides
LoRA's A (in, r) and B (r, out), it trains m (out,), one magnitude per output feature, that
starts at the column norms of the pretrained kernel, ``m_j = ‖W[:, j]‖₂`` (the norm over the
input axes; PEFT's weight is (out, in) and takes the norm of each row, the same numbers). With
``V = W + scale · A @ B``:

- forward: ``y = (m / ‖V‖_col) ⊙ (x @ W + scale · dropout(x) @ A @ B) + bias``;
- merge: ``W' = (m / ‖V‖_col) ⊙ V``, column by column.

The column norm ‖V‖_col is treated as a constant in the backward pass (`jax.lax.stop_gradient`),
the paper's §4.3 memory trick, as PEFT's ``use_dora=True`` does: gradients reach m, A and B,
but not through the norm. With B at zero at init, m equals the norm and the layer's output is
the base output: the forward adds ``(m / ‖V‖ - 1) ⊙ (x @ W) + (m / ‖V‖) ⊙ (scale · x @ A @ B)``
to it, which is exactly zero when the norm computed in the forward pass rounds like the one
computed at init (it is the same float32 function of the same values).

Dropout acts on x on the LoRA path only, as PEFT's LoRA does: the base term uses the clean x.
(PEFT's DoRA in training mode with dropout also feeds the dropped x to its ``(m/‖V‖ - 1) ⊙ x @ W``
term; without dropout, or in eval mode, the two agree.)

Multi-axis kernels (`nn.DenseGeneral`, `nn.Einsum`) keep their axes: m has the kernel's batch
and output axes (batch..., out...), the shape of the layer's bias, and the norm runs over the
contracted axes. On a 4-bit base (QDoRA) W is the dequantized kernel, in the init of m, the
norm and the merge. Embeddings (as PEFT: one magnitude per embedding feature, the norm over the
vocabulary) and convolutions (one per output channel, the norm over window and input
channels) follow the same formulas; an embedding's `attend` (a tied output head) computes
``(q ⊙ m/‖V‖) @ Vᵀ``, what the merged embedding gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters.geometry import Geometry, Shape
from lora_jax.adapters.lora import LORA
from lora_jax.adapters.variant import Call, Dropout, register_variant

Array = jax.Array


def column_norm(geometry: Geometry, kernel: Array, *, keepdims: bool = False) -> Array:
    """The float32 norm of each output feature's column of `kernel` (batch..., in..., out...,
    leading stacked axes allowed): the 2-norm over the contracted axes."""
    lead = kernel.ndim - len(geometry.shape) + geometry.n_batch
    axes = tuple(range(lead, lead + geometry.n_in))
    return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=axes, keepdims=keepdims))


def _v(geometry: Geometry, kernel: Array, leaves: Mapping[str, Array], scale: float) -> Array:
    """V = W + scale · A @ B in float32, the weight whose column norms DoRA divides by (the
    forward pass and the merge form it alike)."""
    return kernel + geometry.delta(leaves["a"], leaves["b"], scale)


class Dora:
    """The "dora" variant: leaves "a" and "b" (as LoRA) and "m", the magnitude per output
    feature, shaped (batch..., out...)."""

    name = "dora"

    def leaves(self, geometry: Geometry) -> dict[str, Shape]:
        return {**LORA.leaves(geometry), "m": geometry.batch_shape + geometry.out_shape}

    def axes(
        self, geometry: Geometry, kernel_axes: tuple, ndim: int | None = None
    ) -> dict[str, tuple]:
        ndim = len(geometry.shape) if ndim is None else ndim
        axes = tuple(kernel_axes) + (None,) * (ndim - len(tuple(kernel_axes)))
        lead = ndim - len(geometry.shape) + geometry.n_batch  # stacked + batch
        m = (*axes[:lead], *axes[lead + geometry.n_in :])
        return {**geometry.leaf_axes(kernel_axes, ndim), "m": m}

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
        if leaf == "m":
            return column_norm(geometry, kernel).astype(dtype)
        return LORA.init(leaf, key, geometry, rule, init, dtype, kernel)

    def forward(
        self,
        rule: Any,
        call: Call,
        leaves: Mapping[str, Array],
        scale: float,
        dropout: Dropout,
        dtype: Any,
    ) -> Array:
        """The LoRA path alone, ``scale · dropout(x) @ A @ B`` (`output` rescales it)."""
        return LORA.forward(rule, call, leaves, scale, dropout, dtype)

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
        module, args, kwargs = call.module, call.args, call.kwargs
        split = rule.split(module, tuple(kernel.shape), args, kwargs)
        geometry = Geometry.of(kernel.shape, split, leaves["a"].shape[-1])
        merged = _v(geometry, kernel.astype(jnp.float32), leaves, scale)
        norm = jax.lax.stop_gradient(column_norm(geometry, merged))  # DoRA §4.3
        ratio = leaves["m"].astype(jnp.float32) / norm  # (batch..., out...)
        if getattr(rule, "scales_input", lambda _: False)(call.method):
            # An embedding's `attend` (q @ Eᵀ): the merged E' = V ⊙ ratio gives
            # (q ⊙ ratio) @ Vᵀ = (q ⊙ ratio) @ Eᵀ + LoRA's path on q ⊙ ratio.
            q = args[0].astype(dtype)
            q = q * ratio.astype(dtype).reshape((1,) * (q.ndim - 1) + ratio.shape)
            scaled = type(call)(module, call.method, (q, *args[1:]), kwargs)
            lora = self.forward(rule, scaled, leaves, scale, dropout, dtype)
            return (jnp.dot(q, kernel.astype(dtype).T) + lora).astype(base.dtype)
        lay = lambda v: rule.per_output(module, args, kwargs, v)
        bias = rule.bias(module, args, kwargs)
        plain = base if bias is None else base - bias.astype(base.dtype)  # x @ W
        lora = self.forward(rule, call, leaves, scale, dropout, dtype)
        # m/‖V‖ - 1 is small: take it in float32 before the cast (bf16 would round it to 0).
        extra = lay((ratio - 1.0).astype(dtype)) * plain.astype(dtype)
        extra = extra + lay(ratio.astype(dtype)) * lora
        return base + extra.astype(base.dtype)

    def delta_weight(self, geometry: Geometry, leaves: Mapping[str, Array], scale: float) -> Array:
        """LoRA's ``scale · A @ B`` alone: DoRA's merge is `merged_weight`, not an addition."""
        return LORA.delta_weight(geometry, leaves, scale)

    def merged_weight(
        self, geometry: Geometry, kernel: Array, leaves: Mapping[str, Array], scale: float
    ) -> Array:
        merged = _v(geometry, kernel, leaves, scale)
        norm = column_norm(geometry, merged, keepdims=True)
        m = leaves["m"].astype(jnp.float32)
        cut = m.ndim - len(geometry.out_shape)  # stacked + batch axes
        m = m.reshape(m.shape[:cut] + (1,) * geometry.n_in + m.shape[cut:])
        return merged * (m / norm)

    def refuses(self, rule: Any, quantized: bool) -> str | None:
        if not (hasattr(rule, "per_output") and hasattr(rule, "bias")):
            return (
                "DoRA needs the layer's rule to lay out a per-output-feature vector "
                "(Rule.per_output and Rule.bias), which this layer kind's rule does not"
            )
        return None  # a 4-bit kernel (QDoRA) reaches `init` and `output` dequantized


DORA = Dora()
register_variant(DORA)
