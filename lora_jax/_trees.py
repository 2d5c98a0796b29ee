"""Tree helpers used across the package: flatten/unflatten, sharding boxes, the error that
lists every bad leaf, and the rule that matches optimizer-state leaves to parameters.

Flattening is `flax.traverse_util` with '/'-joined keys (so the flat keys are the paths of
`lora_jax._paths`); non-dict nodes such as a `QuantizedTensor` or an adapter record are leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from flax import traverse_util
from flax.core import meta

from lora_jax import _paths

MAX_LISTED = 10


def flat(tree: Any, what: str = "params") -> dict[str, Any]:
    """The '/'-joined flat dict of a nested dict of variables."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{what} must be a dict of variables, got {type(tree).__name__}.")
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflat(flat_: Mapping[str, Any]) -> dict:
    """The nested dict of a '/'-joined flat dict."""
    return traverse_util.unflatten_dict(dict(flat_), sep="/")


# --------------------------------------------------------------------------- sharding boxes


def is_box(x: Any) -> bool:
    """Whether `x` is a Flax metadata box (`nn.Partitioned`, `nn.LogicallyPartitioned`, ...)."""
    return isinstance(x, meta.AxisMetadata)


def unbox(x: Any) -> Any:
    """The value in a box, else `x`. Unlike `flax.core.meta.unbox` this never adds a sharding
    constraint (which a `QuantizedTensor` could not take: its fields have other shapes)."""
    if isinstance(x, meta.Partitioned):
        return x.value
    return x.unbox() if is_box(x) else x


def rebox(boxed: Any, value: Any) -> Any:
    """`value` in the box of `boxed` (the same object when the value is unchanged)."""
    if unbox(boxed) is value:
        return boxed
    return boxed.replace_boxed(value) if is_box(boxed) else value


def unbox_tree(tree: Any) -> Any:
    """`tree` with every box replaced by its value."""
    return jax.tree.map(unbox, tree, is_leaf=is_box)


def rebox_tree(boxed: Any, values: Any) -> Any:
    """Puts `values` (shaped like `unbox_tree(boxed)`) back into the boxes of `boxed`."""
    return jax.tree.map(rebox, boxed, values, is_leaf=is_box)


def box_names(x: Any) -> tuple | None:
    """The axis names of a `nn.Partitioned` box (logical or mesh axes), else None."""
    return tuple(x.names) if isinstance(x, meta.Partitioned) else None


# --------------------------------------------------------------------------- errors


def listing(problems: Iterable[str]) -> str:
    """Problem lines, one per line and at most `MAX_LISTED`, then how many more."""
    problems = list(problems)
    more = len(problems) - MAX_LISTED
    return (
        "\n  "
        + "\n  ".join(problems[:MAX_LISTED])
        + (f"\n  ... and {more} more." if more > 0 else "")
    )


def raise_problems(
    header: str, problems: Iterable[str], error: type[Exception] = ValueError
) -> None:
    """Raises `error` listing every problem (chex's shape: one leaf per line), if any.

    One problem reads as one sentence after the header; several are counted and listed.
    """
    problems = list(problems)
    if not problems:
        return
    if len(problems) == 1:
        raise error(f"{header}: {problems[0]}")
    raise error(f"{header} ({len(problems)} problems):{listing(problems)}")


def quoted(paths: Iterable[str]) -> str:
    """'a', 'b' and 3 more: a short list of paths for a message."""
    paths = list(paths)
    more = len(paths) - MAX_LISTED
    return ", ".join(f"'{p}'" for p in paths[:MAX_LISTED]) + (
        f" and {more} more" if more > 0 else ""
    )


# --------------------------------------------------------------------------- optimizer state


def mirrored(state_path: str, leaf_shape: tuple, params: Mapping[str, Any]) -> str | None:
    """The parameter path that an optimizer-state leaf mirrors, or None.

    An optax state leaf mirrors a parameter when the parameter's path ends its key path and
    the shapes agree (Adam's mu and nu, momentum traces, ...); step counts and factored
    statistics mirror nothing. `params` maps paths to leaves with a `.shape`.
    """
    parts = state_path.split("/")
    for start in range(len(parts)):
        candidate = "/".join(parts[start:])
        leaf = params.get(candidate)
        if leaf is not None and tuple(leaf.shape) == tuple(leaf_shape):
            return candidate
    return None


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, **kwargs: Any) -> Any:
    """`jax.tree_util.tree_map_with_path` with the path spelled by `_paths.keystr`."""
    return jax.tree_util.tree_map_with_path(lambda k, v: fn(_paths.keystr(k), v), tree, **kwargs)
