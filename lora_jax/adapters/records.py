"""What the "lora" collection holds: one record per adapted parameter, and markers.

Records are pytrees without array leaves (every field is static), so they pass through
`jax.jit`, `jax.eval_shape`, `nn.scan` and sharding trees unchanged, and a function of the
tree reads them in Python even under a trace. A tree from `lora_jax.init` therefore says on
its own what every adapter is: merge, partition, sharding and the adapter files read the
records; none re-derives them.
"""

from __future__ import annotations

from typing import Any

from flax import struct

from lora_jax.adapters.geometry import Geometry

_STATIC = dict(pytree_node=False)


@struct.dataclass
class Adapter:
    """The record of one adapter (at ``lora/<module>/<param>_lora``).

    Attributes:
      geometry: where its leaves lie against the parameter (shapes, axis split, rank).
      scale: the factor on ΔW: alpha / rank, or alpha / sqrt(rank) with rsLoRA.
      variant: the adapter variant's name ("lora" or "dora", `LoraConfig.variant`), see
        `lora_jax.adapters.variant`.
    """

    geometry: Geometry = struct.field(**_STATIC)
    scale: float = struct.field(**_STATIC)
    variant: str = struct.field(default="lora", **_STATIC)

    @property
    def rank(self) -> int:
        return self.geometry.rank

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "shape": list(g.shape), "n_batch": g.n_batch, "n_in": g.n_in, "rank": g.rank,
            "scale": self.scale, "variant": self.variant,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any], *, scale: float | None = None) -> Adapter:
        geometry = Geometry(tuple(data["shape"]), data["n_batch"], data["n_in"], data["rank"])
        return cls(geometry, float(data["scale"] if scale is None else scale), data["variant"])


@struct.dataclass
class Trainable:
    """The marker of a base parameter trained in full (`LoraConfig.trainable`), at
    ``lora/<module>/<param>_trainable``."""


@struct.dataclass
class Quantized:
    """The marker of a kernel kept in 4 bits (`LoraConfig.quantize`), at
    ``lora/<module>/<param>_4bit``, with its axis split as its layer sees it (what `init`
    quantizes it by).

    Attributes:
      n_batch: leading batch axes (one matrix per index).
      n_in: contracted axes.
      ndim: the kernel's axes as the layer sees them (a stacked model stores more, leading).
    """

    n_batch: int = struct.field(**_STATIC)
    n_in: int = struct.field(**_STATIC)
    ndim: int = struct.field(**_STATIC)

    def lead_axes(self, stored_ndim: int) -> int:
        """Leading (stacked and batch) axes of the kernel as stored."""
        return self.n_batch + stored_ndim - self.ndim


Record = Adapter | Trainable | Quantized
