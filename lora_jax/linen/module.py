"""The LoRA wrapper for flax.linen models.

`LoRA(model, config)` runs the unmodified `model` under `nn.intercept_methods`: each call to
an adapted layer's method gets the adapter's output added to its own. `nn.share_scope` keeps
the model's own parameter paths, so the adapter leaves sit beside the parameter they adapt.

What is adapted, and how, is the plan recorded in the tree's "lora" collection (see
`lora_jax.adapters.plan`): at init (when the collection is being made) the interceptor writes
one record per adapted parameter from the config and the layer's rule; afterwards it reads the
records, and checks once per traced layer that the config still describes them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax import _paths, _trees
from lora_jax.adapters.geometry import Geometry, Split
from lora_jax.adapters.records import Adapter, Quantized, Trainable
from lora_jax.adapters.variant import variant_for
from lora_jax.config import LoraConfig, QuantConfig, matches_pattern
from lora_jax.quant.formats import QuantizedTensor
from lora_jax.rules import LinearRule, Rule, rule_for

Array = jax.Array


@dataclasses.dataclass
class _Trace:
    """What one run of the wrapped model saw (to validate the targets at init)."""

    adaptable: set[str] = dataclasses.field(default_factory=set)
    targeted: set[str] = dataclasses.field(default_factory=set)
    extras: set[str] = dataclasses.field(default_factory=set)
    quantized: set[str] = dataclasses.field(default_factory=set)
    busy: bool = False  # inside a rule's own computation: do not intercept its module calls


@dataclasses.dataclass(frozen=True)
class _Call:
    """One intercepted call, as the variants see it (`lora_jax.adapters.variant.Call`)."""

    module: nn.Module
    method: str
    args: tuple
    kwargs: dict


class LoRA(nn.Module):
    """Adds LoRA adapters to an unmodified Flax model.

    Attributes:
      model: any flax.linen Module; its parameter paths are kept as they are.
      config: which layers to adapt and how (a `lora_jax.LoraConfig`).

    Call it exactly like `model`, with the whole tree that `lora_jax.init` returns. To call
    another method of the model with adapters active, use
    ``lora_model.apply(params, *args, method=lambda m, *a: m.invoke("name", *a))``.
    """

    model: nn.Module
    config: LoraConfig

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(
                f"LoRA.model must be a flax.linen Module, got {type(self.model).__name__}."
            )
        if not isinstance(self.config, LoraConfig):
            hint = (
                " Build it with lora_jax.LoraConfig(**that_dict)."
                if isinstance(self.config, Mapping)
                else ""
            )
            raise TypeError(
                f"LoRA.config must be a lora_jax.LoraConfig, got {type(self.config).__name__}."
                + hint
            )
        super().__post_init__()

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.invoke("__call__", *args, **kwargs)

    def invoke(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls `model.<method>(*args, **kwargs)` with the adapters active."""
        trace = _Trace()
        with nn.intercept_methods(functools.partial(_intercept, self, trace)):
            out = getattr(self.model, method)(*args, **kwargs)
        if _planning(self):
            _check_trace(self.config, trace)
        return out


def _planning(wrapper: LoRA) -> bool:
    """Whether this call makes the plan (init: the "lora" collection is being written)."""
    return wrapper.is_mutable_collection(_paths.LORA)


def _intercept(
    wrapper: LoRA, trace: _Trace, next_fun: Callable, args: tuple, kwargs: dict, context: Any
) -> Any:
    module = context.module
    if trace.busy or module.scope is None or not _in_model(module, wrapper):
        return next_fun(*args, **kwargs)
    cfg, path, method = wrapper.config, _paths.module_path(module), context.method_name
    rule = rule_for(type(module))
    planning = _planning(wrapper)
    computes = rule is not None and method in rule.methods
    qt = None if planning else _quantized_param(cfg, module, rule, path, method)
    if qt is None:
        out = next_fun(*args, **kwargs)
    else:
        with _busy(trace):
            out = rule.quantized_forward(module, method, args, kwargs, qt, cfg.quantize.kernel)
    if planning and method != "setup":  # after the call: a compact layer makes its params in it
        _plan_extras(cfg, module, path, trace)
        if computes:
            _plan_quantized(cfg, rule, module, path, args, kwargs, trace)
    if not computes:
        return out
    trace.adaptable.add(path)
    record = _adapter_record(cfg, rule, module, path, args, kwargs, planning)
    if record is None:
        return out
    trace.targeted.add(path)
    with _busy(trace):
        return _adapter_output(cfg, rule, record, _Call(module, method, args, kwargs), out)


class _busy:
    """Marks the trace busy while a rule computes (its own module calls are not adapted)."""

    def __init__(self, trace: _Trace) -> None:
        self.trace = trace

    def __enter__(self) -> None:
        self.trace.busy = True

    def __exit__(self, *exc: object) -> None:
        self.trace.busy = False


def _in_model(module: nn.Module, wrapper: LoRA) -> bool:
    """Whether a bound module belongs to the wrapped model (lifted scopes included: the body
    of `nn.scan` / `nn.remat` runs in a fresh root scope whose path points into the tree)."""
    root = module.scope.root
    return root is wrapper.scope.root or root.debug_path != root.path


def _param_path(path: str, param: str) -> str:
    return _paths.join(path, param)  # the model may be the layer itself (path "")


# --------------------------------------------------------------------------- the adapter


def _linear(rule: Rule | None) -> bool:
    return isinstance(rule, LinearRule)


def _expected(
    cfg: LoraConfig, rule: Rule, module: nn.Module, geometry_shape: tuple, split: Split, path: str
) -> Adapter | None:
    """The record that the config calls for at `path` (None: not targeted)."""
    if not cfg.is_target(path, linear=_linear(rule)):
        return None
    why = variant_for(cfg.variant).refuses(rule, _quantizable(cfg, rule, path))
    if why is not None:
        raise ValueError(
            f"LoraConfig(variant={cfg.variant!r}) targets '{path}' ({type(module).__name__}), "
            f"which it cannot adapt: {why}. Leave '{path}' out of LoraConfig.targets (or "
            "add it to exclude), or use variant='lora'."
        )
    geometry = Geometry.of(geometry_shape, split, cfg.rank_for(path))
    return Adapter(geometry, cfg.scale_for(path), cfg.variant)


def _adapter_record(
    cfg: LoraConfig,
    rule: Rule,
    module: nn.Module,
    path: str,
    args: tuple,
    kwargs: dict,
    planning: bool,
) -> Adapter | None:
    """The layer's adapter record: made from the config when planning, else read from the
    tree and checked against the config."""
    if not module.has_variable("params", rule.param):
        if not cfg.is_target(path, linear=_linear(rule)):
            return None
        raise ValueError(f"Module '{path}' has no parameter '{rule.param}' for its LoRA rule.")
    shape = tuple(jnp.shape(_trees.unbox(module.get_variable("params", rule.param))))
    split = rule.split(module, shape, args, kwargs)
    name = _paths.record_leaf(rule.param)
    found = (
        module.get_variable(_paths.LORA, name) if module.has_variable(_paths.LORA, name) else None
    )
    if planning and found is None:
        expected = _expected(cfg, rule, module, shape, split, path)
        if expected is not None:
            _check_floating(module, rule, path)
            module.scope.variable(_paths.LORA, name, lambda: expected)
        return expected
    _check_record(cfg, path, rule.param, found, _expected(cfg, rule, module, shape, split, path))
    return found


def _check_floating(module: nn.Module, rule: Rule, path: str) -> None:
    value = _trees.unbox(module.get_variable("params", rule.param))
    dtype = jnp.result_type(value)
    if not (isinstance(value, QuantizedTensor) or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(
            f"LoraConfig.targets selects '{path}', whose '{rule.param}' is {dtype}: LoRA adapts "
            "floating-point parameters only (a merge would truncate W + ΔW back to integers). "
            "Exclude the module (LoraConfig.exclude) or cast its parameter to a float dtype."
        )


def _check_record(
    cfg: LoraConfig, path: str, param: str, found: Adapter | None, expected: Adapter | None
) -> None:
    """Raises unless the tree's record and the config agree on this layer."""
    where = f"'{_paths.join(path, param)}'"
    if found is None and expected is None:
        return
    if found is None:
        raise ValueError(
            f"LoraConfig targets {where} but the tree holds no adapter record for it "
            f"('{_paths.LORA}/{_paths.join(path, _paths.record_leaf(param))}'): pass the whole "
            "tree that lora_jax.init (or load_adapter) returned, with its 'params' and 'lora' "
            "collections, and the config it was made with."
        )
    if not isinstance(found, Adapter):
        raise ValueError(f"{where}: the tree's adapter record is a {type(found).__name__}.")
    if expected is None:
        raise ValueError(
            f"The tree holds an adapter for {where}, but LoraConfig.targets={cfg.targets!r} "
            f"(exclude={cfg.exclude!r}) does not select it, so it would be silently dropped. "
            "Use the config the tree was made with (load_adapter returns it), or drop the "
            "adapter from the tree."
        )
    diffs = [
        f"{what} {a!r} in the tree but {b!r} from the config"
        for what, a, b in (
            ("rank", found.rank, expected.rank),
            ("scale", found.scale, expected.scale),
            ("variant", found.variant, expected.variant),
            ("split", found.geometry.split, expected.geometry.split),
            ("parameter shape", found.geometry.shape, expected.geometry.shape),
        )
        if a != b
    ]
    if diffs:
        raise ValueError(
            f"The adapter of {where} does not match the LoraConfig: {'; '.join(diffs)}. Use "
            "the config the tree was made with (load_adapter returns it)."
        )


def _adapter_output(cfg: LoraConfig, rule: Rule, record: Adapter, call: _Call, out: Array) -> Array:
    """The method's output with the adapter (the variant's `output`, from `out` without it)."""
    module = call.module
    variant = variant_for(record.variant)
    kernel = module.get_variable("params", rule.param)
    leaves = {
        leaf: _leaf(cfg, rule, record, module, leaf, kernel)
        for leaf in variant.leaves(record.geometry)
    }
    x = call.args[0] if call.args else None
    dtype = x.dtype if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else out.dtype
    dropout = _dropout(cfg, module)
    return variant.output(
        rule, call, leaves, record.scale, dropout, dtype, out, _trees.unbox(kernel)
    )


def _leaf(
    cfg: LoraConfig, rule: Rule, record: Adapter, module: nn.Module, leaf: str, kernel: Any
) -> Array:
    """Reads an adapter leaf, checking its shape, or creates it (at init).

    Scope-level calls work in setup-style modules too, outside setup; a layer called twice
    (shared weights) reads what its first call created.
    """
    geometry, name = record.geometry, _paths.adapter_leaf(rule.param, leaf)
    variant = variant_for(record.variant)
    shape = variant.leaves(geometry)[leaf]
    path = _paths.module_path(module)
    if module.has_variable("params", name):
        found = tuple(jnp.shape(_trees.unbox(module.get_variable("params", name))))
        if found != tuple(shape):
            problems = geometry.problems(
                _paths.join(path, rule.param), geometry.shape, {leaf: found}
            )
            raise ValueError(
                f"Leaf 'params/{_paths.join(path, name)}' does not fit its adapter: "
                + " ".join(problems or [f"shape {found}, expected {shape}."])
                + " The adapters and the 'lora' collection come from different runs or configs."
            )
        return _trees.unbox(module.get_variable("params", name))
    if not module.is_mutable_collection("params"):
        raise ValueError(
            f"Leaf 'params/{_paths.join(path, name)}' is missing: pass the whole tree that "
            "lora_jax.init returned (both its 'params' and 'lora' collections) to the LoRA model."
        )
    axes = _trees.box_names(kernel)

    def init(key: Array) -> Any:
        value = variant.init(
            leaf, key, geometry, rule, cfg.init, cfg.param_dtype, _trees.unbox(kernel)
        )
        if axes is None:
            return value
        return kernel.replace(value=value, names=variant.axes(geometry, axes)[leaf])

    return _trees.unbox(module.scope.param(name, init))


def _dropout(cfg: LoraConfig, module: nn.Module) -> Callable[[Array], Array]:
    if cfg.dropout == 0.0 or not module.scope.has_rng("dropout"):
        return lambda x: x
    key = module.make_rng("dropout")

    def apply(x: Array) -> Array:
        keep = jax.random.bernoulli(key, 1.0 - cfg.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - cfg.dropout), jnp.zeros_like(x))

    return apply


# --------------------------------------------------------------------------- extras


def _plan_extras(cfg: LoraConfig, module: nn.Module, path: str, trace: _Trace) -> None:
    """Marks the module's parameters that `cfg.trainable` selects (at init only)."""
    if not cfg.trainable:
        return
    for name, value in module.variables.get("params", {}).items():
        param_path = _param_path(path, name)
        if isinstance(value, Mapping) or _paths.parse(name) is not None:
            continue
        if not cfg.is_trainable_extra(param_path):
            continue
        dtype = jnp.result_type(_trees.unbox(value))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"LoraConfig.trainable selects '{param_path}', a {dtype} parameter: only "
                "floating-point parameters can be trained. Narrow the pattern."
            )
        trace.extras.add(param_path)
        marker = _paths.extra_leaf(name)
        if not module.has_variable(_paths.LORA, marker):
            module.scope.variable(_paths.LORA, marker, Trainable)


# --------------------------------------------------------------------------- 4-bit kernels


def _quantizable(cfg: LoraConfig, rule: Rule | None, path: str) -> bool:
    return (
        cfg.quantize is not None
        and rule is not None
        and rule.quantizable
        and cfg.quantize.is_target(
            path, adapted=cfg.is_target(path, linear=_linear(rule)), linear=_linear(rule)
        )
    )


def _plan_quantized(
    cfg: LoraConfig,
    rule: Rule,
    module: nn.Module,
    path: str,
    args: tuple,
    kwargs: dict,
    trace: _Trace,
) -> None:
    """At init: marks the kernels that `cfg.quantize` selects, with their axis split."""
    if not _quantizable(cfg, rule, path) or not module.has_variable("params", rule.param):
        return
    param = _param_path(path, rule.param)
    if cfg.is_trainable_extra(param):
        raise ValueError(
            f"LoraConfig.trainable selects '{param}', which QuantConfig quantizes: a 4-bit "
            "kernel cannot be trained in full. Exclude it from QuantConfig.targets "
            "(QuantConfig.exclude) or from LoraConfig.trainable."
        )
    shape = jnp.shape(_trees.unbox(module.get_variable("params", rule.param)))
    split = rule.split(module, shape, args, kwargs)
    trace.quantized.add(path)
    marker = _paths.quantized_leaf(rule.param)
    if not module.has_variable(_paths.LORA, marker):
        record = Quantized(split.n_batch, split.n_in, len(shape))
        module.scope.variable(_paths.LORA, marker, lambda: record)


def _quantized_param(
    cfg: LoraConfig, module: nn.Module, rule: Rule | None, path: str, method: str
) -> QuantizedTensor | None:
    """The module's 4-bit parameter if it has one (checked against the tree's markers and
    `cfg.quantize`), else None."""
    if method == "setup":
        return None  # declares parameters, computes nothing
    params = module.variables.get("params", {})
    found = [
        n
        for n, v in params.items()
        if not isinstance(v, Mapping) and isinstance(_trees.unbox(v), QuantizedTensor)
    ]
    computes = rule is not None and method in rule.methods
    if not found:
        marked = computes and module.has_variable(_paths.LORA, _paths.quantized_leaf(rule.param))
        if computes and rule.param in params and (marked or _quantizable(cfg, rule, path)):
            raise ValueError(
                f"'{_param_path(path, rule.param)}' is a dense array but "
                + ("the tree marks it 4-bit" if marked else "LoraConfig.quantize targets it")
                + ": build the params with lora_jax.init(..., base_params=...), which quantizes "
                "the targeted kernels, or narrow QuantConfig.targets."
            )
        return None
    name = found[0]
    if rule is None or not rule.quantizable or name != rule.param or len(found) > 1:
        reason = (
            f"{type(module).__name__} has no LoRA rule"
            if rule is None
            else f"its rule ({type(rule).__name__}) computes with "
            + (f"a quantized '{rule.param}' only" if rule.quantizable else "dense parameters only")
        )
        raise ValueError(
            f"'{_param_path(path, name)}' is quantized, but {reason}: only linear layers' "
            "kernels can be 4-bit. Leave it out of QuantConfig.targets."
        )
    if method not in rule.methods:
        raise ValueError(
            f"'{path}' has a quantized '{name}' and its method '{method}' would read it: only "
            f"{rule.methods} run through the dequantizing matmul. Leave '{path}' out of "
            "QuantConfig.targets."
        )
    qt = _trees.unbox(params[name])
    where = _param_path(path, name)
    if cfg.quantize is None:
        raise ValueError(
            f"'{where}' is quantized ({qt!r}) but LoraConfig.quantize is None: set "
            f"LoraConfig(quantize=QuantConfig(fmt={qt.fmt!r}, block_size={qt.block_size}, "
            f"double_quant={qt.double_quant})), or dequantize the tree (lora_jax.dequantize)."
        )
    check_quantized(where, qt, cfg.quantize)
    if not _quantizable(cfg, rule, path):
        raise ValueError(
            f"'{where}' is quantized but QuantConfig.targets={cfg.quantize.targets!r} "
            f"(exclude={cfg.quantize.exclude!r}) does not select it: use the config the tree "
            "was made with (load_adapter returns it)."
        )
    return qt


def check_quantized(path: str, qt: QuantizedTensor, qcfg: QuantConfig) -> None:
    """Raises unless `qt` was quantized as `qcfg` says (format, blocks, dtype)."""
    found = qt.quant_config()
    names = ("fmt", "block_size", "double_quant", "compute_dtype")
    diff = ", ".join(
        f"{n}={getattr(found, n)!r} (QuantConfig says {getattr(qcfg, n)!r})"
        for n in names
        if getattr(found, n) != getattr(qcfg, n)
    )
    if diff:
        raise ValueError(f"'{path}' was quantized with {diff}: make the QuantConfig match.")


# --------------------------------------------------------------------------- target checks


def _check_trace(cfg: LoraConfig, trace: _Trace) -> None:
    """At init: raises when the config's targets, patterns or extras match nothing."""
    listed = sorted(trace.adaptable)
    if not trace.targeted:
        raise ValueError(
            f"LoraConfig.targets={cfg.targets!r} (exclude={cfg.exclude!r}) matches no module. "
            "Adaptable module paths: "
            f"{listed if listed else 'none: the model has no layer with a LoRA rule'}."
        )
    cfg.check_patterns(sorted(trace.targeted))
    if cfg.quantize is not None and not trace.quantized:
        raise ValueError(
            f"QuantConfig.targets={cfg.quantize.targets!r} (exclude={cfg.quantize.exclude!r}) "
            f"matches no linear layer. Adaptable module paths: {listed}."
        )
    for pattern in cfg.trainable:
        if not any(matches_pattern(pattern, p) for p in trace.extras):
            raise ValueError(
                f"LoraConfig.trainable pattern {pattern!r} matches no parameter path "
                "(paths look like 'lm_head/kernel' or 'layers_0/input_layernorm/scale')."
            )
