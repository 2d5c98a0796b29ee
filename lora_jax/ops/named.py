"""Several named adapters on one base: list, add, delete, rename, keep some.

A tree holds named adapters side by side (``kernel_lora_a@french`` beside ``kernel_lora_a``,
the adapter "default"; see `lora_jax._paths`). `lora_jax.LoRA(model, {name: config, ...})`
makes several at once; `add_adapter` adds one to a tree that has others. Everything here is a
pure function of the tree; the records say which leaves belong to which adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax import _paths, _trees
from lora_jax.adapters import bank
from lora_jax.adapters.plan import Plan
from lora_jax.linen.init import init

Tree = Mapping[str, Any]


def adapter_names(params: Tree) -> tuple[str, ...]:
    """The names of the adapters in a tree, sorted ("default" for an unnamed adapter).

    Example:
      >>> import jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.adapters import Adapter, Geometry
      >>> rec = Adapter(Geometry((2, 3), 0, 1, 1), scale=1.0)
      >>> tree = {"params": {"q": {"kernel": jnp.zeros((2, 3))}},
      ...         "lora": {"q": {"kernel_lora@fr": rec, "kernel_lora@de": rec}}}
      >>> lj.adapter_names(tree)
      ('de', 'fr')
    """
    return tuple(sorted({name for _, name in Plan.of(params).adapters}))


def check_names(params: Tree, names: Iterable[str], what: str) -> tuple[str, ...]:
    """`names` as a tuple, after checking that the tree holds each (else a ValueError that
    lists the tree's adapters)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    held = adapter_names(params)
    unknown = [n for n in names if n not in held]
    if unknown or not names:
        raise ValueError(
            f"{what}: "
            + (f"no adapter named {unknown}" if unknown else "no adapter name given")
            + f"; the tree holds {list(held) or 'no adapters'}."
        )
    return names


def keep_adapters(params: Tree, names: Iterable[str]) -> dict:
    """The tree with only the adapters called `names` (leaves and records; the base, the
    trainable extras and the 4-bit markers stay)."""
    names = set(check_names(params, names, "keep_adapters"))
    return _trees.unflat(
        {k: v for k, v in _trees.flat(params).items() if _name_of(k) in names | {None}}
    )


def delete_adapter(params: Tree, name: str) -> dict:
    """The tree without adapter `name` (its leaves and records).

    Raises:
      ValueError: the tree holds no adapter of that name (its adapters are listed).
    """
    check_names(params, (name,), "delete_adapter")
    return _trees.unflat({k: v for k, v in _trees.flat(params).items() if _name_of(k) != name})


def rename_adapter(params: Tree, old: str, new: str) -> dict:
    """The tree with adapter `old` called `new` (leaves and records renamed).

    Raises:
      ValueError: no adapter `old`; `new` is not a valid name or is taken.
    """
    check_names(params, (old,), "rename_adapter")
    _paths.check_name(new)
    if new != old and new in adapter_names(params):
        raise ValueError(f"rename_adapter: the tree already holds an adapter named {new!r}.")
    out = {}
    for k, v in _trees.flat(params).items():
        if _name_of(k) == old:
            module, leaf = _paths.split(k)
            parsed = _paths.parse(leaf)
            k = _paths.join(
                module,
                _paths.adapter_leaf(parsed.param, parsed.leaf, new)
                if parsed.leaf
                else _paths.record_leaf(parsed.param, new),
            )
        out[k] = v
    return _trees.unflat(out)


def add_adapter(params: Tree, lora_model: Any, rng: Any, *args: Any, **kwargs: Any) -> dict:
    """Adds the adapters of `lora_model` to a tree that already holds others.

    `lora_model` is a `LoRA` over the same model whose config names the new adapters, e.g.
    ``LoRA(model, {"code": LoraConfig(...)})``; they are initialized as `lora_jax.init`
    would (from the tree's base) and joined to the tree. The base is shared: a 4-bit base
    needs the same `QuantConfig`.

    Args:
      params: a tree from `lora_jax.init` (or after training; several adapters allowed).
      lora_model: a `LoRA` module naming only new adapters.
      rng: a PRNG key (or a dict of keys by rng name) for the new adapters.
      *args: sample inputs, as for `lora_jax.init`.
      **kwargs: sample keyword inputs.

    Returns:
      The tree with the old adapters unchanged and the new ones added.

    Raises:
      ValueError: a new name is taken already (adapters' leaves would clash); anything
        `lora_jax.init` raises for the new config.
    """
    held = adapter_names(params)
    clash = sorted(set(getattr(lora_model, "configs", {})) & set(held))
    if clash:
        raise ValueError(
            f"add_adapter: the tree already holds adapters named {clash} (it holds "
            f"{list(held)}): name the new adapter differently, or delete_adapter the old one."
        )
    changes = sorted(n for n, c in getattr(lora_model, "configs", {}).items() if c.base_init)
    if changes:
        raise ValueError(
            f"add_adapter: adapters {changes} start from the base weight (LoraConfig.init="
            f"{lora_model.configs[changes[0]].init!r}) and would change the base that the tree's "
            "other adapters were trained on: init them with lora_jax.init on a tree of their own."
        )
    flat = _trees.flat(params)
    new = _trees.flat(init(lora_model, rng, *args, base_params=base_of(params), **kwargs))
    out = dict(flat)
    for k, v in new.items():
        # The base is the tree's own (a trainable extra the tree trains keeps its value).
        if k not in flat or _paths.is_lora(k):
            out[k] = v
    return _trees.unflat(out)


def _name_of(path: str) -> str | None:
    """The adapter a leaf or record belongs to; None for base leaves and markers."""
    if path.startswith(_paths.LORA + "/"):
        parsed = _paths.parse(_paths.basename(path))
        return parsed.name if parsed is not None and not parsed.leaf else None
    return _paths.adapted_param(path)[2] if _paths.is_adapter_leaf(path) else None


def only_adapter(params: Tree, name: str | None, what: str, config: Any = None) -> dict:
    """The tree with adapter `name` alone, under the default name (what a file holds), and,
    with a `config`, only the trainable extras it selects (another adapter's are dropped).

    `name` None: the tree's one adapter; a tree with several needs `name`."""
    if config is not None and isinstance(params, Mapping) and _paths.LORA in params:
        params = _trees.unflat(
            {
                k: v
                for k, v in _trees.flat(params).items()
                if (extra := _paths.extra_param(k)) is None
                or config.is_trainable_extra(_paths.to_param(extra))
            }
        )
    if name is None:
        held = adapter_names(params)
        if len(held) <= 1:
            name = held[0] if held else _paths.DEFAULT
            if name == _paths.DEFAULT:
                return dict(params)
        else:
            raise ValueError(
                f"{what}: the tree holds several adapters {list(held)}: pass name= to choose one."
            )
    kept = keep_adapters(params, (name,))
    return kept if name == _paths.DEFAULT else rename_adapter(kept, name, _paths.DEFAULT)


def base_of(params: Tree) -> dict:
    """The tree without any adapter leaf or "lora" record (a 4-bit kernel stays 4-bit)."""
    return _trees.unflat({k: v for k, v in _trees.flat(params).items() if not _paths.is_lora(k)})


def join_adapter(params: Tree, loaded: Tree, name: str, what: str) -> dict:
    """`params` (with its adapters) joined by the default adapter of `loaded` under `name`;
    `loaded`'s base leaves win (a loaded trainable extra holds the file's values)."""
    _paths.check_name(name)
    if name in adapter_names(params):
        raise ValueError(
            f"{what}: the tree already holds an adapter named {name!r} (it holds "
            f"{list(adapter_names(params))}): choose another name or delete_adapter it."
        )
    if name != _paths.DEFAULT:
        loaded = rename_adapter(loaded, _paths.DEFAULT, name)
    out = _trees.flat(params)
    out.update(_trees.flat(loaded))
    return _trees.unflat(out)


def adapter_bank(params: Tree, names: Iterable[str]) -> dict:
    """Stacks named adapters once, for serving with per-example `adapter_ids`.

    ``lora_model.apply({**params, **adapter_bank(params, lora_model.active_names)}, x,
    adapter_ids=ids)`` computes what ``lora_model.apply(params, x, adapter_ids=ids)`` does,
    without stacking every active adapter in every call (see `lora_jax.adapters.bank`).
    Remake the bank after the adapters change.

    Args:
      params: a tree with named plain-LoRA adapters (layers stored one per module: a model
        whose layers run under `nn.scan` stacks its adapters in each call instead).
      names: the adapters, in the order `adapter_ids` index (`LoRA.active_names`).

    Returns:
      ``{"lora_bank": ...}``: the stacked factors (B scaled, ranks padded) and a `Bank`
      record per adapted parameter, to pass beside the params.

    Raises:
      ValueError: an unknown name; an adapter that is not plain LoRA; layers stacked on a
        leading axis (`nn.scan`).
    """
    names = check_names(params, names, "adapter_bank")
    flat, plan = _trees.flat(params), Plan.of(params)
    by_param: dict[str, dict] = {}
    for (param, name), record in plan.adapters.items():
        if name in names:
            by_param.setdefault(param, {})[name] = record
    out: dict[str, Any] = {}
    for param, records in sorted(by_param.items()):
        first = next(iter(records.values()))
        leaf_of = lambda n, leaf, param=param: _trees.unbox(flat[_paths.leaf_path(param, leaf, n)])
        stored = jnp.shape(_trees.unbox(flat[param]))
        problems = [
            f"adapter {n!r} at '{_paths.to_param(param)}' is {r.variant!r}, not plain LoRA"
            for n, r in records.items()
            if r.variant != "lora"
        ]
        if first.geometry.stacked(stored):
            problems.append(
                f"'{_paths.to_param(param)}' is stored stacked ({stored}, layers under "
                "nn.scan): LoRA stacks such adapters in each call; pass no bank"
            )
        if problems:
            raise ValueError(f"adapter_bank: {'; '.join(problems)}.")
        entries = [
            (leaf_of(n, "a"), leaf_of(n, "b"), records[n].scale) if n in records else None
            for n in names
        ]
        dtype = jnp.result_type(leaf_of(next(iter(records)), "a"))
        a, b = bank.stack(first.geometry, entries, dtype)
        module, leaf = _paths.split(_paths.to_param(param))
        where = _paths.join(bank.BANK, module, leaf + "_bank")
        out[where] = bank.Bank(names, int(a.shape[-1]))
        out[where + "_a"], out[where + "_b"] = a, b
    return _trees.unflat(out)
