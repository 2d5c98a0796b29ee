"""Initialization of a LoRA model, from pretrained parameters.

`plan` traces the model abstractly and returns what the config makes of it: which parameters
get adapters (with their geometry, rank and scale), which are trained in full, which kernels
go to 4 bits. `init` computes that plan once and then builds the tree from it: it checks the
pretrained tree against the model, quantizes the selected kernels one at a time, and computes
only the adapter leaves.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _eager, _paths, _trees
from lora_jax.adapters import inits
from lora_jax.adapters.plan import Plan
from lora_jax.config import QuantConfig
from lora_jax.linen.module import LoRA, check_quantized
from lora_jax.quant.formats import QuantizedTensor, dequantize, quantize_array


def plan(lora_model: LoRA, rng: Any, *args: Any, **kwargs: Any) -> Plan:
    """What `lora_model`'s config makes of its model, without computing anything.

    Traces the model for shapes only (no array is made) and reads the records that the trace
    writes into the "lora" collection.

    Args:
      lora_model: a `LoRA` module.
      rng: a PRNG key, or a dict of keys by rng name ("params" is required).
      *args: sample inputs, as for `model.init` (arrays or `jax.ShapeDtypeStruct`s).
      **kwargs: sample keyword inputs.

    Returns:
      A `Plan`: the adapters by parameter path (geometry, rank, scale), the trainable extras
      and the 4-bit kernels.

    Raises:
      ValueError: the config's targets, patterns or extras match nothing in the model (the
        adaptable module paths are listed), or target a non-float parameter.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.models import Llama, LlamaConfig
      >>> lora_model = lj.LoRA(Llama(LlamaConfig.tiny()), lj.LoraConfig(targets=("q_proj",)))
      >>> p = lj.plan(lora_model, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
      >>> adapter = p.adapters["params/layers_0/self_attn/q_proj/kernel", "default"]
      >>> adapter.geometry.a_shape, adapter.geometry.b_shape, adapter.scale
      ((64, 8), (8, 64), 2.0)
    """
    _check_model(lora_model, "plan")
    return Plan.of(_abstract(lora_model, _rngs(rng), args, kwargs))


def init(
    lora_model: LoRA, rng: Any, *args: Any, base_params: Mapping | None = None, **kwargs: Any
) -> dict:
    """Initializes a LoRA model, from pretrained parameters when `base_params` is given.

    With `base_params`, the model is traced for shapes only (no random base weights are ever
    made), the tree is checked against the model, and only the adapter leaves are computed;
    base leaves are returned as the very same arrays (NumPy leaves are put on the device, and
    the `LoraConfig.quantize` kernels quantized one at a time), except the `config.trainable`
    extras, which are copied so that a donating train step can never delete the caller's
    pretrained arrays.

    Args:
      lora_model: a `LoRA` module.
      rng: a PRNG key, or a dict of keys by rng name ("params" is required).
      *args: sample inputs, as for `model.init`.
      base_params: pretrained variables `{"params": ...}` (other collections the model uses
        allowed), or the bare params dict.
      **kwargs: sample keyword inputs.

    Returns:
      The variables dict: "params" (base + adapter leaves) and "lora" (the plan's records).

    Raises:
      ValueError: `base_params` do not fit the model (every bad leaf is listed), already hold
        adapters, or have a collection the model does not use; the config matches nothing.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.models import Llama, LlamaConfig
      >>> model = Llama(LlamaConfig.tiny())
      >>> x = jnp.zeros((1, 8), jnp.int32)
      >>> pretrained = model.init(jax.random.key(0), x)
      >>> lora_model = lj.LoRA(model, lj.LoraConfig(rank=4, targets=("q_proj", "v_proj")))
      >>> params = lj.init(lora_model, jax.random.key(1), x, base_params=pretrained)
      >>> params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel_lora_a"].shape
      (64, 4)
      >>> bool(jnp.all(lora_model.apply(params, x) == model.apply(pretrained, x)))
      True
    """
    _check_model(lora_model, "init")
    rngs = _rngs(rng)
    qcfg = lora_model.quantize
    if base_params is None:
        variables = lora_model.init(rngs, *args, **kwargs)
        if qcfg is not None:  # adapters that read W (QDoRA's m, LoftQ) see the 4-bit one
            base = {k: v for k, v in _trees.flat(variables).items() if not _paths.is_lora(k)}
            return init(lora_model, rng, *args, base_params=_trees.unflat(base), **kwargs)
        the_plan = Plan.of(variables)
        _warn_rank(the_plan)
        return _from_base(lora_model, the_plan, variables, _trees.flat(variables), rngs["params"])
    abstract = _abstract(lora_model, rngs, args, kwargs)
    the_plan = Plan.of(abstract)
    _warn_rank(the_plan)
    base = _base_variables(base_params, abstract)
    _check_fits(base, abstract, the_plan, args)
    dense = _trees.flat(base)
    base = _quantize_base(base, the_plan, qcfg)
    base[_paths.LORA] = the_plan.records()

    every = lora_model.clone(active=None)  # make every configured adapter, active or not

    def new_leaves(base: dict, rngs: dict, *args: Any) -> dict:
        _, made = every.apply(base, *args, rngs=rngs, mutable=[_paths.PARAMS], **kwargs)
        flat = _trees.flat(made)
        return {k: flat[k] for k in the_plan.adapter_leaves()}

    flat = _trees.flat(base)
    flat.update(_eager.needed_only(new_leaves, base, rngs, *args))  # no forward pass, no compile
    # Host (NumPy) leaves go to the device once here, not on every step.
    flat = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in flat.items()}
    for param in the_plan.extras:
        flat[param] = jax.tree.map(jnp.copy, flat[param])
    return _from_base(lora_model, the_plan, _trees.unflat(flat), dense, rngs["params"])


def _from_base(lora_model: LoRA, the_plan: Plan, variables: dict, dense: dict, key: Any) -> dict:
    """Applies the inits that start from the base weight (PiSSA, OLoRA, LoftQ): each such
    adapter's A and B, and its kernel replaced by the residual (LoftQ: quantized again).
    `dense` holds the kernels as given, before any quantization."""
    todo = [
        (param, name, record, lora_model.configs[name])
        for (param, name), record in sorted(the_plan.adapters.items())
        if lora_model.configs[name].base_init is not None
    ]
    if not todo:
        return variables
    taken = {}
    for param, name, _, _ in todo:
        if param in taken:
            raise ValueError(
                f"'{_paths.to_param(param)}': adapters {taken[param]!r} and {name!r} both start "
                "from the base weight (LoraConfig.init) and change it; only one may."
            )
        taken[param] = name
    flat = _trees.flat(variables)
    for param, name, record, cfg in todo:
        g = record.geometry
        where = f"LoraConfig(init={cfg.init!r}) at '{_paths.to_param(param)}'"
        if g.rank > min(g.fan_in, g.fan_out):
            raise ValueError(
                f"{where}: rank {g.rank} exceeds min(fan_in, fan_out) = {min(g.fan_in, g.fan_out)}"
                ", the most singular vectors (or QR columns) the kernel has: lower "
                "LoraConfig.rank or set rank_pattern for this module."
            )
        if cfg.base_init == "loftq" and param not in the_plan.quantized:
            raise ValueError(
                f"{where}: LoftQ fits an adapter to a 4-bit kernel, but QuantConfig.targets="
                f"{cfg.quantize.targets!r} leaves this one dense: quantize every layer the "
                "adapter targets, or use init='pissa' for the dense ones."
            )
        w = _trees.unbox(dense[param])
        if isinstance(w, QuantizedTensor):
            raise ValueError(
                f"LoraConfig(init={cfg.init!r}) starts from the dense weight of "
                f"'{_paths.to_param(param)}', but base_params hold it in 4 bits: pass the "
                "dense base (lora_jax.init quantizes it)."
            )
        lead = w.shape[: w.ndim - len(g.shape) + g.n_batch]
        matrix = jnp.asarray(w, jnp.float32).reshape((*lead, g.fan_in, g.fan_out))
        if cfg.base_init == "pissa":
            k = jax.random.fold_in(key, zlib.crc32(param.encode()))
            a, b, res = inits.pissa(matrix, g.rank, record.scale, cfg.pissa_niter, k)
            kernel = res.reshape(w.shape).astype(w.dtype)
        elif cfg.base_init == "olora":
            a, b, res = inits.olora(matrix, g.rank, record.scale)
            kernel = res.reshape(w.shape).astype(w.dtype)
        else:
            marker = the_plan.quantized[param]
            a, b, kernel = _loftq(w, matrix, record, cfg, marker, _paths.to_param(param))
        flat[param] = _trees.rebox(flat[param], kernel)
        for leaf, value, shape in (
            ("a", a, (*g.in_shape, g.rank)),
            ("b", b, (g.rank, *g.out_shape)),
        ):
            path = _paths.leaf_path(param, leaf, name)
            old = _trees.unbox(flat[path])
            value = value.reshape((*lead, *shape)).astype(old.dtype)
            flat[path] = _trees.rebox(flat[path], value)
    return _trees.unflat(flat)


def _loftq(
    w: Any, matrix: jax.Array, record: Any, cfg: Any, marker: Any, where: str
) -> tuple[jax.Array, jax.Array, QuantizedTensor]:
    """LoftQ's (A, B, 4-bit kernel) for one dense kernel `w` (`matrix`: its matrix view)."""
    n_lead = marker.lead_axes(w.ndim)

    def quantize(m: jax.Array) -> QuantizedTensor:
        return quantize_array(
            m.reshape(w.shape), cfg.quantize, n_lead=n_lead, n_in=marker.n_in, path=where
        )

    def dense_of(q: QuantizedTensor) -> jax.Array:
        return dequantize(q, jnp.float32).reshape(matrix.shape)

    g = record.geometry
    a, b, kernel, _ = inits.loftq(matrix, g.rank, record.scale, quantize, dense_of, cfg.loftq_iter)
    return a, b, kernel


def _check_model(lora_model: Any, what: str) -> None:
    if not isinstance(lora_model, LoRA):
        raise TypeError(f"{what} needs a lora_jax.LoRA module, got {type(lora_model).__name__}.")


def _rngs(rng: Any) -> dict:
    return dict(rng) if isinstance(rng, Mapping) else {"params": rng}


def _abstract(lora_model: LoRA, rngs: dict, args: tuple, kwargs: dict) -> dict:
    return jax.eval_shape(lambda r, *a: lora_model.init(r, *a, **kwargs), rngs, *args)


def _warn_rank(the_plan: Plan) -> None:
    notes = [
        f"'{_paths.to_param(param)}': {note}"
        for (param, _), record in sorted(the_plan.adapters.items())
        if (note := record.geometry.rank_warning()) is not None
    ]
    if notes:
        warnings.warn(
            "LoraConfig: a rank above min(fan_in, fan_out) is never useful: "
            + "; ".join(notes[: _trees.MAX_LISTED])
            + (
                f"; and {len(notes) - _trees.MAX_LISTED} more"
                if len(notes) > _trees.MAX_LISTED
                else ""
            )
            + ". Lower LoraConfig.rank or set rank_pattern for these modules.",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- the base tree


def _base_variables(base_params: Any, abstract: Mapping) -> dict:
    """The pretrained variables (one rule for a bare params dict), checked to be a base."""
    base = _paths.as_variables(base_params, "base_params")
    flat = _trees.flat(base)
    held = sorted(k for k in flat if _paths.is_lora(k))
    if held:
        raise ValueError(
            f"base_params already hold LoRA adapters ({_trees.quoted(held)}): pass the "
            "pretrained parameters (lora_jax.merge(params) folds adapters into them first)."
        )
    unused = sorted(set(base) - set(abstract))
    if unused:
        raise ValueError(
            f"base_params hold collections {unused} that the model does not use (its "
            f"collections: {sorted(set(abstract) - {_paths.LORA})}): leave them out."
        )
    return base


def _check_fits(base: Mapping, abstract: Mapping, the_plan: Plan, args: tuple) -> None:
    """Raises listing every leaf of `base` that does not fit the model's own shapes."""
    new = set(the_plan.adapter_leaves())
    expected = {
        k: tuple(v.shape)
        for k, v in _trees.flat(_trees.unbox_tree(abstract)).items()
        if not k.startswith(_paths.LORA + "/") and k not in new
    }
    found = {k: tuple(jnp.shape(_trees.unbox(v))) for k, v in _trees.flat(base).items()}
    missing = [
        f"Leaf '{k}' is missing (the model expects shape {v})."
        for k, v in expected.items()
        if k not in found
    ]
    extra = [f"Leaf '{k}' is not a parameter of the model." for k in found if k not in expected]
    shapes = [
        f"Leaf '{k}' has shape {found[k]} but the model expects {expected[k]}."
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    problems = missing + extra + shapes
    if not problems:
        return
    sample = [tuple(jnp.shape(a)) for a in jax.tree.leaves(args)]
    hint = ""
    if shapes and not (missing or extra):
        hint = (
            f"\n  Every leaf is there, only shapes differ: if the parameters are right, the "
            f"sample inputs (shapes {sample}) are not — layers such as nn.Dense take their "
            "kernel's input size from the sample input."
        )
    raise ValueError(
        f"base_params do not fit the model traced with sample inputs of shapes {sample} "
        f"({len(problems)} problems):{_trees.listing(problems)}{hint}"
    )


def _quantize_base(variables: Mapping, the_plan: Plan, qcfg: QuantConfig | None) -> dict:
    """Quantizes the kernels that the plan marks 4-bit, one at a time; checks those already
    quantized."""
    flat = _trees.flat(variables)
    quantized = sorted(k for k, v in flat.items() if isinstance(_trees.unbox(v), QuantizedTensor))
    if qcfg is None:
        if quantized:
            raise ValueError(
                f"base_params hold quantized kernels ({_trees.quoted(quantized)}) but "
                "LoraConfig.quantize is None: set it to a QuantConfig that matches them, or "
                "dequantize them first (lora_jax.dequantize)."
            )
        return dict(variables)
    stray = [k for k in quantized if k not in the_plan.quantized]
    if stray:
        raise ValueError(
            f"base_params hold quantized kernels that QuantConfig.targets does not select: "
            f"{_trees.quoted(stray)}. Selected: {_trees.quoted(sorted(the_plan.quantized))}."
        )
    for path, marker in the_plan.quantized.items():
        value = _trees.unbox(flat[path])
        n_lead = marker.lead_axes(len(value.shape))  # stacked-layer axes are leading too
        if isinstance(value, QuantizedTensor):
            check_quantized(path, value, qcfg)
            if (len(value.lead_shape), len(value.in_shape)) != (n_lead, marker.n_in):
                raise ValueError(
                    f"'{path}' was quantized with {len(value.lead_shape)} leading and "
                    f"{len(value.in_shape)} contraction axes, but its layer has {n_lead} batch "
                    f"and {marker.n_in} contraction axes: quantize it from the dense kernel here "
                    "(pass the dense base_params)."
                )
            continue
        qt = quantize_array(
            value, qcfg, n_lead=n_lead, n_in=marker.n_in, path=_paths.to_param(path)
        )
        flat[path] = _trees.rebox(flat[path], qt)  # a sharding box keeps its logical names
    return _trees.unflat(flat)
