"""Do two adapters learn the same directions? The subspace similarity φ(i, j) of Hu et al.
2021 (§7.2) between the adapters of two lora_jax trees (different ranks, seeds, tasks, or two
checkpoints of one run), adapter by adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import _trees
from lora_jax.adapters.records import Adapter
from lora_jax.analysis.spectrum import (
    _t,
    a_subspace,
    adapters,
    as_matrices,
    delta_svd,
    subspace_similarity,
)

Array = jax.Array

SIDES = {
    "a": "A's input-space directions (the paper's right-singular matrix of A)",
    "b": "B's output-space directions",
    "delta_in": "ΔW's input-space singular vectors, by ΔW's singular value",
    "delta_out": "ΔW's output-space singular vectors (the paper's left side of ΔW)",
}


def directions(record: Adapter, a: Array, b: Array, side: str = "a") -> Array:
    """Orthonormal directions of one adapter, most important first: (lead..., d, k).

    Args:
      record: the adapter's record (its geometry flattens multi-axis factors).
      a: A as stored (lead..., in..., rank); b: B as stored (lead..., rank, out...).
      side: one of `SIDES`.
    """
    a_m, b_m = as_matrices(record.geometry, jnp.asarray(a), jnp.asarray(b))
    if side == "a":
        return a_subspace(a_m)
    if side == "b":
        return a_subspace(_t(b_m))
    if side in ("delta_in", "delta_out"):
        svd = delta_svd(a_m, b_m, record.scale)
        return svd.u if side == "delta_in" else svd.v
    raise ValueError(f"side must be one of {', '.join(SIDES)}; got {side!r}.")


def compare_adapters(
    params1: Mapping[str, Any], params2: Mapping[str, Any], *, side: str = "a"
) -> dict[str, Array]:
    """φ(i, j) for every i ≤ r1, j ≤ r2, for each adapter that both trees have.

    The two trees must adapt the same parameters with the same shapes (ranks may differ);
    adapters that only one tree has are left out of the result (compare the keys).

    Args:
      params1, params2: variables dicts as `lora_jax.init` or `load_adapter` give them.
      side: which directions to compare, one of `SIDES` ("a" as in the paper's Figure 3).

    Returns:
      Label (variables path of the adapted parameter, ``...@<name>`` for a named adapter)
      -> (lead..., k1, k2) array; entry [..., i - 1, j - 1] is φ(i, j) (`subspace_similarity`).

    Raises:
      ValueError: `side` unknown, no adapter in common, or a shared adapter whose kernels
        differ in shape (each listed), or a bad leaf in either tree.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.adapters import Adapter, Geometry
      >>> from lora_jax.analysis import compare_adapters
      >>> def tree(a):
      ...     b = jnp.ones((a.shape[1], 2))
      ...     return {"params": {"q": {"kernel_lora_a": a, "kernel_lora_b": b}},
      ...             "lora": {"q": {"kernel_lora": Adapter(Geometry((3, 2), 0, 1, a.shape[1]), 1.0)}}}
      >>> phi = compare_adapters(tree(jnp.eye(3, 1)), tree(jnp.eye(3, 2)))["params/q/kernel"]
      >>> phi.tolist()  # e1 lies in span{e1, e2}
      [[1.0, 1.0]]
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}; got {side!r}.")
    one, two = adapters(params1, what="compare"), adapters(params2, what="compare")
    shared = sorted(one.keys() & two.keys())
    if not shared:
        raise ValueError(
            "The two trees have no adapter in common: the first adapts "
            f"{sorted(one) or 'nothing'}, the second {sorted(two) or 'nothing'}."
        )
    problems, out = [], {}
    for label in shared:
        (r1, a1, b1, _), (r2, a2, b2, _) = one[label], two[label]
        g1, g2 = r1.geometry, r2.geometry
        lead1, lead2 = a1.shape[: a1.ndim - len(g1.a_shape)], a2.shape[: a2.ndim - len(g2.a_shape)]
        if (g1.shape, g1.n_batch, g1.n_in, lead1) != (g2.shape, g2.n_batch, g2.n_in, lead2):
            problems.append(
                f"'{label}' adapts a parameter of shape {(*lead1, *g1.shape)} in the first "
                f"tree and {(*lead2, *g2.shape)} in the second: not the same weight."
            )
            continue
        out[label] = subspace_similarity(directions(r1, a1, b1, side), directions(r2, a2, b2, side))
    _trees.raise_problems("Cannot compare", problems)
    return out
