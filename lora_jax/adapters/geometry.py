"""The geometry of one adapter: how its leaves lie against the parameter they adapt.

A layer rule splits the adapted parameter's axes into (batch..., in..., out...): batch axes
(one adapter per index, e.g. the heads of a per-head `nn.Einsum`), contracted input axes and
output axes. The adapter then has A (batch..., in..., rank) and B (batch..., rank, out...):
multi-axis kernels keep their axes (heads stay an axis and shard like the kernel), and ΔW is
``einsum(A, B)`` over the rank axis, in the parameter's own layout.

`Geometry` is computed once, at init, from the rule, and recorded in the tree (inside the
adapter's record in the "lora" collection). Everything downstream — the forward pass, merge,
sharding specs, adapter files, analysis — reads it; none re-derives it from array ranks.

A stacked-layer model (`nn.scan`) stores the parameter with extra leading axes that its layer
never sees; every method here that takes a stored shape treats those as leading batch axes.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Split:
    """How a parameter's axes divide: leading `n_batch` batch axes (one adapter per index),
    then `n_in` input (contracted) axes, then the output axes. What a layer rule returns."""

    n_batch: int
    n_in: int

    def adapter_shapes(self, shape: Shape, rank: int) -> tuple[Shape, Shape]:
        """Shapes of A (batch..., in..., rank) and B (batch..., rank, out...)."""
        geometry = Geometry(tuple(shape), self.n_batch, self.n_in, rank)
        return geometry.a_shape, geometry.b_shape

    def fan_in(self, shape: Shape) -> int:
        return math.prod(shape[self.n_batch : self.n_batch + self.n_in])


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where an adapter's axes lie, for a parameter of `shape` as its layer sees it.

    Attributes:
      shape: the adapted parameter's shape (batch..., in..., out...), as the layer sees it.
      n_batch: leading batch axes (shared by A and B).
      n_in: contracted input axes.
      rank: the adapter's rank r.
    """

    shape: Shape
    n_batch: int
    n_in: int
    rank: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        ok = (
            self.n_batch >= 0
            and self.n_in >= 1
            and self.n_batch + self.n_in < len(self.shape)
            and self.rank >= 1
        )
        if not ok:
            raise ValueError(
                f"An adapter needs at least one input and one output axis: shape {self.shape} "
                f"split into {self.n_batch} batch and {self.n_in} input axes, rank {self.rank}."
            )

    @classmethod
    def of(cls, shape: Shape, split: Split, rank: int) -> Geometry:
        return cls(tuple(shape), split.n_batch, split.n_in, rank)

    # ---------------------------------------------------------------- axes and shapes

    @property
    def split(self) -> Split:
        return Split(self.n_batch, self.n_in)

    @property
    def n_out(self) -> int:
        return len(self.shape) - self.n_batch - self.n_in

    @property
    def batch_shape(self) -> Shape:
        return self.shape[: self.n_batch]

    @property
    def in_shape(self) -> Shape:
        return self.shape[self.n_batch : self.n_batch + self.n_in]

    @property
    def out_shape(self) -> Shape:
        return self.shape[self.n_batch + self.n_in :]

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def a_shape(self) -> Shape:
        """(batch..., in..., rank)."""
        return self.batch_shape + self.in_shape + (self.rank,)

    @property
    def b_shape(self) -> Shape:
        """(batch..., rank, out...)."""
        return (*self.batch_shape, self.rank, *self.out_shape)

    def b_rank_axis(self, b_ndim: int) -> int:
        """B's rank axis for a B of `b_ndim` axes (leading stacked axes included)."""
        return b_ndim - self.n_out - 1

    def stacked(self, stored_shape: Sequence[int]) -> int:
        """How many leading axes the stored parameter has that its layer never sees
        (`nn.scan`-stacked layers); raises if the stored shape does not end in `shape`."""
        extra = len(stored_shape) - len(self.shape)
        if extra < 0 or tuple(stored_shape[extra:]) != self.shape:
            raise ValueError(f"shape {tuple(stored_shape)} does not end in {self.shape}")
        return extra

    def leaf_shapes(self, stored_shape: Sequence[int]) -> dict[str, Shape]:
        """The stored shapes of A and B for a parameter stored with `stored_shape`."""
        lead = tuple(stored_shape[: self.stacked(stored_shape)])
        return {"a": lead + self.a_shape, "b": lead + self.b_shape}

    # ---------------------------------------------------------------- sharding

    def leaf_axes(self, kernel_axes: Sequence[Any], ndim: int | None = None) -> dict[str, tuple]:
        """Axis annotations (mesh axes, logical names or None) of A and B from the kernel's.

        A keeps the kernel's batch and input entries, B its batch and output entries; the
        rank axis is None (replicated), so ``x @ A`` lands sharded like the kernel's input
        side, ``(x @ A) @ B`` like its output side, and ``A @ B`` exactly like the kernel.

        Args:
          kernel_axes: one entry per axis of the stored kernel (missing trailing entries are
            None, as in a `PartitionSpec`).
          ndim: axes of the stored kernel (default: those the layer sees).
        """
        ndim = len(self.shape) if ndim is None else ndim
        axes = tuple(kernel_axes) + (None,) * (ndim - len(tuple(kernel_axes)))
        lead = ndim - len(self.shape) + self.n_batch  # stacked + batch
        cut = lead + self.n_in
        return {"a": (*axes[:cut], None), "b": (*axes[:lead], None, *axes[cut:])}

    # ---------------------------------------------------------------- values

    def delta(self, a: jax.Array, b: jax.Array, scale: float | jax.Array = 1.0) -> jax.Array:
        """The dense ``scale * A @ B`` in the parameter's layout, in float32.

        A and B may carry leading stacked axes (as stored); the result then does too.
        """
        lead = a.ndim - len(self.a_shape)
        letters = iter(string.ascii_letters)
        take = lambda n: "".join(next(letters) for _ in range(n))
        batch, ins, outs, r = take(lead + self.n_batch), take(self.n_in), take(self.n_out), take(1)
        f32 = jnp.float32
        delta = jnp.einsum(
            f"{batch}{ins}{r},{batch}{r}{outs}->{batch}{ins}{outs}", a.astype(f32), b.astype(f32)
        )
        return delta * jnp.asarray(scale, f32)

    def problems(
        self, path: str, stored: Sequence[int], leaves: dict[str, Sequence[int]]
    ) -> list[str]:
        """What keeps stored leaves from fitting this geometry (empty when they fit).

        Args:
          path: the adapted parameter's path, for the messages.
          stored: the stored parameter's shape.
          leaves: the stored shapes of the adapter's leaves by leaf name ("a", "b", "m").
        """
        try:
            expected = self.leaf_shapes(stored)
            # A per-output-feature leaf (DoRA's magnitude m): (stacked..., batch..., out...).
            expected["m"] = expected["b"][: len(expected["b"]) - self.n_out - 1] + self.out_shape
        except ValueError as e:
            return [
                f"Parameter '{path}' has shape {tuple(stored)} but its adapter was made for "
                f"shape {self.shape} ({e})."
            ]
        out = []
        for leaf, shape in leaves.items():
            want = expected.get(leaf)
            if want is not None and tuple(shape) != want:
                rank = _rank_of(leaf, tuple(shape), self)
                found_rank = f" (rank {rank})" if rank is not None and rank != self.rank else ""
                out.append(
                    f"Adapter leaf '{leaf}' of '{path}' has shape {tuple(shape)}{found_rank} but "
                    f"its record says {want} (rank {self.rank})."
                )
        return out

    def rank_warning(self) -> str | None:
        """A note when the rank exceeds min(fan_in, fan_out): such a ΔW has no more rank than
        min(fan_in, fan_out), so the extra rank only costs memory and time."""
        limit = min(self.fan_in, self.fan_out)
        if self.rank <= limit:
            return None
        return (
            f"rank {self.rank} exceeds min(fan_in, fan_out) = min({self.fan_in}, "
            f"{self.fan_out}) = {limit}: the adapter cannot use the extra rank"
        )


def _rank_of(leaf: str, shape: tuple, geometry: Geometry) -> int | None:
    """The rank that a mismatched leaf appears to have (for the message only)."""
    if leaf == "a" and shape:
        return shape[-1]
    if leaf == "b" and len(shape) > len(geometry.out_shape):
        return shape[len(shape) - len(geometry.out_shape) - 1]
    return None
