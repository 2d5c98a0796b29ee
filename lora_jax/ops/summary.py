"""Parameter counts and bytes of a LoRA tree (PEFT's print_trainable_parameters)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax import _paths, _trees
from lora_jax.ops.partition import trainable_paths
from lora_jax.quant.formats import QuantizedTensor


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts and bytes of a LoRA tree ("params" collection only)."""

    trainable_params: int
    total_params: int
    trainable_bytes: int
    total_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {self.trainable_percent:.4f} || trainable bytes: "
            f"{_fmt_bytes(self.trainable_bytes)} of {_fmt_bytes(self.total_bytes)}"
        )


def summary(params: Mapping[str, Any]) -> Summary:
    """Counts trainable vs all parameters and their bytes (PEFT's print_trainable_parameters).

    Works on concrete arrays and on `jax.eval_shape` results alike; a 4-bit kernel counts its
    logical size and its packed bytes.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> tree = {"params": {"q": {"kernel": jnp.zeros((8, 8)), "kernel_lora_a": jnp.zeros((8, 2)),
      ...                          "kernel_lora_b": jnp.zeros((2, 8))}}}
      >>> print(lj.summary(tree))
      trainable params: 32 || all params: 96 || trainable%: 33.3333 || trainable bytes: 128 B of 384 B
    """
    trainable = trainable_paths(params)
    counts = {True: [0, 0], False: [0, 0]}
    for k, v in _trees.flat(params).items():
        if not k.startswith(_paths.PARAMS + "/"):
            continue
        v = _trees.unbox(v)
        size = math.prod(jnp.shape(v))
        nbytes = v.nbytes if isinstance(v, QuantizedTensor) else size * jnp.dtype(v.dtype).itemsize
        counts[k in trainable][0] += size
        counts[k in trainable][1] += nbytes
    (tp, tb), (fp, fb) = counts[True], counts[False]
    return Summary(
        trainable_params=tp, total_params=tp + fp, trainable_bytes=tb, total_bytes=tb + fb
    )


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    for i, unit in enumerate(units):
        n /= 1024
        if n < 1024 or i == len(units) - 1:
            return f"{n:.2f} {unit}"
    return f"{n:.2f} TiB"
