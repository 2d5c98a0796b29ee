"""Which leaves train: labels for optax, and the split of a tree into trainable and frozen.

Trainable leaves are the adapter leaves (named by `lora_jax._paths`) and the base parameters
that the tree's plan marks as trainable extras (`LoraConfig.trainable`); everything else is
frozen. Everything here reads only the tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lora_jax import _paths, _trees
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Record
from lora_jax.ops.named import check_names

TRAINABLE, FROZEN = "trainable", "frozen"
Tree = Mapping[str, Any]


def trainable_paths(params: Tree, adapters: Iterable[str] | None = None) -> frozenset[str]:
    """Variables paths of the trainable leaves: adapters and the `LoraConfig.trainable`
    extras, e.g. ``params/layers_0/self_attn/q_proj/kernel_lora_a``.

    Args:
      params: the variables dict that `lora_jax.init` returns.
      adapters: the names of the adapters to train (None: every adapter); the others' leaves
        are frozen. Trainable extras are base parameters, shared, and stay trainable.
    """
    flat = _trees.flat(params)
    extras = Plan.of(params).extras
    names = None if adapters is None else set(check_names(params, adapters, "adapters"))
    return frozenset(
        k
        for k in flat
        if k in extras
        or (_paths.is_adapter_leaf(k) and (names is None or _paths.adapted_param(k)[2] in names))
    )


def labels(params: Tree, adapters: Iterable[str] | None = None) -> dict:
    """Labels each leaf "trainable" or "frozen", for `optax.multi_transform`.

    Args:
      params: the variables dict that `lora_jax.init` returns.
      adapters: train only the adapters of these names (see `trainable_paths`).

    Returns:
      A tree of the same structure (`jax.tree.structure` equal) with a string per array leaf;
      the records of the "lora" collection hold no arrays and are kept as they are.

    Example:
      >>> import lora_jax as lj
      >>> tree = {"params": {"q": {"kernel": 1.0, "kernel_lora_a": 2.0, "kernel_lora_b": 3.0}}}
      >>> lj.labels(tree)["params"]["q"]
      {'kernel': 'frozen', 'kernel_lora_a': 'trainable', 'kernel_lora_b': 'trainable'}
    """
    trainable = trainable_paths(params, adapters)
    return _trees.unflat(
        {
            k: v if isinstance(v, Record) else TRAINABLE if k in trainable else FROZEN
            for k, v in _trees.flat(params).items()
        }
    )


def partition(params: Tree, adapters: Iterable[str] | None = None) -> tuple[dict, dict]:
    """Splits the tree into (trainable, frozen): two dicts with disjoint leaves.

    `trainable` holds the adapter leaves (and `LoraConfig.trainable` extras) and is a
    standalone tree to differentiate and optimize; `frozen` holds everything else, the "lora"
    collection included. `combine(trainable, frozen)` gives the tree back. With `adapters`,
    only the adapters of those names are trainable (see `trainable_paths`).
    """
    trainable = trainable_paths(params, adapters)
    flat = _trees.flat(params)
    return (
        _trees.unflat({k: v for k, v in flat.items() if k in trainable}),
        _trees.unflat({k: v for k, v in flat.items() if k not in trainable}),
    )


def combine(*trees: Tree) -> dict:
    """Joins trees with disjoint leaves (the halves of `partition`) into one."""
    flat: dict[str, Any] = {}
    for tree in trees:
        part = _trees.flat(tree)
        clash = sorted(set(flat) & set(part))
        if clash:
            raise ValueError(f"combine got leaf '{clash[0]}' twice ({len(clash)} shared leaves).")
        flat.update(part)
    return _trees.unflat(flat)
