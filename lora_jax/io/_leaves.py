"""Leaf-level helpers shared by lora_jax's file formats: paths, specs, checksums, checks."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _paths
from lora_jax.config import LoraConfig, dtype_name


def leaves(tree: Any) -> dict[str, Any]:
    """The array leaves of any pytree by '/'-joined key path."""
    return {_paths.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def spec(leaf: Any) -> dict:
    """Shape and dtype of an array, a `jax.ShapeDtypeStruct` or a quantized tensor."""
    return {"shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype)}


def host(leaf: Any) -> np.ndarray | None:
    """A leaf's value on this host, or None for an array this process cannot see in full."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0)) if leaf.is_fully_replicated else None
    return np.asarray(leaf)


def crc32(leaf: Any) -> str | None:
    """A checksum of a leaf's bytes (None where this process cannot see the whole leaf)."""
    value = host(leaf)
    if value is None:
        return None
    return f"{zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8)):08x}"


def problems(found: Mapping[str, dict], expected: Mapping[str, dict], where: str) -> list[str]:
    """chex-style lines for every leaf of another shape or dtype, missing, or extra."""
    out = [
        f"Leaf '{k}' has {_describe(found[k])} {where} but expected {_describe(expected[k])}."
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    out += [f"Leaf '{k}' is missing {where}." for k in expected if k not in found]
    out += [f"Leaf '{k}' is {where} but not expected here." for k in found if k not in expected]
    return out


def _describe(spec_: dict) -> str:
    return f"shape {tuple(spec_['shape'])}" + (f" {spec_['dtype']}" if "dtype" in spec_ else "")


def trainable_problems(flat: Mapping[str, Any], config: LoraConfig) -> list[str]:
    """Why leaves of a trainable half do not fit `config`: a rank other than the config's,
    or a leaf that is neither an adapter leaf nor a `LoraConfig.trainable` extra."""
    out = []
    for path, v in flat.items():
        if _paths.is_adapter_leaf(path):
            param, leaf, _ = _paths.adapted_param(path)
            module = _paths.split(_paths.to_param(param))[0]
            rank = config.rank_for(module)
            if leaf == "a" and jnp.shape(v)[-1] != rank:
                out.append(
                    f"Leaf '{path}' has rank {jnp.shape(v)[-1]} but the config gives "
                    f"'{module}' rank {rank}."
                )
        elif not (
            path.startswith(_paths.PARAMS + "/")
            and config.is_trainable_extra(_paths.to_param(path))
        ):
            out.append(
                f"Leaf '{path}' is frozen: neither an adapter nor a LoraConfig.trainable "
                f"extra {config.trainable!r}."
            )
    return out
