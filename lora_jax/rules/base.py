"""The layer-rule interface: what one Flax layer class needs to get an adapter.

A rule says, for one layer class, which parameter gets an adapter, which methods' outputs
receive the adapter's output, how the parameter's axes split into (batch, input, output)
axes, and how to contract the layer's input with the adapter factors. Everything else —
creating the adapter leaves, scaling, dropout, dtypes, merging, sharding — is shared, and
reads the `Geometry` built from the rule's split once, at init.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax import _paths
from lora_jax.adapters.geometry import Shape, Split
from lora_jax.quant.formats import QuantizedTensor

Array = jax.Array


class Rule:
    """How one layer class gets LoRA. Subclass it and `register_rule` it for a custom layer.

    Attributes:
      param: name of the adapted parameter ("kernel", "embedding", ...).
      methods: module methods whose output gets the adapter's output.
      quantizable: whether `quantized_forward` is implemented (4-bit parameters).
    """

    param: str = "kernel"
    methods: tuple[str, ...] = ("__call__",)
    quantizable: bool = False

    def split(self, module: nn.Module, shape: Shape, args: tuple, kwargs: dict) -> Split:
        """Splits the parameter's axes into (batch, input, output)."""
        raise NotImplementedError

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
        """The adapter output ``x @ A @ B`` for one call, shaped like the method's output.

        `a` and `b` arrive cast to the compute dtype (B already scaled); apply `dropout` to
        the floating input before it meets A.
        """
        raise NotImplementedError

    def quantized_forward(
        self,
        module: nn.Module,
        method: str,
        args: tuple,
        kwargs: dict,
        qt: QuantizedTensor,
        kernel: str,
    ) -> Array:
        """The method's output when the parameter is a 4-bit `QuantizedTensor` (QLoRA).

        Only linear rules compute through the dequantizing matmul; other kinds refuse.
        """
        raise ValueError(
            f"Module '{_paths.module_path(module)}' ({type(module).__name__}) has a quantized "
            f"'{self.param}', but 4-bit parameters are supported only for linear layers "
            "(Dense, DenseGeneral, Einsum and LinearRule layers). Leave it out of "
            "QuantConfig.targets."
        )

    def init(
        self, which: str, init: str, key: Array, shape: Shape, dtype: Any, fan_in: int
    ) -> Array:
        """Initial value of A (`which` == "a") or B; B starts at zero so ΔW starts at zero."""
        if which == "b":
            return jnp.zeros(shape, dtype)
        if init == "gaussian":
            rank = shape[-1]
            return jax.random.normal(key, shape, dtype) / rank
        bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on A
        return jax.random.uniform(key, shape, dtype, -bound, bound)
