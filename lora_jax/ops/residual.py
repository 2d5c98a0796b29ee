"""Adapters whose init changed the base (PiSSA, OLoRA, LoftQ; `lora_jax.adapters.inits`):
back to a plain LoRA over the original base, and what LoftQ gained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax import _paths, _trees
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.variant import variant_for
from lora_jax.config import LoraConfig
from lora_jax.ops.merge import _chain
from lora_jax.ops.named import adapter_names
from lora_jax.quant.formats import QuantizedTensor, dequantize, quantize_array

Tree = Mapping[str, Any]


def to_original_base(
    params: Tree, initial: Tree, config: LoraConfig, *, name: str | None = None
) -> tuple[dict, LoraConfig]:
    """A PiSSA / OLoRA adapter as a plain LoRA adapter of rank 2r over the ORIGINAL base.

    Such an init replaced W by ``W_res = W − s·A₀@B₀``; after training the model computes
    ``W_res + s·A@B = W + s·(A@B − A₀@B₀)``. That difference is a rank-2r LoRA:
    ``A' = [A, A₀]``, ``B' = [B; −B₀]`` with the same scale (alpha doubled with the rank, or
    multiplied by √2 under rsLoRA), as PEFT's ``path_initial_model_for_weight_conversion``
    writes it; the base becomes ``W_res + s·A₀@B₀`` (W to float rounding). `save_peft` then
    writes a file that PEFT (or `load_adapter`) applies to the untouched pretrained model.

    Args:
      params: the trained tree (one adapter per kernel, the default name).
      initial: the adapter leaves right after `lora_jax.init` — e.g.
        ``jax.tree.map(jnp.copy, lj.partition(params)[0])`` taken before training (copy: a
        donating train step deletes the arrays it is given).
      config: the `LoraConfig` the adapters were made with (init "pissa..." or "olora").
      name: the adapter to convert when the tree holds several (the others stay as they
        are; the base is rebuilt from this adapter's initial factors only).

    Returns:
      (tree over the original base, its `LoraConfig` with rank 2r and the usual init).

    Raises:
      ValueError: the config's init does not change the base (nothing to convert) or is
        LoftQ (the original base is not 4-bit: save the adapter with its 4-bit base instead);
        `initial` lacks an adapter leaf or has other shapes.
    """
    if config.base_init not in ("pissa", "olora"):
        raise ValueError(
            f"to_original_base converts PiSSA / OLoRA adapters; LoraConfig.init={config.init!r} "
            + (
                "quantized the base, which the original dense base is not: save it with its "
                "4-bit base."
                if config.base_init == "loftq"
                else "did not change the base: save the adapter as it is."
            )
        )
    held = adapter_names(params)
    if name is None:
        if len(held) > 1:
            raise ValueError(
                f"to_original_base: the tree holds adapters {list(held)}: pass name= (the "
                "one whose init changed the base)."
            )
        name = held[0] if held else "default"
    elif name not in held:
        raise ValueError(
            f"to_original_base: no adapter named {name!r}; the tree holds {list(held)}."
        )
    flat, start = _trees.flat(params), _trees.flat(initial)
    plan = Plan.of(params)
    out = dict(flat)
    problems = []
    for (param, adapter), record in sorted(plan.adapters.items()):
        if adapter != name:
            continue
        paths = {leaf: _paths.leaf_path(param, leaf, name) for leaf in ("a", "b")}
        missing = [p for p in paths.values() if p not in start]
        if missing:
            problems.append(f"initial lacks '{missing[0]}'")
            continue
        a, b = (_trees.unbox(flat[p]) for p in paths.values())
        a0, b0 = (_trees.unbox(start[p]) for p in paths.values())
        if a0.shape != a.shape or b0.shape != b.shape:
            problems.append(f"initial '{paths['a']}' has shape {a0.shape}, the tree {a.shape}")
            continue
        w = _trees.unbox(flat[param])
        original = w.astype(jnp.float32) + record.geometry.delta(a0, b0, record.scale)
        out[param] = _trees.rebox(flat[param], original.astype(w.dtype))
        r_axis = record.geometry.b_rank_axis(b.ndim)
        out[paths["a"]] = _trees.rebox(flat[paths["a"]], jnp.concatenate([a, a0], axis=-1))
        out[paths["b"]] = _trees.rebox(
            flat[paths["b"]], jnp.concatenate([b, -b0.astype(b.dtype)], axis=r_axis)
        )
        geometry = dataclasses.replace(record.geometry, rank=2 * record.rank)
        out[_paths.record_path(param, name)] = dataclasses.replace(record, geometry=geometry)
    _trees.raise_problems("Cannot convert to the original base", problems)
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    converted = dataclasses.replace(
        config,
        rank=2 * config.rank,
        alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern},
        init="kaiming",
    )
    return _trees.unflat(out), converted


def quantization_errors(params: Tree, base_params: Tree) -> dict[str, tuple[float, float]]:
    """How far each 4-bit kernel, with its adapters, is from the dense pretrained kernel.

    For every kernel the tree holds in 4 bits: ``‖W − deq(quantize(W))‖ / ‖W‖`` (plain
    quantization of the pretrained W, as QLoRA starts) and ``‖W − (deq(Q) + ΔW)‖ / ‖W‖``
    (the tree's kernel Q plus its adapters' ΔW): LoftQ lowers the second below the first at
    init; plain QLoRA starts with both equal (ΔW = 0). Frobenius norms, float32.

    Args:
      params: a tree from `lora_jax.init` (or after training) with 4-bit kernels.
      base_params: the dense pretrained tree the kernels were quantized from.

    Returns:
      parameter path -> (plain quantization error, error with the adapters).
    """
    flat, dense = _trees.flat(params), _trees.flat(_paths.as_variables(base_params))
    plan = Plan.of(params)
    deltas: dict[str, list] = {}
    for (param, name), record in plan.adapters.items():
        deltas.setdefault(param, []).append((name, record))
    out = {}
    for param in sorted(plan.quantized):
        q = _trees.unbox(flat[param])
        if param not in dense:
            raise ValueError(
                f"quantization_errors: base_params lack '{param}', the dense kernel that "
                "params hold in 4 bits: pass the pretrained tree they were quantized from."
            )
        w = jnp.asarray(_trees.unbox(dense[param]), jnp.float32)
        if not isinstance(q, QuantizedTensor) or w.shape != q.shape:
            raise ValueError(
                f"'{_paths.to_param(param)}': expected a 4-bit kernel in params and its dense "
                f"pretrained kernel of the same shape in base_params, got {type(q).__name__} "
                f"and shape {w.shape}."
            )
        again = quantize_array(w, q.quant_config(), n_lead=len(q.lead_shape), n_in=len(q.in_shape))
        size = jnp.linalg.norm(w)
        records = tuple(r for _, r in deltas.get(param, []))
        leaves = [
            {
                leaf: _trees.unbox(flat[_paths.leaf_path(param, leaf, n)])
                for leaf in variant_for(r.variant).leaves(r.geometry)
            }
            for n, r in deltas.get(param, [])
        ]
        deq = dequantize(q, jnp.float32)
        adapted = _chain(deq, leaves, records) if records else deq  # QDoRA rescales
        plain = jnp.linalg.norm(w - dequantize(again, jnp.float32)) / size
        after = jnp.linalg.norm(w - adapted) / size
        out[_paths.to_param(param)] = (float(plain), float(after))
    return out
