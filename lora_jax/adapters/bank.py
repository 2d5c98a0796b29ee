"""A bank of adapters: several adapters of one parameter stacked on a leading axis, so that
each example of a batch can go through its own (`LoRA(...).apply(..., adapter_ids=ids)`).

Stacking is exact: B is pre-multiplied by its adapter's scale, ranks are zero-padded to the
largest, and an adapter that leaves the parameter alone is zeros. A call gathers one A and one
B per example (`select`) and the layer's rule contracts them under `jax.vmap` — batched
matmuls that read each example's own factors, never a contraction over every adapter.

`LoRA` stacks the active adapters in every call; `lora_jax.adapter_bank` stacks them once,
into a "lora_bank" collection passed with the params, which saves one copy of every adapter
per call (serving: measured in benchmarks/multi_adapter.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from lora_jax.adapters.geometry import Geometry

Array = jax.Array
BANK = "lora_bank"  # the collection of a precomputed bank
NO_ADAPTER = -1


@struct.dataclass
class Bank:
    """The record of one parameter's bank (``lora_bank/<module>/<param>_bank``), beside its
    ``<param>_bank_a`` (n, ..., in..., rank) and ``<param>_bank_b`` (n, ..., rank, out...).

    Attributes:
      names: the adapters, in the order that `adapter_ids` index.
      rank: the common (padded) rank.
    """

    names: tuple[str, ...] = struct.field(pytree_node=False)
    rank: int = struct.field(pytree_node=False)


def stack(
    geometry: Geometry,
    entries: Sequence[tuple[Array, Array, float] | None],
    dtype: jnp.dtype,
    lead: tuple[int, ...] = (),
) -> tuple[Array, Array]:
    """Stacks adapters of one parameter: ``entries[i]`` is (A, B, scale) of adapter i or
    None (zeros); `lead` are stored leading axes (none inside a layer).

    Returns:
      (A, B) of shapes (n, *lead, *a_shape) and (n, *lead, *b_shape) at the largest rank, in
      `dtype`, B scaled.
    """
    rank = max(e[0].shape[-1] for e in entries if e is not None)
    padded = Geometry(geometry.shape, geometry.n_batch, geometry.n_in, rank)
    out_a, out_b = [], []
    for entry in entries:
        if entry is None:
            out_a.append(jnp.zeros((*lead, *padded.a_shape), dtype))
            out_b.append(jnp.zeros((*lead, *padded.b_shape), dtype))
            continue
        a, b, scale = entry
        pad = rank - a.shape[-1]
        out_a.append(jnp.pad(a.astype(dtype), [(0, 0)] * (a.ndim - 1) + [(0, pad)]))
        widths = [(0, 0)] * b.ndim
        widths[geometry.b_rank_axis(b.ndim)] = (0, pad)
        scaled = (b.astype(jnp.float32) * scale).astype(dtype)
        out_b.append(jnp.pad(scaled, widths))
    return jnp.stack(out_a), jnp.stack(out_b)


def select(a: Array, b: Array, ids: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """Each example's factors from a bank, in `dtype`: (batch, ...) gathers of A and B.

    An id of -1 gets zeros (no adapter); an id outside [-1, n) gets NaN in B, so a bad id
    under `jax.jit` (where it cannot raise) poisons its example rather than silently running
    another adapter.
    """
    n = a.shape[0]
    index = jnp.clip(ids, 0, n - 1)
    valid = (ids >= 0) & (ids < n)
    gate = jnp.where(ids == NO_ADAPTER, 0.0, jnp.where(valid, 1.0, jnp.nan)).astype(dtype)
    a_i = a[index].astype(dtype)
    b_i = b[index].astype(dtype) * gate.reshape((-1,) + (1,) * (b.ndim - 1))
    return a_i, b_i
