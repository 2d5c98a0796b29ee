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
from flax import struct, traverse_util
from flax.core import meta

from lora_jax import quant
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


def merge(params: Tree, *, requantize: bool = False):
    """Folds every adapter into its parameter: ``W + scale * A @ B``, in float32.

    The result is the tree of the original model: adapter leaves and the "lora" collection
    are removed, every merged parameter keeps its dtype (and its sharding metadata box).
    A tree without adapters or quantized kernels is returned unchanged. Pure; works under
    `jax.jit`.

    4-bit kernels (QLoRA): by default every `QuantizedTensor` becomes a dense kernel in its
    compute dtype, ``dequantize(W) + scale * A @ B`` for adapted ones, so the result runs on
    the unmodified model exactly as the adapted model computed. With `requantize=True` the
    adapted kernels are quantized again (same format and blocks) and the others stay
    quantized. Requantizing rounds the sum to the 4-bit grid, and an adapter's delta is
    usually smaller than a grid step, so much of it can be lost: the returned report
    measures, per kernel, ``|Q(W + ΔW) - (W + ΔW)| / |ΔW|`` (Frobenius norms), the error
    relative to the adapter's own contribution (1.0 means as wrong as dropping the adapter).

    Args:
      params: the variables dict that `lora_jax.init` returns (or a trained one).
      requantize: keep adapted 4-bit kernels in 4 bits (the report is a pytree too, so this
        works under `jax.jit`).

    Returns:
      The merged tree; with `requantize=True`, a tuple (merged tree, `RequantizeReport`).

    Raises:
      ValueError: an adapter's shapes do not fit its parameter, or its scale is missing.
    """
    flat = _flat(params)
    quantized = {k for k, v in flat.items() if quant.is_quantized(quant.unboxed(v))}
    if not (quantized or any(is_adapter(k) or k.startswith(LORA + "/") for k in flat)):
        return (params, RequantizeReport({})) if requantize else params
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
    errors = {}
    for a_path in (k for k in flat if k.startswith("params/") and k.endswith(A_SUFFIX)):
        w_path = a_path[: -len(A_SUFFIX)]
        out[w_path], error = _merged(flat, w_path, requantize)
        if error is not None:
            errors[w_path] = error
    if not requantize:
        for k in quantized:
            if quant.is_quantized(quant.unboxed(out[k])):
                out[k] = _reboxed(out[k], quant.dequantize(quant.unboxed(out[k])))
        return _unflat(out)
    return _unflat(out), RequantizeReport(errors)


def _reboxed(boxed, value):
    return meta.replace_boxed(boxed, value) if isinstance(boxed, meta.AxisMetadata) else value


def _merged(flat: Mapping[str, Any], w_path: str, requantize: bool):
    scale_path = LORA + w_path[len("params") :] + SCALE_SUFFIX
    for path in (w_path, w_path + B_SUFFIX, scale_path):
        if path not in flat:
            raise ValueError(f"Adapter '{w_path + A_SUFFIX}' has no '{path}' to merge with.")
    boxed = flat[w_path]
    w, a, b = (quant.unboxed(flat[p]) for p in (w_path, w_path + A_SUFFIX, w_path + B_SUFFIX))
    _check_adapter(w_path, w.shape, a.shape, b.shape)
    f32 = jnp.float32
    scale = meta.unbox(flat[scale_path])
    if not quant.is_quantized(w):
        return _reboxed(boxed, _fold(w, a, b, scale)), None
    delta = scale.astype(f32) * delta_weight(a.astype(f32), b.astype(f32), w.ndim)
    merged = quant.dequantize(w, f32) + delta
    if not requantize:
        return _reboxed(boxed, merged.astype(w.dtype)), None
    again = quant.requantize_like(merged, w, path=w_path)
    error = jnp.linalg.norm(quant.dequantize(again, f32) - merged) / jnp.linalg.norm(delta)
    return _reboxed(boxed, again), error


@jax.jit
def _fold(w: Array, a: Array, b: Array, scale: Array) -> Array:
    """``W + scale * A @ B`` in float32, cast back to W's dtype: one compiled call per kernel
    shape (eagerly, the four ops would each dispatch on their own)."""
    f32 = jnp.float32
    delta = delta_weight(a.astype(f32), b.astype(f32), w.ndim)
    return (w.astype(f32) + scale.astype(f32) * delta).astype(w.dtype)


@struct.dataclass
class RequantizeReport:
    """What `merge(params, requantize=True)` lost, per adapted 4-bit kernel.

    Attributes:
      errors: parameter path -> ``|Q(W + ΔW) - (W + ΔW)| / |ΔW|`` (Frobenius norms): the
        requantization error relative to the adapter's contribution. 0 keeps the adapter
        exactly; 1.0 is as wrong as dropping it. (NaN for an adapter whose ΔW is zero.)
    """

    errors: Mapping[str, Array]

    @property
    def worst(self) -> float:
        """The largest relative error (0.0 when nothing was requantized)."""
        return max((float(e) for e in self.errors.values()), default=0.0)

    def __str__(self) -> str:
        lines = [f"  {k}: {float(v):.3f}" for k, v in sorted(self.errors.items())]
        return "requantization error relative to each adapter's delta:\n" + "\n".join(lines)


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
        v = quant.unboxed(v)
        size = int(np.prod(jnp.shape(v)))
        counts[k in trainable][0] += size
        nbytes = v.nbytes if quant.is_quantized(v) else size * jnp.dtype(v.dtype).itemsize
        counts[k in trainable][1] += nbytes
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
