"""Pure functions over the variables tree that `lora_jax.init` returns.

The tree is a Flax variables dict: "params" holds the base parameters with the adapter
leaves (`<param>_lora_a`, `<param>_lora_b`) beside the parameter they adapt, and "lora" holds
each adapter's scale (`<param>_lora_scale`) and a `<param>_trainable` marker for each base
parameter selected by `LoraConfig.trainable`. Everything here reads only the tree.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from lora_jax.config import A_SUFFIX, B_SUFFIX, LORA, SCALE_SUFFIX, TRAINABLE_SUFFIX

TRAINABLE, FROZEN = "trainable", "frozen"
Tree = Mapping[str, Any]
Array = jax.Array


def _flat(tree: Tree) -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        raise TypeError(f"Expected a dict of variables, got {type(tree).__name__}.")
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_adapter(path: str) -> bool:
    """Whether a '/'-joined leaf path names an adapter leaf (A or B)."""
    return path.startswith("params/") and path.endswith((A_SUFFIX, B_SUFFIX))


def trainable_paths(params: Tree) -> frozenset[str]:
    """Paths of the trainable leaves: adapters and the `LoraConfig.trainable` extras."""
    flat = _flat(params)
    extras = {
        "params/" + k[len(LORA) + 1 : -len(TRAINABLE_SUFFIX)]
        for k in flat
        if k.startswith(LORA + "/") and k.endswith(TRAINABLE_SUFFIX)
    }
    return frozenset(k for k in flat if is_adapter(k) or k in extras)


def labels(params: Tree) -> dict:
    """Labels each leaf "trainable" or "frozen", for `optax.multi_transform`.

    Args:
      params: the variables dict that `lora_jax.init` returns.

    Returns:
      A tree of the same structure with a string per leaf.
    """
    trainable = trainable_paths(params)
    return _unflat({k: TRAINABLE if k in trainable else FROZEN for k in _flat(params)})


def partition(params: Tree) -> tuple[dict, dict]:
    """Splits the tree into (trainable, frozen): two dicts with disjoint leaves.

    `trainable` holds the adapter leaves (and `LoraConfig.trainable` extras) and is a
    standalone tree to differentiate and optimize; `frozen` holds everything else.
    `combine(trainable, frozen)` gives the tree back.
    """
    trainable = trainable_paths(params)
    flat = _flat(params)
    return (
        _unflat({k: v for k, v in flat.items() if k in trainable}),
        _unflat({k: v for k, v in flat.items() if k not in trainable}),
    )


def combine(*trees: Tree) -> dict:
    """Joins trees with disjoint leaves (the halves of `partition`) into one."""
    flat: dict[str, Any] = {}
    for tree in trees:
        part = _flat(tree)
        clash = sorted(set(flat) & set(part))
        if clash:
            raise ValueError(f"combine got leaf '{clash[0]}' twice ({len(clash)} shared leaves).")
        flat.update(part)
    return _unflat(flat)


def delta_weight(a: Array, b: Array, param_ndim: int) -> Array:
    """The full-rank delta A·B in the adapted parameter's layout (batch..., in..., out...).

    A is (batch..., in..., rank) and B is (batch..., rank, out...); the number of shared
    batch axes follows from the ranks of A, B and the parameter, so this needs no knowledge
    of the layer kind: it is what `merge` uses.
    """
    n_batch = a.ndim + b.ndim - 2 - param_ndim
    letters = iter(string.ascii_letters)
    take = lambda n: "".join(next(letters) for _ in range(n))
    batch, ins, outs, r = (
        take(n_batch),
        take(a.ndim - 1 - n_batch),
        take(b.ndim - 1 - n_batch),
        take(1),
    )
    return jnp.einsum(f"{batch}{ins}{r},{batch}{r}{outs}->{batch}{ins}{outs}", a, b)


def merge(params: Tree) -> dict:
    """Folds every adapter into its parameter: ``W + scale * A @ B``, in float32.

    The result is the tree of the original model: adapter leaves and the "lora" collection
    are removed, every merged parameter keeps its dtype (and its sharding metadata box).
    A tree without adapters is returned unchanged. Pure; works under `jax.jit`.

    Raises:
      ValueError: an adapter's shapes do not fit its parameter, or its scale is missing.
    """
    flat = _flat(params)
    if not any(is_adapter(k) for k in flat) and not any(k.startswith(LORA + "/") for k in flat):
        return params
    orphans = sorted(
        k
        for k in flat
        if k.startswith("params/")
        and k.endswith(B_SUFFIX)
        and k[: -len(B_SUFFIX)] + A_SUFFIX not in flat
    )
    if orphans:
        raise ValueError(
            f"Adapter '{orphans[0]}' has no '{orphans[0][: -len(B_SUFFIX)] + A_SUFFIX}' to merge with."
        )
    out = {k: v for k, v in flat.items() if not is_adapter(k) and not k.startswith(LORA + "/")}
    for a_path in (k for k in flat if k.startswith("params/") and k.endswith(A_SUFFIX)):
        w_path = a_path[: -len(A_SUFFIX)]
        out[w_path] = _merged(flat, w_path)
    return _unflat(out)


def _merged(flat: Mapping[str, Any], w_path: str):
    scale_path = LORA + w_path[len("params") :] + SCALE_SUFFIX
    for path in (w_path, w_path + B_SUFFIX, scale_path):
        if path not in flat:
            raise ValueError(f"Adapter '{w_path + A_SUFFIX}' has no '{path}' to merge with.")
    boxed = flat[w_path]
    w, a, b = (meta.unbox(flat[p]) for p in (w_path, w_path + A_SUFFIX, w_path + B_SUFFIX))
    _check_adapter(w_path, w.shape, a.shape, b.shape)
    f32 = jnp.float32
    delta = delta_weight(a.astype(f32), b.astype(f32), w.ndim)
    merged = (w.astype(f32) + meta.unbox(flat[scale_path]).astype(f32) * delta).astype(w.dtype)
    return meta.replace_boxed(boxed, merged) if isinstance(boxed, meta.AxisMetadata) else merged


def _check_adapter(path: str, w: tuple, a: tuple, b: tuple) -> None:
    n_batch = len(a) + len(b) - 2 - len(w)
    rank = a[-1] if a else None
    ok = (
        0 <= n_batch < min(len(a), len(b))
        and b[n_batch] == rank
        and tuple(a[:-1]) + tuple(b[n_batch + 1 :]) == tuple(w)
        and tuple(a[:n_batch]) == tuple(b[:n_batch])
    )
    if not ok:
        raise ValueError(
            f"Adapter of '{path}' does not fit it: parameter shape {tuple(w)}, A shape {tuple(a)}, "
            f"B shape {tuple(b)}; expected A (batch..., in..., rank) and B (batch..., rank, out...)."
        )


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


def summary(params: Tree) -> Summary:
    """Counts trainable vs all parameters and their bytes (PEFT's print_trainable_parameters).

    Works on concrete arrays and on `jax.eval_shape` results alike.
    """
    trainable = trainable_paths(params)
    counts = {True: [0, 0], False: [0, 0]}
    for k, v in _flat(params).items():
        if not k.startswith("params/"):
            continue
        v = meta.unbox(v)
        size = int(np.prod(jnp.shape(v)))
        counts[k in trainable][0] += size
        counts[k in trainable][1] += size * jnp.dtype(v.dtype).itemsize
    (tp, tb), (fp, fb) = counts[True], counts[False]
    return Summary(
        trainable_params=tp, total_params=tp + fp, trainable_bytes=tb, total_bytes=tb + fb
    )


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    for i, unit in enumerate(units):
        n /= 1024
        if n < 1024 or i == len(units) - 1:
            return f"{n:.2f} {unit}"
