"""The LoRA wrapper for flax.linen models.

`LoRA(model, config)` runs the unmodified `model` under `nn.intercept_methods`: each call to
an adapted layer's method gets the adapter's output added to its own. `nn.share_scope` keeps
the model's own parameter paths, so the adapter leaves sit beside the parameter they adapt.

What is adapted, and how, is the plan recorded in the tree's "lora" collection (see
`lora_jax.adapters.plan`): at init (when the collection is being made) the interceptor writes
one record per adapted parameter from the config and the layer's rule; afterwards it reads the
records, and checks once per traced layer that the config still describes them.

Several named adapters can share one base (`LoRA(model, {"a": cfg_a, "b": cfg_b})`): init
makes them all; a call runs the `active` ones, each adding its output, or, with
``adapter_ids``, one adapter per example of the batch (multi-tenant serving: the active
adapters' factors are gathered per example and contracted in batched matmuls).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from lora_jax import _paths, _trees
from lora_jax.adapters import bank
from lora_jax.adapters.geometry import Geometry, Split
from lora_jax.adapters.records import Adapter, Quantized, Trainable
from lora_jax.adapters.variant import variant_for
from lora_jax.config import LoraConfig, QuantConfig, matches_pattern
from lora_jax.quant.formats import QuantizedTensor, dequantize
from lora_jax.rules import LinearRule, Rule, rule_for

Array = jax.Array


@dataclasses.dataclass
class _Trace:
    """What one run of the wrapped model saw (to validate the targets at init)."""

    adaptable: set[str] = dataclasses.field(default_factory=set)
    targeted: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # by adapter name
    extras: set[str] = dataclasses.field(default_factory=set)
    quantized: set[str] = dataclasses.field(default_factory=set)
    busy: bool = False  # inside a rule's own computation: do not intercept its module calls
    ids: Array | None = None  # per-example adapter ids (index into LoRA.active; -1: none)
    fused: dict = dataclasses.field(default_factory=dict)  # sibling products by parent/group


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
      config: which layers to adapt and how (a `lora_jax.LoraConfig`), or several named
        adapters on the one base, ``{"french": cfg_fr, "code": cfg_code}`` (names of letters,
        digits, '_' and '-'; a single config is the adapter "default"). Named adapters
        share the base, so their `quantize` must agree.
      active: the adapters a call runs (a name or a tuple of names; None: every configured
        one, in the config's order). Several active adapters add their outputs, as their
        merge adds their ΔW. `lora_jax.init` makes every configured adapter regardless.

    Call it exactly like `model`, with the whole tree that `lora_jax.init` returns. To call
    another method of the model with adapters active, use
    ``lora_model.apply(params, *args, method=lambda m, *a: m.invoke("name", *a))``.

    Per-example adapters: ``lora_model.apply(params, x, adapter_ids=ids)`` with integer ids
    of shape (batch,) runs example i through adapter ``active[ids[i]]`` only (-1: through
    none, the base model). Every active adapter must be plain LoRA ("lora" variant). Ids
    outside [-1, len(active)) are an error when the ids are concrete; under `jax.jit` they
    make that example's output NaN rather than silently wrong.
    """

    model: nn.Module
    config: Any
    active: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(
                f"LoRA.model must be a flax.linen Module, got {type(self.model).__name__}."
            )
        configs = _configs(self.config)
        object.__setattr__(
            self, "config", self.config if isinstance(self.config, LoraConfig) else configs
        )
        object.__setattr__(self, "active", _active(self.active, configs))
        super().__post_init__()

    @property
    def configs(self) -> dict[str, LoraConfig]:
        """The adapters' configs by name ({"default": config} for a single config)."""
        return _configs(self.config)

    @property
    def active_names(self) -> tuple[str, ...]:
        """The names of the adapters a call runs, in order (what `adapter_ids` index)."""
        return tuple(self.configs) if self.active is None else self.active

    @property
    def quantize(self) -> QuantConfig | None:
        """The base's `QuantConfig` (shared by every named adapter)."""
        return next(iter(self.configs.values())).quantize

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __call__(self, *args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        return self.invoke("__call__", *args, adapter_ids=adapter_ids, **kwargs)

    def invoke(self, method: str, *args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        """Calls `model.<method>(*args, **kwargs)` with the adapters active (per example
        with `adapter_ids`, as in `__call__`)."""
        trace = _Trace(ids=_ids(adapter_ids, self.active_names))
        with nn.intercept_methods(functools.partial(_intercept, self, trace)):
            out = getattr(self.model, method)(*args, **kwargs)
        if _planning(self):
            for name, cfg in self.configs.items():
                _check_trace(cfg, trace, name)
        return out


def _configs(config: Any) -> FrozenDict:
    """The named configs of `LoRA.config` (checked): a single config is "default"."""
    if isinstance(config, LoraConfig):
        return FrozenDict({_paths.DEFAULT: config})
    if not isinstance(config, Mapping):
        raise TypeError(
            f"LoRA.config must be a lora_jax.LoraConfig, got {type(config).__name__} (several "
            "named adapters: a mapping of names to LoraConfigs)."
        )
    if not any(isinstance(v, LoraConfig) for v in config.values()):
        raise TypeError(
            "LoRA.config must be a lora_jax.LoraConfig, got dict. Build it with "
            "lora_jax.LoraConfig(**that_dict); several named adapters are a mapping of names to "
            "LoraConfigs."
        )
    for name, cfg in config.items():
        _paths.check_name(name)
        if not isinstance(cfg, LoraConfig):
            hint = (
                " Build it with lora_jax.LoraConfig(**that_dict)."
                if isinstance(cfg, Mapping)
                else ""
            )
            raise TypeError(
                f"LoRA.config[{name!r}] must be a lora_jax.LoraConfig, got "
                f"{type(cfg).__name__}." + hint
            )
    quantize = {name: cfg.quantize for name, cfg in config.items()}
    if len(set(quantize.values())) > 1:
        raise ValueError(
            "Named adapters share one base, so their LoraConfig.quantize must agree; found "
            + ", ".join(f"{n!r}: {q!r}" for n, q in quantize.items())
            + "."
        )
    return FrozenDict(dict(config))


def _active(active: Any, configs: Mapping[str, LoraConfig]) -> tuple[str, ...] | None:
    if active is None:
        return None
    names = (active,) if isinstance(active, str) else tuple(active)
    unknown = [n for n in names if n not in configs]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"LoRA.active={active!r} must name distinct configured adapters "
            f"({sorted(configs)}): " + (f"unknown {unknown}." if unknown else "empty or repeated.")
        )
    return names


def _ids(adapter_ids: Any, active: tuple[str, ...]) -> Array | None:
    """`adapter_ids` as an int32 array of shape (batch,), checked where it is concrete."""
    if adapter_ids is None:
        return None
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"adapter_ids must be integers of shape (batch,), got {ids.dtype} of shape {ids.shape}."
        )
    if not isinstance(ids, jax.core.Tracer):
        bad = sorted({int(i) for i in ids.tolist() if not -1 <= i < len(active)})
        if bad:
            raise ValueError(
                f"adapter_ids {bad} are out of range: each id indexes LoRA.active "
                f"{list(active)} (0..{len(active) - 1}), or is -1 for no adapter."
            )
    return ids.astype(jnp.int32)


def _planning(wrapper: LoRA) -> bool:
    """Whether this call makes the plan (init: the "lora" collection is being written)."""
    return wrapper.is_mutable_collection(_paths.LORA)


def _intercept(
    wrapper: LoRA, trace: _Trace, next_fun: Callable, args: tuple, kwargs: dict, context: Any
) -> Any:
    module = context.module
    if trace.busy or module.scope is None or not _in_model(module, wrapper):
        return next_fun(*args, **kwargs)
    configs, path, method = wrapper.configs, _paths.module_path(module), context.method_name
    rule = rule_for(type(module))
    planning = _planning(wrapper)
    computes = rule is not None and method in rule.methods
    qt = None if planning else _quantized_param(wrapper, module, rule, path, method)
    if qt is None:
        out = next_fun(*args, **kwargs)
    else:
        with _busy(trace):
            out = rule.quantized_forward(module, method, args, kwargs, qt, wrapper.quantize.kernel)
    if planning and method != "setup":  # after the call: a compact layer makes its params in it
        for cfg in configs.values():
            _plan_extras(cfg, module, path, trace)
        if computes:
            _plan_quantized(wrapper, rule, module, path, args, kwargs, trace)
    if not computes:
        return out
    trace.adaptable.add(path)
    found = []
    for name in configs if planning else wrapper.active_names:
        cfg = configs[name]
        record = _adapter_record(wrapper, name, rule, module, path, args, kwargs, planning)
        if record is not None:
            trace.targeted.setdefault(name, set()).add(path)
            found.append((name, cfg, record))
    if not found:
        return out
    call = _Call(module, method, args, kwargs)
    with _busy(trace):
        if trace.ids is not None and not planning:
            return _per_example_output(wrapper, rule, found, call, out, trace.ids)
        if len(found) > 1 and not (planning or module.is_mutable_collection("params")):
            _check_additive(found, path, "several adapters are active on it")
        if len(found) == 1 and not planning:
            name, cfg, record = found[0]
            fused = _sibling_output(trace, cfg, name, rule, record, call, out)
            if fused is not None:
                return fused
        for name, cfg, record in found:
            out = _adapter_output(cfg, name, rule, record, call, out)
        return out


def _check_additive(found: list, path: str, why: str) -> None:
    """Raises unless every adapter in `found` adds to the output (plain LoRA)."""
    others = [f"{name!r} ({r.variant})" for name, _, r in found if r.variant != "lora"]
    if others:
        raise ValueError(
            f"'{path}': {why}, and adapters {', '.join(others)} are not plain LoRA: a "
            "variant that rescales the output (DoRA) runs only as the one adapter of its layer. "
            "Choose it alone with LoRA(..., active=name)."
        )


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
    wrapper: LoRA,
    cfg: LoraConfig,
    rule: Rule,
    module: nn.Module,
    geometry_shape: tuple,
    split: Split,
    path: str,
) -> Adapter | None:
    """The record that the config calls for at `path` (None: not targeted)."""
    if not cfg.is_target(path, linear=_linear(rule)):
        return None
    why = variant_for(cfg.variant).refuses(rule, _quantizable(wrapper, rule, path))
    if why is not None:
        raise ValueError(
            f"LoraConfig(variant={cfg.variant!r}) targets '{path}' ({type(module).__name__}), "
            f"which it cannot adapt: {why}. Leave '{path}' out of LoraConfig.targets (or "
            "add it to exclude), or use variant='lora'."
        )
    geometry = Geometry.of(geometry_shape, split, cfg.rank_for(path))
    return Adapter(geometry, cfg.scale_for(path), cfg.variant)


def _adapter_record(
    wrapper: LoRA,
    name: str,
    rule: Rule,
    module: nn.Module,
    path: str,
    args: tuple,
    kwargs: dict,
    planning: bool,
) -> Adapter | None:
    """The layer's record of adapter `name`: made from its config when planning, else read
    from the tree and checked against the config."""
    cfg = wrapper.configs[name]
    if not module.has_variable("params", rule.param):
        if not cfg.is_target(path, linear=_linear(rule)):
            return None
        raise ValueError(f"Module '{path}' has no parameter '{rule.param}' for its LoRA rule.")
    shape = tuple(jnp.shape(_trees.unbox(module.get_variable("params", rule.param))))
    split = rule.split(module, shape, args, kwargs)
    leaf = _paths.record_leaf(rule.param, name)
    found = (
        module.get_variable(_paths.LORA, leaf) if module.has_variable(_paths.LORA, leaf) else None
    )
    expected = _expected(wrapper, cfg, rule, module, shape, split, path)
    if planning and found is None:
        if expected is not None:
            _check_floating(module, rule, path)
            module.scope.variable(_paths.LORA, leaf, lambda: expected)
        return expected
    _check_record(cfg, name, path, rule.param, found, expected, module)
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
    cfg: LoraConfig,
    name: str,
    path: str,
    param: str,
    found: Adapter | None,
    expected: Adapter | None,
    module: nn.Module,
) -> None:
    """Raises unless the tree's record and the config agree on this layer."""
    where = f"'{_paths.join(path, param)}'"
    if name != _paths.DEFAULT:
        where += f" (adapter {name!r})"
    if found is None and expected is None:
        return
    if found is None:
        held = sorted(
            parsed.name
            for leaf in module.variables.get(_paths.LORA, {})
            if (parsed := _paths.parse(leaf)) is not None and parsed.param == param
        )
        others = f"; it holds adapters {held} there" if held else ""
        raise ValueError(
            f"LoraConfig targets {where} but the tree holds no adapter record for it "
            f"('{_paths.LORA}/{_paths.join(path, _paths.record_leaf(param, name))}'{others}): "
            "pass the whole tree that lora_jax.init (or load_adapter) returned, with its "
            "'params' and 'lora' collections, and the config it was made with."
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


def _adapter_output(
    cfg: LoraConfig, name: str, rule: Rule, record: Adapter, call: _Call, out: Array
) -> Array:
    """The method's output with the adapter (the variant's `output`, from `out` without it)."""
    module = call.module
    variant = variant_for(record.variant)
    kernel = module.get_variable("params", rule.param)
    leaves = _leaves(cfg, name, rule, record, module, kernel)
    x = call.args[0] if call.args else None
    dtype = x.dtype if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else out.dtype
    dropout = _dropout(cfg, module)
    return variant.output(rule, call, leaves, record.scale, dropout, dtype, out, _dense(kernel))


def _sibling_output(
    trace: _Trace, cfg: LoraConfig, name: str, rule: Rule, record: Adapter, call: _Call, out: Array
) -> Array | None:
    """The output with the adapter, its first product shared with its siblings
    (`LoraConfig.siblings`): the first member of a group called with an input runs
    ``x @ [A_1 ... A_n]`` for every member present, and each member called with that same
    input takes its slice. None when the layer does not qualify (the caller computes alone).
    """
    module, method = call.module, call.method
    path = _paths.module_path(module)
    parent_path, own = _paths.split(path)
    group = cfg.sibling_group(own)
    if (
        group is None
        or not isinstance(rule, LinearRule)
        or record.variant != "lora"
        or len(record.geometry.shape) != 2
        or method != "__call__"
        or not call.args
        or module.is_mutable_collection("params")
        or (cfg.dropout > 0 and module.scope.has_rng("dropout"))
        or module.parent is None
    ):
        return None
    x = call.args[0]
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return None
    key = (parent_path, group, name)
    cached = trace.fused.get(key)
    # The shared product fits this layer only if it computes like the member that made it:
    # the same layer class, rule and einsum subscripts (a sibling contracting another axis of
    # x would otherwise read the wrong product).
    kind = (type(module), rule, rule.spec(module, x, call.kwargs))
    if cached is None or cached[0] is not x or own not in cached[2]:
        cached = _sibling_product(module, cfg, name, rule, record, call, group, x)
        if cached is None:
            return None
        cached = (*cached, kind)
        trace.fused[key] = cached
    elif cached[3] != kind:
        return None  # computes its own product
    _, (h, plan), offsets, _ = cached
    start, stop = offsets[own]
    kernel = module.get_variable("params", rule.param)
    leaves = _leaves(cfg, name, rule, record, module, kernel)  # checks this layer's leaves
    b = (leaves["b"].astype(jnp.float32) * record.scale).astype(x.dtype)
    return out + rule.up(plan, h[..., start:stop], b).astype(out.dtype)


def _sibling_product(
    module: nn.Module,
    cfg: LoraConfig,
    name: str,
    rule: LinearRule,
    record: Adapter,
    call: _Call,
    group: tuple[str, ...],
    x: Array,
) -> tuple | None:
    """(x, (h of every member, the up-plan), member -> rank slice) for the group's members
    present beside `module` with plain-LoRA adapters of `name` on the same input shape; None
    when this layer has no sibling to share with."""
    siblings = module.parent.variables
    params, records = siblings.get("params", {}), siblings.get(_paths.LORA, {})
    own = _paths.split(_paths.module_path(module))[1]
    leaf, rec = _paths.adapter_leaf(rule.param, "a", name), _paths.record_leaf(rule.param, name)
    own_a = _trees.unbox(module.get_variable("params", leaf))
    members, factors = [], []
    for member in group:
        sib = records.get(member, {}).get(rec) if isinstance(records.get(member), Mapping) else None
        a = params.get(member, {}).get(leaf) if isinstance(params.get(member), Mapping) else None
        a = own_a if member == own else _trees.unbox(a) if a is not None else None
        ok = member == own or (
            isinstance(sib, Adapter) and sib.variant == "lora" and len(sib.geometry.shape) == 2
        )
        if ok and a is not None and a.shape[:-1] == own_a.shape[:-1] and a.ndim == 2:
            members.append(member)
            factors.append(a.astype(x.dtype))
    if len(members) < 2:
        return None
    offsets, start = {}, 0
    for member, a in zip(members, factors, strict=True):
        offsets[member] = (start, start + a.shape[-1])
        start += a.shape[-1]
    h, plan = rule.down(module, call.args, call.kwargs, jnp.concatenate(factors, -1), lambda v: v)
    return x, (h, plan), offsets


def _dense(kernel: Any) -> Array:
    """The layer's kernel as a dense array (a 4-bit one dequantized to its compute dtype)."""
    value = _trees.unbox(kernel)
    return dequantize(value) if isinstance(value, QuantizedTensor) else value


def _leaves(
    cfg: LoraConfig, name: str, rule: Rule, record: Adapter, module: nn.Module, kernel: Any
) -> dict[str, Array]:
    """The leaves of adapter `name` on the module, by leaf name."""
    return {
        leaf: _leaf(cfg, name, rule, record, module, leaf, kernel)
        for leaf in variant_for(record.variant).leaves(record.geometry)
    }


def _per_example_output(
    wrapper: LoRA, rule: Rule, found: list, call: _Call, out: Array, ids: Array
) -> Array:
    """The output with example i through adapter ``active[ids[i]]`` (-1: none).

    The active adapters' factors are stacked (`lora_jax.adapters.bank`: B scaled, ranks
    zero-padded to the largest, exact) — or read from a "lora_bank" collection that
    `lora_jax.adapter_bank` made — gathered per example, and the rule's own contraction runs
    once per example under `jax.vmap`: batched matmuls, never a contraction over every
    adapter.
    """
    module, path = call.module, _paths.module_path(call.module)
    _check_additive(found, path, "adapter_ids choose an adapter per example")
    x = call.args[0]
    if not jnp.ndim(x) or jnp.shape(x)[0] != ids.shape[0]:
        raise ValueError(
            f"adapter_ids has shape {ids.shape} but '{path}' gets an input of shape "
            f"{jnp.shape(x)}: give one id per example (the input's leading batch axis)."
        )
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    dtype = x.dtype if floating else out.dtype
    stacked = _bank(wrapper, module, rule.param)
    if stacked is None:
        kernel = module.get_variable("params", rule.param)
        records = {name: (cfg, r) for name, cfg, r in found}
        entries = []
        for name in wrapper.active_names:
            if name in records:
                cfg, record = records[name]
                leaves = _leaves(cfg, name, rule, record, module, kernel)
                entries.append((leaves["a"], leaves["b"], record.scale))
            else:  # this adapter leaves the layer alone
                entries.append(None)
        stacked = bank.stack(found[0][2].geometry, entries, dtype)
    a, b = bank.select(*stacked, ids, dtype)
    dropout = _dropout(max((cfg for _, cfg, _ in found), key=lambda c: c.dropout), module)
    x = dropout(x.astype(dtype)) if floating else x
    rest = call.args[1:]
    no_dropout = lambda v: v

    def one(x_i: Array, a_i: Array, b_i: Array) -> Array:
        args = (x_i[None], *rest)
        return rule.delta(module, call.method, args, call.kwargs, a_i, b_i, no_dropout)[0]

    delta = jax.vmap(one)(x, a, b)
    return out + delta.astype(out.dtype)


def _bank(wrapper: LoRA, module: nn.Module, param: str) -> tuple[Array, Array] | None:
    """The module's precomputed bank (A, B) if the call was given one, checked against the
    active adapters; else None."""
    leaf = param + "_bank"
    if not module.has_variable(bank.BANK, leaf):
        return None
    record = module.get_variable(bank.BANK, leaf)
    if not isinstance(record, bank.Bank) or record.names != wrapper.active_names:
        found = getattr(record, "names", type(record).__name__)
        raise ValueError(
            f"The '{bank.BANK}' collection stacks adapters {found} at "
            f"'{_paths.join(_paths.module_path(module), param)}', but adapter_ids index "
            f"LoRA.active {wrapper.active_names}: make the bank with "
            "lora_jax.adapter_bank(params, names=lora_model.active_names)."
        )
    a = module.get_variable(bank.BANK, leaf + "_a")
    b = module.get_variable(bank.BANK, leaf + "_b")
    return a, b


def _leaf(
    cfg: LoraConfig,
    adapter: str,
    rule: Rule,
    record: Adapter,
    module: nn.Module,
    leaf: str,
    kernel: Any,
) -> Array:
    """Reads a leaf of adapter `adapter`, checking its shape, or creates it (at init).

    Scope-level calls work in setup-style modules too, outside setup; a layer called twice
    (shared weights) reads what its first call created.
    """
    geometry, name = record.geometry, _paths.adapter_leaf(rule.param, leaf, adapter)
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
        value = variant.init(leaf, key, geometry, rule, cfg.init, cfg.param_dtype, _dense(kernel))
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
    """Marks the module's parameters that `cfg.trainable` (or `cfg.bias`) selects (at init
    only)."""
    if not cfg.trainable and cfg.bias == "none":
        return
    rule = rule_for(type(module))
    adapted = rule is not None and cfg.is_target(path, linear=_linear(rule))
    for name, value in module.variables.get("params", {}).items():
        param_path = _param_path(path, name)
        if isinstance(value, Mapping) or _paths.parse(name) is not None:
            continue
        if not cfg.is_trainable_extra(param_path, adapted):
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


def _quantizable(wrapper: LoRA, rule: Rule | None, path: str) -> bool:
    qcfg = wrapper.quantize
    if qcfg is None or rule is None or not rule.quantizable:
        return False
    linear = _linear(rule)
    adapted = any(c.is_target(path, linear=linear) for c in wrapper.configs.values())
    return qcfg.is_target(path, adapted=adapted, linear=linear)


def _plan_quantized(
    wrapper: LoRA,
    rule: Rule,
    module: nn.Module,
    path: str,
    args: tuple,
    kwargs: dict,
    trace: _Trace,
) -> None:
    """At init: marks the kernels that `cfg.quantize` selects, with their axis split."""
    if not _quantizable(wrapper, rule, path) or not module.has_variable("params", rule.param):
        return
    param = _param_path(path, rule.param)
    if any(cfg.is_trainable_extra(param) for cfg in wrapper.configs.values()):
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
    wrapper: LoRA, module: nn.Module, rule: Rule | None, path: str, method: str
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
        if computes and rule.param in params and (marked or _quantizable(wrapper, rule, path)):
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
    qcfg = wrapper.quantize
    if qcfg is None:
        raise ValueError(
            f"'{where}' is quantized ({qt!r}) but LoraConfig.quantize is None: set "
            f"LoraConfig(quantize=QuantConfig(fmt={qt.fmt!r}, block_size={qt.block_size}, "
            f"double_quant={qt.double_quant})), or dequantize the tree (lora_jax.dequantize)."
        )
    check_quantized(where, qt, qcfg)
    if not _quantizable(wrapper, rule, path):
        raise ValueError(
            f"'{where}' is quantized but QuantConfig.targets={qcfg.targets!r} "
            f"(exclude={qcfg.exclude!r}) does not select it: use the config the tree "
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


def _check_trace(cfg: LoraConfig, trace: _Trace, name: str = _paths.DEFAULT) -> None:
    """At init: raises when the config's targets, patterns or extras match nothing."""
    listed = sorted(trace.adaptable)
    targeted = trace.targeted.get(name, set())
    which = "" if name == _paths.DEFAULT else f" of adapter {name!r}"
    if not targeted:
        raise ValueError(
            f"LoraConfig.targets{which}={cfg.targets!r} (exclude={cfg.exclude!r}) matches no module. "
            "Adaptable module paths: "
            f"{listed if listed else 'none: the model has no layer with a LoRA rule'}."
        )
    cfg.check_patterns(sorted(targeted))
    if cfg.quantize is not None and not trace.quantized:
        raise ValueError(
            f"QuantConfig.targets={cfg.quantize.targets!r} (exclude={cfg.quantize.exclude!r}) "
            f"matches no linear layer. Adaptable module paths: {listed}."
        )
    if cfg.bias != "none" and not any(p.endswith("/bias") for p in trace.extras):
        raise ValueError(
            f"LoraConfig(bias={cfg.bias!r}) finds no parameter named 'bias' in "
            + ("the adapted layers" if cfg.bias == "lora_only" else "the model")
            + ": use bias='none'."
        )
    for pattern in cfg.trainable:
        if not any(matches_pattern(pattern, p) for p in trace.extras):
            raise ValueError(
                f"LoraConfig.trainable pattern {pattern!r} matches no parameter path "
                "(paths look like 'lm_head/kernel' or 'layers_0/input_layernorm/scale')."
            )
