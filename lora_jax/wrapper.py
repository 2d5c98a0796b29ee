"""The LoRA wrapper module and initialization from pretrained parameters.

`LoRA(model, config)` runs the unmodified `model` under `nn.intercept_methods`: each call to
a targeted layer's method gets the adapter's delta added to its output. `nn.share_scope`
keeps the model's own parameter paths, and the adapter leaves sit beside the parameter they
adapt (`kernel_lora_a`, `kernel_lora_b`). A second collection, "lora", holds what the tree
functions need to know without the module: each adapter's scale (`kernel_lora_scale`) and a
marker (`<param>_trainable`) for each base parameter that `config.trainable` selects.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from lora_jax import quant
from lora_jax.config import (
    A_SUFFIX,
    B_SUFFIX,
    LORA,
    SCALE_SUFFIX,
    TRAINABLE_SUFFIX,
    LoraConfig,
    QuantConfig,
    matches_pattern,
)
from lora_jax.layers import Rule, module_path, rule_for

_MAX_LISTED = 10
# Set by `init` while it traces the model: parameter path -> (batch axes, contraction axes,
# number of axes the layer sees) of every kernel that `LoraConfig.quantize` selects.
_QUANTIZED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("quantized", default=None)


@dataclasses.dataclass
class _Trace:
    """What one run of the wrapped model saw (used to validate targets at init)."""

    adaptable: set[str] = dataclasses.field(default_factory=set)
    targeted: set[str] = dataclasses.field(default_factory=set)
    extras: set[str] = dataclasses.field(default_factory=set)
    quantized: set[str] = dataclasses.field(default_factory=set)
    busy: bool = False  # computing a delta: do not intercept the rule's own module calls


class LoRA(nn.Module):
    """Adds LoRA adapters to an unmodified Flax model.

    Attributes:
      model: any flax.linen Module; its parameter paths are kept as they are.
      config: which layers to adapt and how.

    Call it exactly like `model`. To call another method of the model with adapters active,
    use `lora_model.apply(params, *args, method=lambda m, *a: m.invoke("name", *a))`.
    """

    model: nn.Module
    config: LoraConfig

    def setup(self):
        if not isinstance(self.config, LoraConfig):
            raise TypeError(f"LoRA.config must be a lora_jax.LoraConfig, got {self.config!r}.")
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        return self.invoke("__call__", *args, **kwargs)

    def invoke(self, method: str, *args, **kwargs):
        """Calls `model.<method>(*args, **kwargs)` with the adapters active."""
        trace = _Trace()
        with nn.intercept_methods(lambda *a: _intercept(self, trace, *a)):
            out = getattr(self.model, method)(*args, **kwargs)
        if self.is_mutable_collection("params"):
            _check_trace(self.config, trace)
        return out


def _intercept(wrapper: LoRA, trace: _Trace, next_fun, args, kwargs, context):
    module = context.module
    if trace.busy or module.scope is None or not _in_model(module, wrapper):
        return next_fun(*args, **kwargs)
    path = module_path(module)
    rule = rule_for(type(module))
    method = context.method_name
    creating = wrapper.is_mutable_collection("params")
    qt = _quantized_param(wrapper.config, module, rule, path, method, creating)
    if qt is None:
        out = next_fun(*args, **kwargs)
    else:
        trace.busy = True
        try:
            kernel = wrapper.config.quantize.kernel
            out = rule.quantized_forward(module, method, args, kwargs, qt, kernel)
        finally:
            trace.busy = False
    if creating:
        _mark_extras(wrapper.config, module, path, trace)
    if rule is None or method not in rule.methods:
        return out
    trace.adaptable.add(path)
    if creating:
        _record_quantized(wrapper.config, rule, module, path, args, kwargs, trace)
    if not wrapper.config.is_target(path):
        return out
    trace.targeted.add(path)
    trace.busy = True
    try:
        return _add_delta(wrapper.config, rule, module, path, method, args, kwargs, out)
    finally:
        trace.busy = False


def _in_model(module, wrapper: LoRA) -> bool:
    """Whether a bound module belongs to the wrapped model (lifted scopes included: the body
    of `nn.scan` / `nn.remat` runs in a fresh root scope whose path points into the tree)."""
    root = module.scope.root
    return root is wrapper.scope.root or root.debug_path != root.path


def _quantized_param(cfg: LoraConfig, module, rule: Rule | None, path, method, creating):
    """The module's 4-bit parameter if it has one (checked against `cfg.quantize`), else None."""
    if method == "setup":
        return None  # declares parameters, computes nothing
    params = module.variables.get("params", {})
    found = [
        n
        for n, v in params.items()
        if not isinstance(v, Mapping) and quant.is_quantized(quant.unboxed(v))
    ]
    qcfg = cfg.quantize
    computes = rule is not None and method in rule.methods
    if not found:
        dense = computes and not creating and rule.param in params
        if dense and qcfg is not None and _quantizable(cfg, rule, path):
            raise ValueError(
                f"'{path}/{rule.param}' is a dense array but LoraConfig.quantize targets it: "
                "build the params with lora_jax.init(..., base_params=...), which quantizes "
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
            f"'{path}/{name}' is quantized, but {reason}: only linear layers' kernels can be "
            "4-bit. Leave it out of QuantConfig.targets."
        )
    if method not in rule.methods:
        raise ValueError(
            f"'{path}' has a quantized '{name}' and its method '{method}' would read it: only "
            f"{rule.methods} run through the dequantizing matmul. Leave '{path}' out of "
            "QuantConfig.targets."
        )
    qt = quant.unboxed(params[name])
    if qcfg is None:
        raise ValueError(
            f"'{path}/{name}' is quantized ({qt!r}) but LoraConfig.quantize is None: set "
            f"LoraConfig(quantize=QuantConfig(fmt={qt.fmt!r}, block_size={qt.block_size}, "
            f"double_quant={qt.double_quant})), or dequantize the tree (lora_jax.dequantize)."
        )
    _check_quantized(f"{path}/{name}", qt, qcfg)
    return qt


def _quantizable(cfg: LoraConfig, rule: Rule | None, path: str) -> bool:
    return (
        rule is not None
        and rule.quantizable
        and cfg.quantize.is_target(path, adapted=cfg.is_target(path))
    )


def _check_quantized(path: str, qt: quant.QuantizedTensor, qcfg: QuantConfig) -> None:
    found = qt.quant_config()
    names = ("fmt", "block_size", "double_quant", "compute_dtype")
    diff = ", ".join(
        f"{n}={getattr(found, n)!r} (QuantConfig says {getattr(qcfg, n)!r})"
        for n in names
        if getattr(found, n) != getattr(qcfg, n)
    )
    if diff:
        raise ValueError(f"'{path}' was quantized with {diff}: make the QuantConfig match.")


def _record_quantized(cfg: LoraConfig, rule: Rule, module, path, args, kwargs, trace) -> None:
    """At init: notes which kernels `cfg.quantize` selects and how their axes split."""
    if cfg.quantize is None or not _quantizable(cfg, rule, path):
        return
    param = f"{path}/{rule.param}" if path else rule.param  # the model may be the layer
    if cfg.is_trainable_extra(param):
        raise ValueError(
            f"LoraConfig.trainable selects '{param}', which QuantConfig quantizes: a 4-bit "
            "kernel cannot be trained in full. Exclude it from QuantConfig.targets "
            "(QuantConfig.exclude) or from LoraConfig.trainable."
        )
    shape = jnp.shape(quant.unboxed(module.get_variable("params", rule.param)))
    split = rule.split(module, shape, args, kwargs)
    trace.quantized.add(path)
    recorder = _QUANTIZED.get()
    if recorder is not None:
        recorder[f"params/{param}"] = (split.n_batch, split.n_in, len(shape))


def _add_delta(cfg: LoraConfig, rule: Rule, module, path, method, args, kwargs, out):
    if not module.has_variable("params", rule.param):
        raise ValueError(f"Module '{path}' has no parameter '{rule.param}' for its LoRA rule.")
    kernel = module.get_variable("params", rule.param)
    shape = jnp.shape(quant.unboxed(kernel))
    split = rule.split(module, shape, args, kwargs)
    rank = cfg.rank_for(path)
    a_shape, b_shape = split.adapter_shapes(shape, rank)
    # A kernel boxed with sharding names (nn.Partitioned / nn.LogicallyPartitioned) boxes its
    # adapters alike: A (batch..., in..., rank) keeps the kernel's batch and input names, B
    # (batch..., rank, out...) its batch and output names; the rank axis is replicated (None).
    names = kernel.names if isinstance(kernel, meta.Partitioned) else None
    if names is not None:
        names = tuple(names) + (None,) * (len(shape) - len(names))
        cut = split.n_batch + split.n_in
        names = {"a": names[:cut] + (None,), "b": names[: split.n_batch] + (None,) + names[cut:]}

    def init(which):
        fn = lambda key, s, d: rule.init(which, cfg.init, key, s, d, split.fan_in(shape))
        return fn if names is None else lambda *a: kernel.replace(value=fn(*a), names=names[which])

    a = _leaf(
        module,
        "params",
        f"{rule.param}_lora_a",
        a_shape,
        path,
        rank,
        lambda n: module.scope.param(n, init("a"), a_shape, cfg.param_dtype),
    )
    b = _leaf(
        module,
        "params",
        f"{rule.param}_lora_b",
        b_shape,
        path,
        rank,
        lambda n: module.scope.param(n, init("b"), b_shape, cfg.param_dtype),
    )
    scale = _leaf(
        module,
        LORA,
        rule.param + SCALE_SUFFIX,
        (),
        path,
        rank,
        lambda n: module.scope.variable(LORA, n, jnp.float32, cfg.scale_for(path)).value,
    )

    x = args[0] if args else None
    dtype = x.dtype if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else out.dtype
    # The delta is linear in B: scaling B (rank x out) costs far less than scaling the
    # (tokens x out) delta (measured: 9% fewer bytes accessed per all-linear train step).
    b = (b.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    delta = rule.delta(module, method, args, kwargs, a.astype(dtype), b, _dropout(cfg, module))
    return out + delta.astype(out.dtype)


def _leaf(module, collection: str, name: str, shape, path: str, rank: int, create):
    """Reads an adapter leaf, checking its shape, or creates it (init, or a mutable apply).

    Scope-level calls work in setup-style modules too, outside setup; a layer called twice
    (shared weights) reads what its first call created.
    """
    _check_existing(module, collection, name, shape, path, rank)
    if module.has_variable(collection, name):
        return meta.unbox(module.get_variable(collection, name))
    return create(name)


def _check_existing(module, collection, name, shape, path, rank):
    if module.is_mutable_collection(collection) and not module.has_variable(collection, name):
        return  # created now
    if not module.has_variable(collection, name):
        raise ValueError(
            f"'{collection}/{path}/{name}' is missing: pass the whole tree that lora_jax.init "
            "returned (both its 'params' and 'lora' collections) to the LoRA model."
        )
    found = jnp.shape(meta.unbox(module.get_variable(collection, name)))
    if found != tuple(shape):
        raise ValueError(
            f"Leaf '{collection}/{path}/{name}' has shape {found} but the LoRA config expects "
            f"{tuple(shape)} (rank {rank}): the params were built with another rank or model."
        )


def _dropout(cfg: LoraConfig, module):
    if cfg.dropout == 0.0 or not module.scope.has_rng("dropout"):
        return lambda x: x
    key = module.make_rng("dropout")

    def apply(x):
        keep = jax.random.bernoulli(key, 1.0 - cfg.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - cfg.dropout), jnp.zeros_like(x))

    return apply


def _mark_extras(cfg: LoraConfig, module, path: str, trace: _Trace) -> None:
    """Marks the module's parameters that `cfg.trainable` selects (at init only)."""
    if not cfg.trainable:
        return
    for name in module.variables.get("params", {}):
        param_path = f"{path}/{name}" if path else name
        if name.endswith((A_SUFFIX, B_SUFFIX)) or not cfg.is_trainable_extra(param_path):
            continue
        value = quant.unboxed(module.get_variable("params", name))
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ValueError(
                f"LoraConfig.trainable selects '{param_path}', a {jnp.result_type(value)} "
                "parameter: only floating-point parameters can be trained. Narrow the pattern."
            )
        trace.extras.add(param_path)
        if not module.has_variable(LORA, name + TRAINABLE_SUFFIX):
            module.scope.variable(LORA, name + TRAINABLE_SUFFIX, lambda: jnp.bool_(True))


def _check_trace(cfg: LoraConfig, trace: _Trace) -> None:
    if not trace.targeted:
        listed = sorted(trace.adaptable)
        raise ValueError(
            f"LoraConfig.targets={cfg.targets!r} (exclude={cfg.exclude!r}) matches no module. "
            f"Adaptable module paths: {listed if listed else 'none: the model has no layer with a LoRA rule'}."
        )
    cfg.check_patterns(sorted(trace.targeted))
    if cfg.quantize is not None and not trace.quantized:
        raise ValueError(
            f"QuantConfig.targets={cfg.quantize.targets!r} (exclude={cfg.quantize.exclude!r}) "
            f"matches no linear layer. Adaptable module paths: {sorted(trace.adaptable)}."
        )
    for pattern in cfg.trainable:
        if not any(matches_pattern(pattern, p) for p in trace.extras):
            raise ValueError(
                f"LoraConfig.trainable pattern {pattern!r} matches no parameter path "
                "(paths look like 'lm_head/kernel' or 'layers_0/input_layernorm/scale')."
            )


# --------------------------------------------------------------------------- init


def init(lora_model: LoRA, rng, *args, base_params: Mapping | None = None, **kwargs):
    """Initializes a LoRA model, from pretrained parameters when `base_params` is given.

    With `base_params`, the model is traced for shapes only (no random base weights are ever
    made), the tree is checked against the model, and only the adapter leaves and the "lora"
    collection are computed; base leaves are returned as the very same arrays (NumPy leaves
    are put on the device, and `LoraConfig.quantize` kernels quantized one at a time), except the
    `config.trainable` extras, which are copied so that a donating train step can never
    delete the caller's pretrained arrays.

    Args:
      lora_model: a `LoRA` module.
      rng: a PRNG key, or a dict of keys by rng name ("params" is required).
      *args: sample inputs, as for `model.init`.
      base_params: pretrained variables `{"params": ...}` (other collections allowed), or the
        bare params dict.
      **kwargs: sample keyword inputs.

    Returns:
      The variables dict: "params" (base + adapter leaves) and "lora" (scales, markers).
    """
    if not isinstance(lora_model, LoRA):
        raise TypeError(f"init needs a lora_jax.LoRA module, got {type(lora_model).__name__}.")
    rngs = dict(rng) if isinstance(rng, Mapping) else {"params": rng}
    qcfg = lora_model.config.quantize
    if base_params is None:
        with _recording() as targets:
            variables = lora_model.init(rngs, *args, **kwargs)
        return _quantize_base(variables, targets, qcfg)
    with _recording() as targets:
        abstract = jax.eval_shape(lambda r, *a: lora_model.init(r, *a, **kwargs), rngs, *args)
    base = _as_variables(base_params, abstract)
    _check_fits(base, abstract)
    base = _quantize_base(base, targets, qcfg)

    @jax.jit
    def new_leaves(base, rngs, *args):
        _, variables = lora_model.apply(base, *args, rngs=rngs, mutable=True, **kwargs)
        flat = traverse_util.flatten_dict(variables, sep="/")
        return {k: v for k, v in flat.items() if _is_new(k)}

    flat = traverse_util.flatten_dict(base, sep="/")
    flat.update(new_leaves(base, rngs, *args))
    # Host (NumPy) leaves go to the device once here, not on every step.
    flat = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in flat.items()}
    extras = [k for k in flat if k.startswith(LORA + "/") and k.endswith(TRAINABLE_SUFFIX)]
    for marker in extras:
        param = "params/" + marker[len(LORA) + 1 : -len(TRAINABLE_SUFFIX)]
        flat[param] = jax.tree.map(jnp.copy, flat[param])
    return traverse_util.unflatten_dict(flat, sep="/")


@contextlib.contextmanager
def _recording():
    targets: dict = {}
    token = _QUANTIZED.set(targets)
    try:
        yield targets
    finally:
        _QUANTIZED.reset(token)


def _quantize_base(variables: Mapping, targets: Mapping, qcfg: QuantConfig | None) -> dict:
    """Quantizes the kernels that `qcfg` selects, one at a time; checks quantized leaves."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    quantized = sorted(k for k, v in flat.items() if quant.is_quantized(quant.unboxed(v)))
    if qcfg is None:
        if quantized:
            raise ValueError(
                f"base_params hold quantized kernels ({_listed(quantized)}) but "
                "LoraConfig.quantize is None: set it to a QuantConfig that matches them, or "
                "dequantize them first (lora_jax.dequantize)."
            )
        return dict(variables)
    stray = [k for k in quantized if k not in targets]
    if stray:
        raise ValueError(
            f"base_params hold quantized kernels that QuantConfig.targets does not select: "
            f"{_listed(stray)}. Selected: {_listed(sorted(targets))}."
        )
    for path, (n_batch, n_in, ndim) in targets.items():
        value = quant.unboxed(flat[path])
        # Axes the layer never saw are stacked-layer axes (nn.scan): leading, one matrix each.
        n_lead = n_batch + len(value.shape) - ndim
        if quant.is_quantized(value):
            _check_quantized(path, value, qcfg)
            if (len(value.lead_shape), len(value.in_shape)) != (n_lead, n_in):
                raise ValueError(
                    f"'{path}' was quantized with {len(value.lead_shape)} leading and "
                    f"{len(value.in_shape)} contraction axes, but its layer has {n_lead} batch "
                    f"and {n_in} contraction axes: quantize it from the dense kernel here "
                    "(pass the dense base_params)."
                )
            continue
        qt = quant.quantize_array(value, qcfg, n_lead=n_lead, n_in=n_in, path=path)
        boxed = flat[path]  # a sharding box keeps its logical names on the 4-bit kernel
        flat[path] = boxed.replace_boxed(qt) if isinstance(boxed, meta.AxisMetadata) else qt
    return traverse_util.unflatten_dict(flat, sep="/")


def _listed(paths: list[str]) -> str:
    more = len(paths) - _MAX_LISTED
    return ", ".join(f"'{p}'" for p in paths[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _is_new(path: str) -> bool:
    return path.startswith(LORA + "/") or path.endswith((A_SUFFIX, B_SUFFIX))


def _as_variables(base_params: Mapping, abstract: Mapping) -> dict:
    if not isinstance(base_params, Mapping):
        raise TypeError(
            f"base_params must be a dict of parameters, got {type(base_params).__name__}."
        )
    collections = set(abstract) - {LORA}
    if base_params and set(base_params) <= collections:
        return dict(base_params)
    return {"params": base_params}


def _check_fits(base: Mapping, abstract: Mapping) -> None:
    """Raises listing every leaf of `base` that does not fit the model's own shapes."""
    expected = {
        k: v.shape
        for k, v in traverse_util.flatten_dict(meta.unbox(abstract), sep="/").items()
        if not _is_new(k)
    }
    found = {
        k: jnp.shape(v) for k, v in traverse_util.flatten_dict(meta.unbox(base), sep="/").items()
    }
    problems = [
        f"Leaf '{k}' is missing (the model expects shape {expected[k]})."
        for k in expected
        if k not in found
    ]
    problems += [f"Leaf '{k}' is not a parameter of the model." for k in found if k not in expected]
    problems += [
        f"Leaf '{k}' has shape {found[k]} but the model expects {expected[k]}."
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if problems:
        more = len(problems) - _MAX_LISTED
        listed = "\n  ".join(problems[:_MAX_LISTED]) + (
            f"\n  ... and {more} more." if more > 0 else ""
        )
        raise ValueError(
            f"base_params do not fit the model ({len(problems)} problems):\n  {listed}"
        )
