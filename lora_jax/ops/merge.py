"""Merge: fold every adapter into the parameter it adapts, giving the original model's tree."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lora_jax import _paths, _trees
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Adapter
from lora_jax.adapters.variant import variant_for
from lora_jax.ops.named import keep_adapters
from lora_jax.quant.formats import QuantizedTensor, dequantize, requantize_like

Array = jax.Array
Tree = Mapping[str, Any]


def merge(params: Tree, *, requantize: bool = False, adapters: Any = None) -> Any:
    """Folds every adapter into its parameter: ``W + scale * A @ B``, in float32 (DoRA:
    ``m / ‖W + scale * A @ B‖ ⊙ (W + scale * A @ B)``, column by column).

    The result is the tree of the original model: adapter leaves and the "lora" collection
    are removed, every merged parameter keeps its dtype (and its sharding metadata box).
    A tree without adapters or quantized kernels is returned unchanged. Pure; works under
    `jax.jit`. Each adapter is checked against its record (shapes, rank) first.

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
      adapters: with several named adapters, the names to fold in (None: all); the others
        are dropped, as PEFT's ``merge_and_unload(adapter_names=...)`` does. Several adapters
        fold in one after another, their ΔW adding up.

    Returns:
      The merged tree; with `requantize=True`, a tuple (merged tree, `RequantizeReport`).

    Raises:
      ValueError: an adapter leaf has no record or a record lacks a leaf; an adapter's leaves
        do not fit its record (e.g. trainable leaves of another rank joined with this frozen
        half); an adapted parameter is not floating point. Every bad adapter is listed.

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.adapters import Adapter, Geometry
      >>> tree = {"params": {"q": {"kernel": jnp.zeros((2, 3)), "kernel_lora_a": jnp.ones((2, 1)),
      ...                          "kernel_lora_b": jnp.ones((1, 3))}},
      ...         "lora": {"q": {"kernel_lora": Adapter(Geometry((2, 3), 0, 1, 1), scale=0.5)}}}
      >>> lj.merge(tree)["params"]["q"]["kernel"].tolist()
      [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    if adapters is not None:
        params = keep_adapters(params, adapters)
    flat = _trees.flat(params)
    plan = Plan.of(params)
    quantized = {k for k, v in flat.items() if isinstance(_trees.unbox(v), QuantizedTensor)}
    present = {k for k in flat if _paths.is_adapter_leaf(k)}
    if not (quantized or present or plan.adapters or _paths.LORA in params):
        return (params, RequantizeReport({})) if requantize else params
    by_param = _check(flat, plan, present)
    out = {
        k: v for k, v in flat.items() if k not in present and not k.startswith(_paths.LORA + "/")
    }
    errors = {}
    for param, adapters in by_param.items():
        leaves = [
            {leaf: _trees.unbox(flat[_paths.leaf_path(param, leaf, name)]) for leaf in _leaves(r)}
            for name, r in adapters
        ]
        records = tuple(r for _, r in adapters)
        out[param], error = _merged(flat[param], leaves, records, param, requantize)
        if error is not None:
            errors[param] = error
    if not requantize:
        for k in quantized:
            if isinstance(_trees.unbox(out[k]), QuantizedTensor):
                out[k] = _trees.rebox(out[k], dequantize(_trees.unbox(out[k])))
        return _trees.unflat(out)
    return _trees.unflat(out), RequantizeReport(errors)


def _leaves(record: Adapter) -> tuple[str, ...]:
    return tuple(variant_for(record.variant).leaves(record.geometry))


def _check(
    flat: Mapping[str, Any],
    plan: Plan,
    present: set[str],
    what: str = "Cannot merge",
    earlier: Sequence[str] = (),
) -> dict:
    """The adapters by parameter, after checking that leaves and records fit; raises listing
    every problem (after the caller's `earlier` ones) under `what`."""
    expected = plan.adapter_leaves()
    problems = [*earlier]
    problems += [
        f"Adapter leaf '{k}' has no record in the 'lora' collection (its "
        f"'{_paths.record_path(_paths.adapted_param(k)[0], _paths.adapted_param(k)[2])}' is "
        "missing): pass the whole tree, with the 'lora' collection of the same run."
        for k in sorted(present - set(expected))
    ]
    problems += [
        f"Adapter of '{param}' lacks its leaf '{k}'."
        for k, (param, _, _) in sorted(expected.items())
        if k not in present
    ]
    by_param: dict[str, list] = {}
    for (param, name), record in sorted(plan.adapters.items()):
        if param not in flat:
            problems.append(f"Adapter of '{param}' has no parameter in the tree.")
            continue
        w = _trees.unbox(flat[param])
        dtype = jnp.result_type(w)
        if not (isinstance(w, QuantizedTensor) or jnp.issubdtype(dtype, jnp.floating)):
            problems.append(
                f"Parameter '{param}' is {dtype}: merging would truncate "
                "W + ΔW; only floating-point parameters take adapters."
            )
        shapes = {
            leaf: jnp.shape(_trees.unbox(flat[p]))
            for leaf in _leaves(record)
            if (p := _paths.leaf_path(param, leaf, name)) in flat
        }
        problems += record.geometry.problems(param, w.shape, shapes)
        by_param.setdefault(param, []).append((name, record))
    _trees.raise_problems(what, problems)
    return by_param


def _merged(
    boxed: Any, leaves: list[dict], records: tuple[Adapter, ...], path: str, requantize: bool
) -> tuple[Any, Array | None]:
    w = _trees.unbox(boxed)
    if not isinstance(w, QuantizedTensor):
        return _trees.rebox(boxed, _fold(w, leaves, records)), None
    f32 = jnp.float32
    dense = dequantize(w, f32)
    merged = _chain(dense, leaves, records)  # QDoRA rescales; plain LoRA adds
    delta = merged - dense
    if not requantize:
        return _trees.rebox(boxed, merged.astype(w.dtype)), None
    again = requantize_like(merged, w, path=_paths.to_param(path))
    size = jnp.linalg.norm(delta)
    # A zero ΔW keeps the 4-bit kernel as it was: quantizing its own dequantized values need
    # not give back the same codes bit for bit.
    again = jax.tree.map(lambda new, old: jnp.where(size > 0, new, old), again, w)
    lost = jnp.linalg.norm(dequantize(again, f32) - merged)
    safe = jnp.where(size > 0, size, 1.0)
    error = jnp.where(size > 0, lost / safe, jnp.where(lost > 0, jnp.inf, 0.0))
    return _trees.rebox(boxed, again), error


def _delta(leaves: list[dict], records: tuple[Adapter, ...]) -> Array:
    return sum(
        variant_for(r.variant).delta_weight(r.geometry, leaf, r.scale)
        for r, leaf in zip(records, leaves, strict=True)
    )


@functools.partial(jax.jit, static_argnums=(2,))
def _fold(w: Array, leaves: list[dict], records: tuple[Adapter, ...]) -> Array:
    """The merged parameter (``W + ΔW`` for plain LoRA; each variant's `merged_weight`, one
    adapter after another) in float32, cast back to W's dtype: one compiled call per kernel
    shape and record (eagerly, the ops would each dispatch on their own)."""
    return _chain(w.astype(jnp.float32), leaves, records).astype(w.dtype)


@functools.partial(jax.jit, static_argnums=(2,))
def _chain(merged: Array, leaves: list[dict], records: tuple[Adapter, ...]) -> Array:
    """Each adapter's `merged_weight`, one after another, on the float32 `merged`."""
    for r, leaf in zip(records, leaves, strict=True):
        merged = variant_for(r.variant).merged_weight(r.geometry, merged, leaf, r.scale)
    return merged


@struct.dataclass
class RequantizeReport:
    """What `merge(params, requantize=True)` lost, per adapted 4-bit kernel.

    Attributes:
      errors: variables path of the kernel -> ``|Q(W + ΔW) - (W + ΔW)| / |ΔW|`` (Frobenius norms): the
        requantization error relative to the adapter's contribution. 0 keeps the adapter
        exactly; 1.0 is as wrong as dropping it; above 1.0, requantizing moved the kernel by
        more than the adapter did. An adapter whose ΔW is zero reads 0.0 when requantizing
        gives the kernel back exactly (it does: W is on the grid already), inf otherwise.
    """

    errors: Mapping[str, Array]

    @property
    def worst(self) -> float:
        """The largest relative error (0.0 when nothing was requantized)."""
        return max((float(e) for e in self.errors.values()), default=0.0)

    def __str__(self) -> str:
        lines = [f"  {k}: {float(v):.3f}" for k, v in sorted(self.errors.items())]
        return "requantization error relative to each adapter's delta:\n" + "\n".join(lines)


def unmerge(merged: Tree, adapters: Tree, *, names: Any = None) -> dict:
    """The base back from a merged tree and the adapters that were folded into it.

    The inverse of `merge`: every adapted parameter becomes ``W' - scale * A @ B`` (computed
    in float32, cast to W's dtype), and the adapter leaves and "lora" records of `adapters`
    are joined to it, so ``unmerge(merge(params), params)`` is `params` again. With a float32
    base the result equals the original base to float32 rounding (a few ulps of
    ``|W| + |ΔW|``); with a bfloat16 base each merged weight was rounded once to bfloat16
    (half an ulp of ``W + ΔW``) and unmerging rounds once more (half an ulp of W), so the
    base comes back within one bfloat16 ulp of ``|W| + |ΔW|`` per weight, not bit for bit.

    Args:
      merged: the merged tree (`merge`'s output, or a model's weights that had the adapters
        folded in).
      adapters: a tree with the adapters' leaves and their "lora" records (the tree before
        merging, or `load_adapter`'s); its base leaves are not read.
      names: the adapters that were merged, as given to ``merge(..., adapters=names)``
        (None: every adapter in `adapters`); only they are subtracted and returned.

    Returns:
      The LoRA tree: `merged`'s leaves with the adapted parameters unmerged, plus the adapter
      leaves and records.

    Raises:
      ValueError: a DoRA adapter (its merge rescales columns by norms that the merged
        weight no longer tells apart from W: not invertible); a 4-bit base (`merge` made its
        kernels dense: re-quantize with `lora_jax.init`); an adapted parameter missing from
        `merged` or of another shape.
    """
    if names is not None:
        adapters = keep_adapters(adapters, names)
    plan = Plan.of(adapters)
    flat, src = _trees.flat(merged), _trees.flat(adapters)
    problems = [
        f"Adapter {name!r} of '{_paths.to_param(p)}' is {r.variant!r}: its merge is not "
        "invertible (the column norms it divides by are not recoverable from the merged "
        "weight); keep the unmerged tree instead."
        for (p, name), r in sorted(plan.adapters.items())
        if r.variant != "lora"
    ]
    if plan.quantized:
        problems.append(
            f"The adapters' tree has 4-bit kernels ({_trees.quoted(sorted(plan.quantized))}): "
            "merge made them dense, so the base cannot come back in 4 bits; unmerge with the "
            "dense adapters' records, or run lora_jax.init on the unmerged dense base."
        )
    # The merged tree's parameters with the adapters' leaves and records: checked as merge
    # checks a tree (leaves against records, parameters present, floating, shapes).
    joined = {k: v for k, v in flat.items() if not _paths.is_lora(k)}
    joined.update({k: v for k, v in src.items() if _paths.is_lora(k)})
    present = {k for k in joined if _paths.is_adapter_leaf(k)}
    by_param = _check(joined, plan, present, "Cannot unmerge", problems)
    out = dict(joined)  # the base's adapted parameters are replaced below
    for param, found in by_param.items():
        leaves = [
            {leaf: _trees.unbox(joined[_paths.leaf_path(param, leaf, n)]) for leaf in _leaves(r)}
            for n, r in found
        ]
        records = tuple(r for _, r in found)
        out[param] = _trees.rebox(flat[param], _unfold(_trees.unbox(flat[param]), leaves, records))
    return _trees.unflat(out)


@functools.partial(jax.jit, static_argnums=(2,))
def _unfold(w: Array, leaves: list[dict], records: tuple[Adapter, ...]) -> Array:
    return (w.astype(jnp.float32) - _delta(leaves, records)).astype(w.dtype)
