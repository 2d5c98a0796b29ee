"""Shardings for LoRA trees: adapter specs derived from their kernel's, and mesh helpers.

An adapter must be sharded consistently with the kernel it adapts: for a kernel of shape
(batch..., in..., out...) with spec (b..., i..., o...), A (batch..., in..., rank) gets
(b..., i..., None) and B (batch..., rank, out...) gets (b..., None, o...): the rank axis is
replicated, so ``x @ A`` lands sharded like the kernel's input side and ``(x @ A) @ B`` like
its output side, and the merged ``A @ B`` is sharded exactly like the kernel. The "lora"
collection (scales, markers) is replicated.

Specs are given for the base only, in one of two spellings:
- mesh-axis `PartitionSpec`s (or `NamedSharding`s), a tree like the pretrained params;
- Flax logical axis names, from `nn.with_logical_partitioning` boxes on the params (the LoRA
  wrapper boxes adapters alike) or a tree of logical `PartitionSpec`s, plus logical axis
  `rules` mapping them to mesh axes, e.g. ``(("batch", "data"), ("embed", "fsdp"),
  ("heads", "model"), ("mlp", "model"))``.

`param_shardings` turns either into a `NamedSharding` per leaf, checking the mesh axes and
that every sharded dimension divides evenly; `shard` places a tree on the mesh, on one host
or many.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lora_jax import _paths, _trees
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Record
from lora_jax.adapters.variant import variant_for
from lora_jax.quant.formats import QuantizedTensor

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
Tree = Mapping[str, Any]


def auto_mesh(mesh: Mesh) -> Mesh:
    """The mesh with every axis in `AxisType.Auto` mode (GSPMD sharding propagation).

    `jax.make_mesh` makes Explicit axes by default, under which unmodified model code (an
    embedding lookup, a contraction over a sharded axis) needs explicit output shardings;
    lora_jax shards the inputs and outputs of a step and lets XLA propagate the rest.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((2, 4), "
            f"('data', 'model'))), got {type(mesh).__name__}."
        )
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def partition_specs(params: Tree, specs: Tree | None = None) -> dict:
    """A `PartitionSpec` for every leaf of a LoRA variables tree.

    Args:
      params: the variables dict that `lora_jax.init` returns (arrays, boxes or
        `jax.ShapeDtypeStruct`s).
      specs: the base's specs: a tree of `PartitionSpec` / `NamedSharding` / None (replicated)
        shaped like the pretrained variables (`{"params": ...}`) or the bare params dict.
        Entries for adapters and the "lora" collection may be left out. None reads the
        specs from the sharding boxes in `params` (unboxed leaves are replicated).

    Returns:
      A tree shaped like `unbox(params)` with a `PartitionSpec` per leaf, in the spelling of
      the input (mesh axes, or logical axis names). Adapter leaves get their kernel's spec
      as their record's geometry maps it (the rank axis None); the "lora" collection's
      records hold no arrays and are kept as they are.

    Raises:
      ValueError: a base leaf has no spec, a spec names a leaf that `params` lacks or has more
        axes than its leaf, an adapter leaf has no record, or an adapter's own spec or box
        disagrees with its kernel's.
    """
    flat = _trees.flat(params)
    plan = Plan.of(params)
    given = (
        _given(specs, flat)
        if specs is not None
        else {
            k: _box_spec(v)
            for k, v in flat.items()
            if not _paths.is_adapter_leaf(k) or isinstance(v, meta.Partitioned)
        }
    )
    missing = [k for k in flat if k not in given and not _paths.is_lora(k)]
    _raise_listed("has no sharding spec (give one for every base leaf)", missing)
    out = {
        k: (v if _is_record(v) else _padded(k, v, given[k]))
        for k, v in flat.items()
        if not _paths.is_adapter_leaf(k)
    }
    problems = []
    for path in (k for k in flat if _paths.is_adapter_leaf(k)):
        out[path] = _adapter_spec(path, flat, out, plan)
        own = given.get(path)
        if own is not None and _padded(path, flat[path], own) != out[path]:
            kernel = _paths.adapted_param(path)[0]
            problems.append(
                f"Adapter '{path}' has spec {own} but its kernel's spec "
                f"{out[kernel]} gives {out[path]}."
            )
    _raise(problems)
    return _trees.unflat(out)


def param_shardings(
    params: Tree, mesh: Mesh, specs: Tree | None = None, *, rules: Rules | None = None
) -> dict:
    """A `NamedSharding` on `mesh` for every leaf of a LoRA variables tree.

    Args:
      params: the variables dict that `lora_jax.init` returns.
      mesh: the device mesh.
      specs: the base's specs as for `partition_specs` (None: from the boxes in `params`, or
        all replicated when there are none).
      rules: logical axis rules ``((logical_name, mesh_axes), ...)``; when given, the specs
        hold logical axis names (mapped as `flax.linen.logical_to_mesh_axes` does: unmapped
        names are replicated); otherwise they hold mesh axis names.

    Returns:
      A tree shaped like `unbox(params)` with a `NamedSharding` per leaf.

    Raises:
      ValueError: as `partition_specs`; a rule or spec names an axis the mesh lacks; a sharded
        dimension does not divide evenly over its mesh axes.
    """
    mesh = auto_mesh(mesh)
    all_specs = _trees.flat(partition_specs(params, specs))
    records = {k: s for k, s in all_specs.items() if _is_record(s)}
    flat_specs = {k: s for k, s in all_specs.items() if k not in records}
    if rules is not None:
        check_rules(rules, mesh)
        flat_specs = {k: to_mesh_spec(s, rules) for k, s in flat_specs.items()}
    unknown = sorted(
        {a for s in flat_specs.values() for a in _spec_axes(s) if a not in mesh.axis_names}
    )
    if unknown:
        example = next(
            f"'{k}' {s}" for k, s in flat_specs.items() if set(_spec_axes(s)) & set(unknown)
        )
        raise ValueError(
            f"The specs name mesh axes {unknown} that the mesh lacks (its axes are "
            f"{tuple(mesh.axis_names)}), e.g. leaf {example}. "
            + (
                "Fix the rules."
                if rules is not None
                else "Logical axis names (e.g. from "
                "nn.with_logical_partitioning) need rules= to map them to mesh axes."
            )
        )
    shapes = {k: shape_of(v) for k, v in _trees.flat(params).items() if k not in records}
    _raise(
        [
            p
            for k, s in flat_specs.items()
            for p in _spec_problems(f"Leaf '{k}'", shapes[k], s, mesh)
        ]
    )
    values = {k: _trees.unbox(v) for k, v in _trees.flat(params).items()}
    named = {k: _named(mesh, s, values[k]) for k, s in flat_specs.items()}
    return _trees.unflat({**named, **records})


def check_rules(rules: Rules, mesh: Mesh) -> None:
    """Raises unless every rule is (logical name, mesh axes) naming axes of `mesh`."""
    if isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence):
        raise TypeError(
            f"rules must be a sequence of (logical_name, mesh_axes) pairs, got {rules!r}."
        )
    problems = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(
                f"Each logical axis rule must be (logical_name, mesh_axes), got {rule!r}."
            )
        for axis in _axes(rule[1]):
            if axis not in mesh.axis_names:
                problems.append(
                    f"Logical axis rule {tuple(rule)!r} maps to mesh axis {axis!r}, "
                    f"but the mesh's axes are {tuple(mesh.axis_names)}."
                )
    _raise(problems)


def to_mesh_spec(spec: PartitionSpec, rules: Rules) -> PartitionSpec:
    """Maps a spec of logical axis names to mesh axes with `rules` (unmapped: replicated)."""
    return PartitionSpec(*nn.logical_to_mesh_axes(tuple(spec), rules))


def batch_sharding(
    mesh: Mesh, spec: PartitionSpec | NamedSharding | None = None, *, rules: Rules | None = None
) -> NamedSharding:
    """The sharding of every batch leaf.

    Args:
      mesh: the device mesh.
      spec: a mesh-axis `PartitionSpec` (or `NamedSharding`) applied to every batch leaf, e.g.
        ``PartitionSpec("data")`` to split the leading (example) axis. None: the leading axis
        goes where `rules` map the logical axis "batch", else over the mesh axis "data".

    Raises:
      ValueError: no spec can be derived, or it names an axis the mesh lacks.
    """
    mesh = auto_mesh(mesh)
    if isinstance(spec, NamedSharding):
        spec = spec.spec
    if spec is None:
        mapped = dict(rules or ()).get("batch")
        if mapped is None and "data" not in mesh.axis_names:
            raise ValueError(
                f"No batch sharding: the rules map no logical axis 'batch' and the mesh "
                f"{dict(mesh.shape)} has no axis 'data'. Pass batch_sharding=PartitionSpec(...)."
            )
        spec = PartitionSpec("data" if mapped is None else mapped)
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"batch_sharding must be a PartitionSpec or NamedSharding, got {spec!r}.")
    _raise(
        [
            f"batch_sharding {spec} names mesh axis {a!r}, but the mesh's axes are "
            f"{tuple(mesh.axis_names)}."
            for a in _spec_axes(spec)
            if a not in mesh.axis_names
        ]
    )
    return NamedSharding(mesh, spec)


def shard(tree: Any, shardings: Any) -> Any:
    """Places every array of `tree` with its sharding; boxes are kept.

    Arrays already placed so are returned as they are. A host value (NumPy, or a
    single-device array) must be the same in every process: each process copies out the
    shards its devices hold, so this works on many hosts.

    Args:
      tree: a pytree of arrays (sharding boxes allowed).
      shardings: a tree of `jax.sharding.Sharding`, shaped like `unbox(tree)`.
    """
    return _trees.rebox_tree(tree, jax.tree.map(_put, _trees.unbox_tree(tree), shardings))


def shard_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Places a batch: every leaf with `sharding`, checking that it divides evenly.

    A `jax.Array` that spans every process is taken as the global batch; any other leaf
    (NumPy, or an array on this process's devices) holds this process's rows, which is the
    whole batch in a single process (`jax.make_array_from_process_local_data`).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    many = jax.process_count() > 1
    problems = [
        p
        for key, leaf in leaves
        if not many or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable)
        for p in _spec_problems(
            f"Batch leaf '{_batch_path(key)}'", np.shape(leaf), sharding.spec, sharding.mesh
        )
    ]
    _raise(problems)
    return jax.tree_util.tree_unflatten(
        treedef, [_put_rows(_batch_path(k), v, sharding) for k, v in leaves]
    )


def used_axes(shardings: Any) -> set[str]:
    """The mesh axes that any `NamedSharding` in a tree shards over."""
    return {a for s in jax.tree.leaves(shardings) for a in _spec_axes(s.spec)}


def rule_axes(rules: Rules) -> set[str]:
    """The mesh axes that logical axis rules map to."""
    return {a for _, axes in rules for a in _axes(axes)}


def shape_of(v: Any) -> tuple[int, ...]:
    """The shape of an array, `jax.ShapeDtypeStruct` or sharding box."""
    v = _trees.unbox(v)
    return tuple(v.shape) if hasattr(v, "shape") else np.shape(v)


# --------------------------------------------------------------------------- helpers


def _named(mesh: Mesh, spec: PartitionSpec, leaf: Any) -> NamedSharding | QuantizedTensor:
    """A `NamedSharding` for a leaf; for a 4-bit kernel, one per field of its pytree."""
    if not isinstance(leaf, QuantizedTensor):
        return NamedSharding(mesh, spec)
    return quantized_specs(leaf, spec, lambda s: NamedSharding(mesh, s))


def quantized_specs(
    qt: QuantizedTensor,
    spec: PartitionSpec,
    wrap: Callable[[PartitionSpec], Any] = lambda s: s,
) -> QuantizedTensor:
    """Specs for the fields of a `QuantizedTensor` from its dense kernel's spec.

    Leading (stacked-layer, batch) axes keep their entries; the output axis N of `codes` and
    `scales` takes the entry of the first output axis when the other output axes are
    unsharded (N is their flattening, so contiguous shards of N are shards of that axis);
    the packed contraction axis and the double-quantization constants are replicated along
    their own axes (blocks of 256 scales do not follow the kernel's layout).

    Returns:
      A `QuantizedTensor` whose array fields are `wrap(PartitionSpec)`s.
    """
    entries = tuple(spec) + (None,) * (qt.ndim - len(tuple(spec)))
    n_lead, n_in = len(qt.lead_shape), len(qt.in_shape)
    lead, outs = entries[:n_lead], entries[n_lead + n_in :]
    n_entry = outs[0] if all(e is None for e in outs[1:]) else None
    matrix = wrap(PartitionSpec(*lead, None, n_entry))
    on = lambda field, s: None if getattr(qt, field) is None else wrap(s)
    return qt.replace(
        codes=matrix,
        scales=on("scales", PartitionSpec(*lead, None, n_entry)),
        scale_codes=on("scale_codes", PartitionSpec(*lead, None, None)),
        scale_range=on("scale_range", PartitionSpec(*lead, None, None)),
    )


def _is_record(x: Any) -> bool:
    return isinstance(x, Record)


def _box_spec(v: Any) -> PartitionSpec:
    return PartitionSpec(*v.names) if isinstance(v, meta.Partitioned) else PartitionSpec()


def _as_spec(path: str, s: PartitionSpec | NamedSharding | None) -> PartitionSpec:
    if s is None:
        return PartitionSpec()
    if isinstance(s, NamedSharding):
        return s.spec
    if isinstance(s, PartitionSpec):
        return s
    raise TypeError(f"Spec of '{path}' must be a PartitionSpec, NamedSharding or None, got {s!r}.")


def _given(specs: Tree, flat: Mapping[str, Any]) -> dict[str, PartitionSpec]:
    """The user's base specs by full variables path ("params/..." added to a bare tree)."""
    given = _trees.flat(_paths.as_variables(specs, "specs"))
    unknown = [k for k in given if k not in flat]
    _raise_listed("has a sharding spec but is not a leaf of the params", unknown)
    return {k: _as_spec(k, v) for k, v in given.items() if not _is_record(v)}


def _padded(path: str, leaf: Any, spec: PartitionSpec) -> PartitionSpec:
    ndim = len(shape_of(leaf))
    if len(spec) > ndim:
        raise ValueError(
            f"Leaf '{path}' has {ndim} axes (shape {shape_of(leaf)}) but its spec "
            f"{spec} names {len(spec)}."
        )
    return PartitionSpec(*spec, *(None,) * (ndim - len(spec)))


def _adapter_spec(
    path: str, flat: Mapping[str, Any], specs: Mapping[str, PartitionSpec], plan: Plan
) -> PartitionSpec:
    """An adapter leaf's spec: its kernel's, mapped by the record's geometry."""
    param, leaf, name = _paths.adapted_param(path)
    record = plan.adapters.get((param, name))
    if record is None or param not in flat:
        missing = _paths.record_path(param, name) if record is None else param
        raise ValueError(f"Adapter leaf '{path}' has no '{missing}' to take its sharding from.")
    stored = shape_of(flat[param])
    problems = record.geometry.problems(
        _paths.to_param(param), stored, {leaf: shape_of(flat[path])}
    )
    if problems:
        raise ValueError(" ".join(problems))
    axes = variant_for(record.variant).axes(record.geometry, tuple(specs[param]), len(stored))
    return PartitionSpec(*axes[leaf])


def _axes(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_axes(spec: PartitionSpec) -> list[str]:
    return [a for entry in spec for a in _axes(entry)]


def _spec_problems(what: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> list[str]:
    """What keeps an array of `shape` from being sharded with `spec` (axes of `mesh`)."""
    problems = []
    if len(spec) > len(shape):
        return [f"{what} has shape {tuple(shape)} but its spec {spec} names {len(spec)} axes."]
    for dim, entry in enumerate(spec):
        axes = _axes(entry)
        n = int(np.prod([mesh.shape[a] for a in axes]))
        if shape[dim] % n:
            problems.append(
                f"{what} has shape {tuple(shape)}: dimension {dim} ({shape[dim]}) is not "
                f"divisible by the {n} devices of mesh axes {axes} (spec {spec})."
            )
    return problems


def _batch_path(key: tuple) -> str:
    return _paths.keystr(key) or "batch"


def _put_rows(path: str, leaf: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a batch leaf: a global jax.Array as is, else this process's rows."""
    if isinstance(leaf, jax.Array) and (jax.process_count() == 1 or not leaf.is_fully_addressable):
        return _put(leaf, sharding)
    try:
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
    except ValueError as e:
        raise ValueError(
            f"Batch leaf '{path}' (this process's rows, shape {np.shape(leaf)}) "
            f"does not split over batch_sharding {sharding.spec} on mesh "
            f"{dict(sharding.mesh.shape)}: {e}"
        ) from None


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ValueError(problems[0])
    _trees.raise_problems("Sharding does not fit", problems)


def _raise_listed(what: str, paths: list[str]) -> None:
    _raise([f"Leaf '{p}' {what}." for p in paths])
