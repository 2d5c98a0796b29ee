"""What a tree must be to be saved as an adapter, and how a file's adapters join a base model's
parameters: shared by lora_jax's own adapter files (`lora_jax.io.adapter_files`) and PEFT's
(`lora_jax.io.peft`), so that both check alike and give exactly the tree `lora_jax.init`
gives."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import _paths, _trees
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Quantized
from lora_jax.adapters.variant import variant_for
from lora_jax.config import LoraConfig
from lora_jax.io import _leaves
from lora_jax.ops.partition import partition
from lora_jax.quant.formats import QuantizedTensor


def to_save(params: Any, config: Any) -> tuple[dict, Plan, dict, dict]:
    """The unboxed tree to save, its plan, and its trainable and frozen halves; raises unless
    `params` is a whole tree from `lora_jax.init` with adapters that `config` describes."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_jax.LoraConfig, got {type(config).__name__}.")
    if not isinstance(params, Mapping) or _paths.LORA not in params:
        raise ValueError(
            f"params must be the whole tree from lora_jax.init, with its '{_paths.LORA}' "
            "collection."
        )
    values = _trees.unbox_tree(params)
    plan = Plan.of(values)
    trainable, frozen = partition(values)
    _trees.raise_problems(
        "params' trainable half does not fit the LoraConfig",
        _leaves.trainable_problems(_trees.flat(trainable), config),
    )
    if not plan.adapters:
        raise ValueError("params holds no adapter: nothing to save.")
    _trees.raise_problems(
        "params' adapters were not made with this LoraConfig", record_problems(plan, config)
    )
    return values, plan, trainable, frozen


def base_leaves(base_params: Mapping) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base's leaves by variables path, boxed as given and unboxed; raises if the base
    already holds adapters."""
    boxed = _trees.flat(_paths.as_variables(base_params, "base_params"))
    flat = {k: _trees.unbox(v) for k, v in boxed.items()}
    held = sorted(k for k in flat if _paths.is_lora(k))
    if held:
        raise ValueError(
            f"base_params already hold LoRA leaves ({_trees.quoted(held)}): pass the base "
            "model's own parameters."
        )
    return boxed, flat


def assemble(
    config: LoraConfig,
    plan: Plan,
    boxed: dict[str, Any],
    flat: Mapping[str, Any],
    values: Mapping[str, Any],
) -> tuple[dict, LoraConfig]:
    """The variables of the base (`boxed`, `flat` from `base_leaves`) with the file's trainable
    `values` and the plan's records, and the config fitted to the base (4-bit or dense)."""
    config = _fit_quantize(config, flat)
    plan = dataclasses.replace(plan, quantized=_quantized_markers(plan, flat))
    boxed.update({k: _boxed_like(k, v, boxed, plan) for k, v in values.items()})
    out = _trees.unflat(boxed)
    out[_paths.LORA] = plan.records()
    return out, config


def record_problems(plan: Plan, config: LoraConfig) -> list[str]:
    """Every adapter of the plan that `config` does not describe (one line each): not
    targeted, another rank or scale, or named (one config describes the default adapter)."""
    out = []
    for (param, name), record in sorted(plan.adapters.items()):
        module = _paths.split(_paths.to_param(param))[0]
        if name != _paths.DEFAULT:
            out.append(
                f"'{_paths.to_param(param)}' has an adapter named {name!r}; a file holds the "
                f"default adapter only."
            )
        elif not config.is_target(module):
            out.append(
                f"'{_paths.to_param(param)}' has an adapter but the config does not target it."
            )
        elif (record.rank, record.scale) != (config.rank_for(module), config.scale_for(module)):
            out.append(
                f"'{_paths.to_param(param)}' has rank {record.rank} and scale {record.scale} but "
                f"the config gives rank {config.rank_for(module)} and scale "
                f"{config.scale_for(module)}."
            )
    return out


def _boxed_like(path: str, value: Any, boxed: Mapping, plan: Plan) -> Any:
    """An adapter leaf in its kernel's sharding box (as `lora_jax.init` boxes it); an extra in
    its base leaf's box."""
    if not _paths.is_adapter_leaf(path):
        return _trees.rebox(boxed[path], value) if path in boxed else value
    param, leaf, name = _paths.adapted_param(path)
    names = _trees.box_names(boxed.get(param))
    if names is None:
        return value
    record = plan.adapters[param, name]
    ndim = len(_trees.unbox(boxed[param]).shape)
    axes = variant_for(record.variant).axes(record.geometry, names, ndim)
    return boxed[param].replace(value=value, names=axes[leaf])


def _fit_quantize(config: LoraConfig, flat: Mapping) -> LoraConfig:
    """The config with `quantize` describing the base it is loaded onto: None for a dense
    base; for a 4-bit one, the tensors' format and the quantized layers as targets."""
    qts = {k: v for k, v in flat.items() if isinstance(v, QuantizedTensor)}
    if not qts:
        return dataclasses.replace(config, quantize=None)
    kinds = {q.quant_config() for q in qts.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"base_params mix 4-bit formats {sorted(map(repr, kinds))}: one QuantConfig cannot "
            "describe them."
        )
    modules = tuple(sorted(_paths.split(_paths.to_param(k))[0] for k in qts))
    kernel = config.quantize.kernel if config.quantize is not None else "auto"
    quantize = dataclasses.replace(kinds.pop(), targets=modules, kernel=kernel)
    return dataclasses.replace(config, quantize=quantize)


def _quantized_markers(plan: Plan, flat: Mapping) -> dict[str, Quantized]:
    """A 4-bit marker per quantized kernel of the base, its axes from the adapter's geometry
    where it has one (else its leading axes are taken as batch axes)."""
    adapted = {param: record.geometry for (param, _), record in plan.adapters.items()}
    out = {}
    for k, v in flat.items():
        if not isinstance(v, QuantizedTensor):
            continue
        g = adapted.get(k)
        if g is not None:
            out[k] = Quantized(g.n_batch, g.n_in, len(g.shape))
        else:
            out[k] = Quantized(len(v.lead_shape), len(v.in_shape), v.ndim)
    return out


def tensor(path: Path, name: str, item: Mapping) -> np.ndarray:
    dtype = _DTYPES.get(item["dtype"])
    if dtype is None:
        raise ValueError(f"'{path}' tensor '{name}' has unsupported dtype {item['dtype']}.")
    return np.frombuffer(bytes(item["data"]), dtype=dtype).reshape(item["shape"])


_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": jnp.bfloat16, "F32": np.float32, "F64": np.float64,
}  # fmt: skip
