"""The one spelling of LoRA leaves and paths.

A LoRA tree is a Flax variables dict. Its "params" collection holds the base parameters and,
beside each adapted parameter, the adapter's leaves; its "lora" collection holds a record per
adapted parameter (what the adapter is: geometry, scale, variant) and a marker per base
parameter trained in full. For the parameter ``kernel`` of ``layers_0/self_attn/q_proj``:

- ``params/layers_0/self_attn/q_proj/kernel_lora_a`` and ``..._lora_b``: the adapter leaves
  (a variant may add more, e.g. ``kernel_lora_m``);
- ``lora/layers_0/self_attn/q_proj/kernel_lora``: the adapter's record;
- ``lora/.../<param>_trainable``: the marker of a `LoraConfig.trainable` extra;
- ``lora/.../kernel_4bit``: the marker of a kernel kept in 4 bits (QLoRA).

A named adapter (several adapters on one base) appends ``@<name>`` to its leaf and record
names: ``kernel_lora_a@french``; the unnamed adapter is named "default".

Paths are '/'-joined. A *variables path* starts with its collection ("params/...", "lora/...");
a *parameter path* is the same path inside the "params" collection, without the prefix
(``layers_0/self_attn/q_proj/kernel``): configs, patterns and messages about parameters use
parameter paths, tree functions use variables paths; `to_variables` / `to_param` convert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

PARAMS = "params"
LORA = "lora"
DEFAULT = "default"
_ADAPTER = "_lora"  # <param>_lora_<leaf>, and the record <param>_lora
_TRAINABLE = "_trainable"
_QUANTIZED = "_4bit"
_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_LEAF = re.compile(r"(?P<param>.+?)_lora(?:_(?P<leaf>[a-z]))?(?:@(?P<name>[A-Za-z0-9_\-]+))?")


class Leaf(NamedTuple):
    """A parsed adapter leaf or record name: the adapted parameter, the leaf ("a", "b", ...;
    "" for the record) and the adapter's name."""

    param: str
    leaf: str
    name: str


def check_name(name: str) -> str:
    """Returns `name` if it can name an adapter (letters, digits, '_' and '-'), else raises."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"An adapter name must be a non-empty string of letters, digits, '_' and '-', "
            f"got {name!r}."
        )
    return name


def _suffix(name: str) -> str:
    return "" if name == DEFAULT else "@" + check_name(name)


def adapter_leaf(param: str, leaf: str, name: str = DEFAULT) -> str:
    """The name of an adapter leaf: ``adapter_leaf("kernel", "a") == "kernel_lora_a"``."""
    return f"{param}{_ADAPTER}_{leaf}{_suffix(name)}"


def record_leaf(param: str, name: str = DEFAULT) -> str:
    """The name of an adapter's record in the "lora" collection: ``kernel_lora``."""
    return f"{param}{_ADAPTER}{_suffix(name)}"


def extra_leaf(param: str) -> str:
    """The name of the "lora"-collection marker of a trainable extra: ``scale_trainable``."""
    return param + _TRAINABLE


def quantized_leaf(param: str) -> str:
    """The name of the "lora"-collection marker of a 4-bit kernel: ``kernel_4bit``."""
    return param + _QUANTIZED


def parse(leaf_name: str) -> Leaf | None:
    """Parses an adapter leaf or record name; None for any other name."""
    m = _LEAF.fullmatch(leaf_name)
    if m is None:
        return None
    return Leaf(m["param"], m["leaf"] or "", m["name"] or DEFAULT)


def is_adapter_leaf(path: str) -> bool:
    """Whether a variables path names an adapter leaf (``params/.../kernel_lora_a``)."""
    if not path.startswith(PARAMS + "/"):
        return False
    parsed = parse(basename(path))
    return parsed is not None and parsed.leaf != ""


def is_lora(path: str) -> bool:
    """Whether a variables path is lora_jax's: an adapter leaf or an entry of the "lora"
    collection (a record or a marker). The rest of a tree is the base."""
    return is_adapter_leaf(path) or path.startswith(LORA + "/")


def extra_param(marker_path: str) -> str | None:
    """The variables path of the parameter that a "lora/.../<param>_trainable" marker marks."""
    if not (marker_path.startswith(LORA + "/") and marker_path.endswith(_TRAINABLE)):
        return None
    return PARAMS + marker_path[len(LORA) : -len(_TRAINABLE)]


def quantized_param(marker_path: str) -> str | None:
    """The variables path of the kernel that a "lora/.../<param>_4bit" marker marks."""
    if not (marker_path.startswith(LORA + "/") and marker_path.endswith(_QUANTIZED)):
        return None
    return PARAMS + marker_path[len(LORA) : -len(_QUANTIZED)]


def record_path(param_path: str, name: str = DEFAULT) -> str:
    """The variables path of the record of the adapter on a variables parameter path."""
    module, param = split(param_path)
    return join(LORA, module.removeprefix(PARAMS).lstrip("/"), record_leaf(param, name))


def leaf_path(param_path: str, leaf: str, name: str = DEFAULT) -> str:
    """The variables path of one leaf of the adapter on a variables parameter path."""
    module, param = split(param_path)
    return join(module, adapter_leaf(param, leaf, name))


def record_target(record_path_: str) -> tuple[str, str]:
    """(variables path of the adapted parameter, adapter name) of a record's path."""
    module, leaf = split(record_path_)
    parsed = parse(leaf)
    if parsed is None or parsed.leaf or not module.startswith(LORA):
        raise ValueError(f"'{record_path_}' is not the path of an adapter record.")
    return join(PARAMS + module[len(LORA) :], parsed.param), parsed.name


def adapted_param(leaf_path_: str) -> tuple[str, str, str]:
    """(variables path of the adapted parameter, leaf, name) of an adapter leaf's path."""
    module, leaf = split(leaf_path_)
    parsed = parse(leaf)
    if parsed is None or not parsed.leaf:
        raise ValueError(f"'{leaf_path_}' is not the path of an adapter leaf.")
    return join(module, parsed.param), parsed.leaf, parsed.name


# --------------------------------------------------------------------------- the "params/" rule


def to_variables(param_path: str) -> str:
    """``layers_0/q_proj/kernel`` -> ``params/layers_0/q_proj/kernel``."""
    return join(PARAMS, param_path)


def to_param(variables_path: str) -> str:
    """``params/layers_0/q_proj/kernel`` -> ``layers_0/q_proj/kernel``; raises for a path in
    another collection."""
    if variables_path != PARAMS and not variables_path.startswith(PARAMS + "/"):
        raise ValueError(f"'{variables_path}' is not in the '{PARAMS}' collection.")
    return variables_path[len(PARAMS) + 1 :]


def is_variables(tree: Any) -> bool:
    """Whether a dict is a variables dict (``{"params": {...}, ...}``) rather than a bare
    params dict: the one rule used everywhere a user may pass either."""
    return isinstance(tree, Mapping) and isinstance(tree.get(PARAMS), Mapping)


def as_variables(tree: Any, what: str = "params") -> dict:
    """A variables dict from a variables dict or a bare params dict (`is_variables`)."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{what} must be a dict of parameters, got {type(tree).__name__}.")
    return dict(tree) if is_variables(tree) else {PARAMS: tree}


# --------------------------------------------------------------------------- generic paths


def join(*parts: str) -> str:
    """'/'-joins the non-empty parts."""
    return "/".join(p for p in parts if p)


def split(path: str) -> tuple[str, str]:
    """(parent, last component) of a '/'-joined path."""
    head, _, tail = path.rpartition("/")
    return head, tail


def basename(path: str) -> str:
    return path.rpartition("/")[2]


def keystr(keypath: Sequence[Any]) -> str:
    """A JAX key path ('/'-joined dict keys, attribute names and sequence indices)."""
    names = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
    return "/".join(names)


def module_path(module: Any) -> str:
    """The '/'-joined path of a bound Flax module's variables in the tree.

    Walks the scope's parent links rather than reading `scope.path`: `nn.share_scope`
    re-parents a wrapped model's attribute submodules without updating their recorded path.
    A lifted transform (`nn.scan`, `nn.remat`, ...) runs its body in a fresh root scope that
    records its own path in the outer tree; the true root's path is ().
    """
    names, scope = [], module.scope
    while scope.parent is not None:
        names.append(str(scope.name))
        scope = scope.parent
    return "/".join([*map(str, scope.path), *reversed(names)])
