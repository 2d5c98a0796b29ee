"""Configs to and from JSON, and the JSON layout of lora_jax's own files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.config import LoraConfig, QuantConfig, dtype_name

_CLASSES = {"LoraConfig": LoraConfig, "QuantConfig": QuantConfig}


def config_to_dict(config: Any) -> dict:
    """A dataclass config (`LoraConfig`, and any dataclass in its fields) as JSON-ready data.

    Tuples become lists, dtypes their names ("bfloat16"), nested dataclasses nested dicts;
    every field is written, so fields added later are handled without change here.

    Example:
      >>> import lora_jax as lj
      >>> from lora_jax.io import config_from_dict, config_to_dict
      >>> cfg = lj.LoraConfig(rank=4, targets=("q_proj",), rank_pattern={"layers_0/.*": 8})
      >>> config_to_dict(cfg)["rank_pattern"]
      [['layers_0/.*', 8]]
      >>> config_from_dict(config_to_dict(cfg)) == cfg
      True
    """
    return {f.name: _encode(getattr(config, f.name), f.name) for f in dataclasses.fields(config)}


def _encode(value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_encode(v, name) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return dtype_name(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"Config field {name!r} holds {value!r}, which has no JSON form: use tuples, "
            "numbers, strings, dtypes or dataclasses in configs."
        ) from None


def config_from_dict(data: Mapping, cls: type = LoraConfig) -> Any:
    """Rebuilds a dataclass config from `config_to_dict`'s output (the exact same config).

    Lists become tuples, a string in a field whose name ends with "dtype" becomes a dtype, a
    dict becomes the dataclass named by the field's type annotation. Missing fields take
    their defaults (files from older versions).

    Raises:
      ValueError: `data` names a field that `cls` does not have.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no field {unknown[0]!r} (fields: {sorted(fields)}): the file "
            "was written by a newer lora_jax or is not a lora_jax config."
        )
    hints = typing.get_type_hints(cls, localns=_CLASSES)
    return cls(**{k: _decode(v, k, hints.get(k)) for k, v in data.items()})


def _decode(value: Any, name: str, hint: Any) -> Any:
    if isinstance(value, Mapping):
        options = [hint, *typing.get_args(hint)]
        classes = [t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)]
        if not classes:
            raise ValueError(f"Config field {name!r} holds a dict but is not a dataclass field.")
        return config_from_dict(value, classes[0])
    if isinstance(value, list):
        return tuple(_decode(v, name, None) for v in value)
    if isinstance(value, str) and name.endswith("dtype"):
        return jnp.dtype(value)
    return value


def config_diff(found: Any, expected: Any, where: str) -> list[str]:
    """One line per field where two configs differ: '<Class>.<field> is X <where> but Y here.'"""
    return [
        f"{type(expected).__name__}.{f.name} is {getattr(found, f.name)!r} {where} but "
        f"{getattr(expected, f.name)!r} here."
        for f in dataclasses.fields(expected)
        if getattr(found, f.name) != getattr(expected, f.name)
    ]


def dumps(obj: Any, depth: int = 0) -> str:
    """Indented JSON that keeps short lists and dicts (a leaf's shape and dtype) on one line."""
    flat = json.dumps(obj)
    nested = isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values())
    if not isinstance(obj, (dict, list)) or (len(flat) <= 80 and not nested):
        return flat
    pad = "  " * (depth + 1)
    if isinstance(obj, dict):
        rows = [f"{pad}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in obj.items()]
    else:
        rows = [f"{pad}{dumps(v, depth + 1)}" for v in obj]
    brackets = "{}" if isinstance(obj, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(rows) + "\n" + "  " * depth + brackets[1]


def table_hash(table: Mapping) -> str:
    """A sha256 of a JSON table, independent of key order."""
    return hashlib.sha256(
        json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
