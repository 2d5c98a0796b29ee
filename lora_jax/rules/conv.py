"""The rule for `nn.Conv`: a conv to `rank` channels followed by a 1×1 to the output."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from lora_jax import _paths
from lora_jax.adapters.geometry import Shape, Split
from lora_jax.rules.base import Rule

Array = jax.Array


class ConvRule(Rule):
    """`nn.Conv`: a conv to `rank` channels (same window, strides, padding, dilation) followed
    by a 1×1 to the output channels. A is (window..., in_features, rank), B (rank, features)."""

    def split(self, module: nn.Module, shape: Shape, args: tuple, kwargs: dict) -> Split:
        if module.feature_group_count != 1 or module.mask is not None:
            raise ValueError(
                f"Module '{_paths.module_path(module)}': LoRA on nn.Conv supports "
                f"feature_group_count=1 and no mask, found feature_group_count="
                f"{module.feature_group_count}, mask={'set' if module.mask is not None else None}."
            )
        return Split(0, len(shape) - 1)

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
        down = module.clone(
            parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype, param_dtype=a.dtype
        )
        h = down.apply({"params": {"kernel": a}}, dropout(args[0].astype(a.dtype)))
        return h @ b

    def per_output(self, module: nn.Module, args: tuple, kwargs: dict, values: Array) -> Array:
        """`values` per output channel, (features,), against the output (channels last)."""
        return values.reshape((1,) * (jax.numpy.ndim(args[0]) - 1) + values.shape)

    def bias(self, module: nn.Module, args: tuple, kwargs: dict) -> Array | None:
        """The conv's bias (features,), or None."""
        if not module.use_bias or not module.has_variable("params", "bias"):
            return None
        return self.per_output(module, args, kwargs, module.get_variable("params", "bias"))
