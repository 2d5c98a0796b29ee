"""Combining named adapters into a new one: ΔW_new ≈ Σ wᵢ·ΔWᵢ, per adapted parameter.

Three methods, as PEFT's ``add_weighted_adapter`` names them:

- ``"cat"``: exact. A_new = [A₁ … Aₙ] (rank Σ rᵢ), B_new = [w₁s₁B₁; … ; wₙsₙBₙ], scale 1;
  A_new @ B_new = Σ wᵢ·sᵢ·Aᵢ@Bᵢ to float rounding.
- ``"svd"``: the same sum truncated to a chosen rank by its SVD (computed from the stacked
  factors, so ΔW is never formed: QR of each side and the SVD of a small core); the relative
  residual ‖ΔW − ΔW_r‖ / ‖ΔW‖ per parameter says what the truncation lost.
- ``"linear"``: equal ranks only: A_new = Σ √(|wᵢ|sᵢ)·sign(wᵢ)·Aᵢ, B_new = Σ √(|wᵢ|sᵢ)·Bᵢ.
  Inexact: the product has cross terms Aᵢ@Bⱼ (PEFT has it too); the residual against the exact
  sum is reported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _paths, _trees
from lora_jax.adapters.geometry import Geometry
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Adapter
from lora_jax.analysis.spectrum import as_matrices, delta_svd
from lora_jax.config import LoraConfig
from lora_jax.ops.named import adapter_names, check_names
from lora_jax.quant.formats import QuantizedTensor

METHODS = ("cat", "svd", "linear")
Tree = Mapping[str, Any]


class Combination(NamedTuple):
    """What `add_weighted_adapter` returns.

    Attributes:
      params: the tree with the new adapter added (the others unchanged).
      config: the new adapter's `LoraConfig` (its exact targets, ranks, alpha = rank so the
        scale is 1), for ``LoRA(model, {..., name: config})`` and `save_adapter`.
      residuals: parameter path -> ‖Σ wᵢΔWᵢ − ΔW_new‖ / ‖Σ wᵢΔWᵢ‖ (Frobenius; 0 for
        "cat", whose factors are the sum itself; what truncation or "linear" lost otherwise).
    """

    params: dict
    config: LoraConfig
    residuals: dict[str, float]


def add_weighted_adapter(
    params: Tree,
    weights: Mapping[str, float],
    name: str,
    *,
    method: str = "cat",
    rank: int | None = None,
    like: LoraConfig | None = None,
) -> Combination:
    """Adds adapter `name`, the weighted sum of existing plain-LoRA adapters.

    Args:
      params: a tree holding the named adapters.
      weights: adapter name -> weight wᵢ (any real number; negative subtracts).
      name: the new adapter's name (not taken yet).
      method: "cat" (exact, rank Σ rᵢ), "svd" (the exact sum truncated to `rank`) or "linear"
        (equal ranks and targets only; inexact, as in PEFT). See the module docstring.
      rank: the rank for "svd" (default: the largest source rank).
      like: a config whose `dropout`, `param_dtype` and `quantize` the new adapter's config
        copies (default: the first source's leaves' dtype; `quantize` read from the tree's
        4-bit kernels, targets at their default).

    Returns:
      A `Combination` (params, config, residuals).

    Raises:
      ValueError: an unknown or taken name, an empty or non-finite weight, a method that is
        not one of `METHODS`, "linear" over adapters of different ranks or targets, a source
        that is not plain LoRA ("lora" variant).
    """
    if method not in METHODS:
        raise ValueError(f"add_weighted_adapter: method must be one of {METHODS}, got {method!r}.")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("add_weighted_adapter: weights must map adapter names to numbers.")
    sources = check_names(params, tuple(weights), "add_weighted_adapter")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"add_weighted_adapter: weights[{n!r}] must be a finite number.")
    _paths.check_name(name)
    if name in adapter_names(params):
        raise ValueError(f"add_weighted_adapter: the tree already holds an adapter {name!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"add_weighted_adapter: rank must be a positive int, got {rank!r}.")
    if method != "svd" and rank is not None:
        raise ValueError(f"add_weighted_adapter: rank is for method='svd', not {method!r}.")
    plan = Plan.of(params)
    flat = _trees.flat(params)
    by_param: dict[str, list[tuple[str, Adapter]]] = {}
    for (param, n), record in sorted(plan.adapters.items()):
        if n in weights:
            if record.variant != "lora":
                raise ValueError(
                    f"add_weighted_adapter: adapter {n!r} at '{_paths.to_param(param)}' is "
                    f"{record.variant!r}; only plain LoRA adapters ('lora') add up linearly."
                )
            by_param.setdefault(param, []).append((n, record))
    if method == "linear":
        _check_linear(by_param, sources)
    out, ranks, residuals, dtype = dict(flat), {}, {}, None
    for param, found in by_param.items():
        geometry = found[0][1].geometry
        leaves = [
            (
                weights[n],
                r,
                _trees.unbox(flat[_paths.leaf_path(param, "a", n)]),
                _trees.unbox(flat[_paths.leaf_path(param, "b", n)]),
            )
            for n, r in found
        ]
        dtype = dtype or leaves[0][2].dtype
        a, b, residual = _combined(method, geometry, leaves, rank)
        new = Adapter(Geometry.of(geometry.shape, geometry.split, a.shape[-1]), 1.0, "lora")
        out[_paths.leaf_path(param, "a", name)] = _trees.rebox(
            flat[_paths.leaf_path(param, "a", found[0][0])], a.astype(leaves[0][2].dtype)
        )
        out[_paths.leaf_path(param, "b", name)] = _trees.rebox(
            flat[_paths.leaf_path(param, "b", found[0][0])], b.astype(leaves[0][3].dtype)
        )
        out[_paths.record_path(param, name)] = new
        ranks[_paths.to_param(param)] = new.rank
        residuals[_paths.to_param(param)] = residual
    config = _config(ranks, flat, like, dtype)
    return Combination(_trees.unflat(out), config, residuals)


def _check_linear(by_param: Mapping[str, list], sources: tuple[str, ...]) -> None:
    problems = []
    for param, found in by_param.items():
        names = [n for n, _ in found]
        missing = [n for n in sources if n not in names]
        if missing:
            problems.append(f"'{_paths.to_param(param)}' has no adapter {missing}")
        ranks = {n: r.rank for n, r in found}
        if len(set(ranks.values())) > 1:
            problems.append(f"'{_paths.to_param(param)}' has ranks {ranks}")
    if problems:
        raise ValueError(
            "add_weighted_adapter: method='linear' needs adapters of the same targets and "
            f"ranks: {'; '.join(problems[:5])}. Use method='cat' (exact) or 'svd'."
        )


def _combined(
    method: str, geometry: Geometry, leaves: list[tuple], rank: int | None
) -> tuple[jax.Array, jax.Array, float]:
    """(A_new, B_new, relative residual) for one parameter, in float32."""
    f32 = jnp.float32
    cat_a = jnp.concatenate([a.astype(f32) for _, _, a, _ in leaves], axis=-1)
    cat_b = jnp.concatenate(
        [b.astype(f32) * (w * r.scale) for w, r, _, b in leaves],
        axis=geometry.b_rank_axis(leaves[0][3].ndim),
    )
    if method == "cat":
        return cat_a, cat_b, 0.0  # the sum itself, factor by factor: nothing is lost
    if method == "linear":
        root = [math.copysign(math.sqrt(abs(w) * r.scale), w) for w, r, _, _ in leaves]
        a = sum(c * a.astype(f32) for c, (_, _, a, _) in zip(root, leaves, strict=True))
        b = sum(abs(c) * b.astype(f32) for c, (_, _, _, b) in zip(root, leaves, strict=True))
        return a, b, _residual(geometry, cat_a, cat_b, a, b)
    k = rank or max(r.rank for _, r, _, _ in leaves)
    k = min(k, geometry.fan_in, geometry.fan_out, cat_a.shape[-1])
    a_m, b_m = as_matrices(
        Geometry.of(geometry.shape, geometry.split, cat_a.shape[-1]), cat_a, cat_b
    )
    u, s, v = delta_svd(a_m, b_m)
    root = jnp.sqrt(s[..., :k])
    a = u[..., :k] * root[..., None, :]
    b = jnp.swapaxes(v[..., :k] * root[..., None, :], -1, -2)
    lead = a.shape[:-2]
    a = a.reshape((*lead, *geometry.in_shape, k))
    b = b.reshape((*lead, k, *geometry.out_shape))
    total = jnp.sum(s**2)
    lost = jnp.sum(s[..., k:] ** 2)
    residual = float(jnp.sqrt(lost / total)) if float(total) > 0 else 0.0
    return a, b, residual


def _residual(
    geometry: Geometry, a0: jax.Array, b0: jax.Array, a: jax.Array, b: jax.Array
) -> float:
    """‖A₀B₀ − AB‖ / ‖A₀B₀‖ (0 when the exact sum is 0 and so is the result)."""
    exact = Geometry.of(geometry.shape, geometry.split, a0.shape[-1]).delta(a0, b0)
    got = Geometry.of(geometry.shape, geometry.split, a.shape[-1]).delta(a, b)
    size = float(jnp.linalg.norm(exact))
    lost = float(jnp.linalg.norm(exact - got))
    return lost / size if size > 0 else (0.0 if lost == 0 else math.inf)


def _config(
    ranks: Mapping[str, int], flat: Mapping[str, Any], like: LoraConfig | None, dtype: Any
) -> LoraConfig:
    """The config that describes the new adapter exactly: targets its modules by path,
    rank per module, alpha = rank (scale 1)."""
    modules = sorted({_paths.split(p)[0] for p in ranks})
    rank = max(ranks.values())
    other = {_paths.split(p)[0]: r for p, r in ranks.items() if r != rank}
    exact = lambda m: re.escape(m)
    quantize = like.quantize if like is not None else _quant_config(flat)
    return LoraConfig(
        rank=rank,
        alpha=float(rank),
        targets="|".join(exact(m) for m in modules),
        rank_pattern={f"^{exact(m)}$": r for m, r in other.items()},
        alpha_pattern={f"^{exact(m)}$": float(r) for m, r in other.items()},
        dropout=like.dropout if like is not None else 0.0,
        param_dtype=like.param_dtype if like is not None else np.dtype(dtype or np.float32),
        quantize=quantize,
    )


def _quant_config(flat: Mapping[str, Any]) -> Any:
    for v in flat.values():
        if isinstance(_trees.unbox(v), QuantizedTensor):
            return _trees.unbox(v).quant_config()
    return None
