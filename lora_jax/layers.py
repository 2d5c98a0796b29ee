"""Per-layer-kind LoRA rules and their registry.

A rule says, for one Flax layer class, which parameter gets an adapter, which methods'
outputs receive the adapter's delta, how the parameter's axes split into (batch, input,
output) axes, and how to compute the delta from the method's inputs. Everything else —
creating the adapter parameters, scaling, dropout, dtype handling, merging — is shared.

Adapter shapes follow from the split of a parameter of shape (batch..., in..., out...):
A is (batch..., in..., rank) and B is (batch..., rank, out...), so multi-axis kernels keep
their axes (heads stay an axis and can be sharded like the kernel), and the merged delta is
``einsum(A, B)`` over the rank axis, in the parameter's own layout. One rule serves any
number of adapters on a layer, and a rule knows the output axes that a per-output-unit
magnitude (DoRA) would need.

Register a rule for your own layer class with `register_rule`.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Shape = tuple[int, ...]
EinsumSpec = tuple[str, str, str]  # (input, parameter, output) subscripts


@dataclasses.dataclass(frozen=True)
class Split:
    """How a parameter's axes divide: leading `n_batch` batch axes (one adapter per index),
    then `n_in` input (contracted) axes, then the output axes."""

    n_batch: int
    n_in: int

    def adapter_shapes(self, shape: Shape, rank: int) -> tuple[Shape, Shape]:
        """Shapes of A (batch..., in..., rank) and B (batch..., rank, out...)."""
        cut = self.n_batch + self.n_in
        batch = tuple(shape[: self.n_batch])
        return tuple(shape[:cut]) + (rank,), batch + (rank,) + tuple(shape[cut:])

    def fan_in(self, shape: Shape) -> int:
        return math.prod(shape[self.n_batch : self.n_batch + self.n_in])


class Rule:
    """How one layer class gets LoRA. Subclass it and `register_rule` it for a custom layer.

    Attributes:
      param: name of the adapted parameter ("kernel", "embedding", ...).
      methods: module methods whose output gets the adapter's delta.
    """

    param: str = "kernel"
    methods: tuple[str, ...] = ("__call__",)
    quantizable = False  # whether `quantized_forward` is implemented

    def split(self, module: nn.Module, shape: Shape, args: tuple, kwargs: dict) -> Split:
        """Splits the parameter's axes into (batch, input, output)."""
        raise NotImplementedError

    def delta(
        self,
        module: nn.Module,
        method: str,
        args: tuple,
        kwargs: dict,
        a: Array,
        b: Array,
        dropout: Callable[[Array], Array],
    ) -> Array:
        """The unscaled adapter output for one call, shaped like the method's output.

        `a` and `b` arrive already cast to the compute dtype; apply `dropout` to the
        floating input before it meets A.
        """
        raise NotImplementedError

    def quantized_forward(self, module, method, args, kwargs, qt, kernel: str) -> Array:
        """The method's output when the parameter is a 4-bit `QuantizedTensor` (QLoRA).

        Only linear rules compute through the dequantizing matmul; other kinds refuse.
        """
        raise ValueError(
            f"Module '{module_path(module)}' ({type(module).__name__}) has a quantized "
            f"'{self.param}', but 4-bit parameters are supported only for linear layers "
            "(Dense, DenseGeneral, Einsum and LinearRule layers). Leave it out of "
            "QuantConfig.targets."
        )

    def init(self, which: str, init: str, key: Array, shape: Shape, dtype: Any, fan_in: int):
        """Initial value of A (`which` == "a") or B; B starts at zero so ΔW starts at zero."""
        if which == "b":
            return jnp.zeros(shape, dtype)
        if init == "gaussian":
            rank = shape[-1]
            return jax.random.normal(key, shape, dtype) / rank
        bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on A
        return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class LinearRule(Rule):
    """Any layer computing ``einsum(spec, x, param)``: Dense, DenseGeneral, Einsum, custom.

    `spec(module, x, kwargs)` returns (input, parameter, output) einsum subscripts. Parameter
    axes must be ordered batch (also in input and output), contracted (input only), output
    (output only).
    """

    spec: Callable[[nn.Module, Array, dict], EinsumSpec]
    param: str = "kernel"
    methods: tuple[str, ...] = ("__call__",)
    quantizable = True

    def split(self, module, shape, args, kwargs):
        x_spec, p_spec, y_spec = self.spec(module, args[0], kwargs)
        kinds = [
            "b" if c in x_spec and c in y_spec else "i" if c in x_spec else "o" for c in p_spec
        ]
        if "".join(kinds) != "".join(sorted(kinds)):  # "b" < "i" < "o"
            raise ValueError(
                f"Module '{module_path(module)}' ({type(module).__name__}) contracts "
                f"'{x_spec},{p_spec}->{y_spec}': its parameter axes must be ordered batch, "
                f"contracted, output for LoRA, found {''.join(kinds)} (b/i/o). Register a "
                "custom rule for this layer with lora_jax.register_rule."
            )
        return Split(kinds.count("b"), kinds.count("i"))

    def delta(self, module, method, args, kwargs, a, b, dropout):
        x = args[0]
        x_spec, p_spec, y_spec = self.spec(module, x, kwargs)
        split = self.split(module, (0,) * len(p_spec), args, kwargs)
        cut = split.n_batch + split.n_in
        r = next(c for c in string.ascii_letters if c not in x_spec + p_spec + y_spec)
        a_spec = p_spec[:cut] + r
        b_spec = p_spec[: split.n_batch] + r + p_spec[cut:]
        h_spec = "".join(c for c in y_spec if c not in p_spec[cut:]) + r
        h = jnp.einsum(f"{x_spec},{a_spec}->{h_spec}", dropout(x.astype(a.dtype)), a)
        return jnp.einsum(f"{h_spec},{b_spec}->{y_spec}", h, b)

    def quantized_forward(self, module, method, args, kwargs, qt, kernel):
        """``einsum(x, dequantize(qt)) + bias`` through `lora_jax.quant.qmatmul`.

        The input is laid out as (batch..., rows, K) to meet the (K, N) matrices of `qt`
        (one per batch index, vmapped); the bias is added as the layer adds it: its axes are
        the output axes that the parameter has.
        """
        from lora_jax import quant  # quant is a leaf module; imported late to keep layers light

        x = args[0]
        x_spec, p_spec, y_spec = _expand(self.spec(module, x, kwargs), x.ndim)
        split = self.split(module, qt.shape, args, kwargs)
        path = module_path(module)
        if (split.n_batch, split.n_batch + split.n_in) != (
            len(qt.lead_shape),
            qt.ndim - len(qt.out_shape),
        ):
            raise ValueError(
                f"'{path}/{self.param}' was quantized with {len(qt.lead_shape)} leading and "
                f"{len(qt.in_shape)} contraction axes, but the layer has {split.n_batch} batch "
                f"and {split.n_in} contraction axes: quantize it through lora_jax.init(..., "
                "base_params=...), which reads each layer's axes, or pass `paths` to quantize."
            )
        cut = split.n_batch + split.n_in
        batch, ins, outs = p_spec[: split.n_batch], p_spec[split.n_batch : cut], p_spec[cut:]
        free = "".join(c for c in x_spec if c not in p_spec)
        bias = _bias(module, path)
        dtype = getattr(module, "dtype", None)
        dtype = dtype or jnp.result_type(x, qt.dtype, *([bias] if bias is not None else []))
        widths = tuple(x.shape[x_spec.index(c)] for c in ins)
        if widths != qt.in_shape:
            raise ValueError(
                f"'{path}': the input's contracted axes have sizes {widths} but the quantized "
                f"'{self.param}' contracts {qt.in_shape} (input shape {x.shape})."
            )
        xt = _transpose(x.astype(dtype), x_spec, batch + free + ins)
        lead, free_shape = xt.shape[: len(batch)], xt.shape[len(batch) : len(batch) + len(free)]
        xt = xt.reshape(lead + (math.prod(free_shape), qt.k))
        matmul = lambda x, q: quant.qmatmul(x, q, kernel)
        for _ in batch:
            matmul = jax.vmap(matmul)
        y = matmul(xt, qt).reshape(lead + free_shape + qt.out_shape)
        y = _transpose(y, batch + free + outs, y_spec)
        if bias is not None:
            shape = [d if c in p_spec else 1 for c, d in zip(y_spec, y.shape, strict=True)]
            y = y + bias.astype(dtype).reshape(shape)
        return y


def _expand(specs: EinsumSpec, x_ndim: int) -> EinsumSpec:
    """Replaces the ellipsis of (input, parameter, output) subscripts by unused letters."""
    x_spec = specs[0]
    if "..." not in x_spec:
        return specs
    unused = [c for c in string.ascii_letters if c not in "".join(specs)]
    fill = "".join(unused[: x_ndim - (len(x_spec) - 3)])
    return tuple(s.replace("...", fill) for s in specs)


def _transpose(x: Array, spec: str, to: str) -> Array:
    return jnp.transpose(x, [spec.index(c) for c in to])


def _bias(module: nn.Module, path: str) -> Array | None:
    """The bias the layer adds, for the quantized forward (which computes the whole output)."""
    if not module.has_variable("params", "bias"):
        return None
    if not hasattr(module, "use_bias"):
        raise ValueError(
            f"'{path}' has a 'bias' parameter but no `use_bias` attribute: the 4-bit forward "
            "cannot tell whether the layer adds it. Give the layer `use_bias`, or leave it out "
            "of QuantConfig.targets."
        )
    return nn.meta.unbox(module.get_variable("params", "bias")) if module.use_bias else None


def _dense_spec(module, x, kwargs) -> EinsumSpec:
    return "...i", "io", "...o"


def _dense_general_spec(module: nn.DenseGeneral, x, kwargs) -> EinsumSpec:
    ndim = x.ndim
    axis = _normalize(module.axis, ndim)
    batch = _normalize(module.batch_dims, ndim)
    features = module.features if isinstance(module.features, Sequence) else (module.features,)
    letters = string.ascii_letters
    x_spec = letters[:ndim]
    f_spec = letters[ndim : ndim + len(features)]
    p_spec = "".join(x_spec[i] for i in batch + axis) + f_spec
    free = "".join(x_spec[i] for i in range(ndim) if i not in batch + axis)
    return x_spec, p_spec, "".join(x_spec[i] for i in batch) + free + f_spec


def _normalize(axes, ndim: int) -> tuple[int, ...]:
    axes = axes if isinstance(axes, Sequence) else (axes,)
    return tuple(a % ndim for a in axes)


def _einsum_spec(module: nn.Einsum, x, kwargs) -> EinsumSpec:
    einsum_str = kwargs.get("einsum_str") or module.einsum_str
    inputs, output = einsum_str.replace(" ", "").split("->")
    x_spec, p_spec = inputs.split(",")
    return x_spec, p_spec, output


class EmbedRule(Rule):
    """`nn.Embed`: the adapter adds a lookup into A followed by B; `attend` (tied output
    heads) gets the transposed delta. Initialized as PEFT does for embeddings: A zeros,
    B normal, so ΔW starts at zero."""

    param = "embedding"
    methods = ("__call__", "attend")

    def split(self, module, shape, args, kwargs):
        return Split(0, 1)

    def delta(self, module, method, args, kwargs, a, b, dropout):
        if method == "attend":
            query = dropout(args[0].astype(a.dtype))
            return (query @ b.T) @ a.T
        return jnp.take(a, args[0], axis=0) @ b

    def init(self, which, init, key, shape, dtype, fan_in):
        if which == "a":
            return jnp.zeros(shape, dtype)
        return jax.random.normal(key, shape, dtype)


class ConvRule(Rule):
    """`nn.Conv`: a conv to `rank` channels (same window, strides, padding, dilation) followed
    by a 1×1 to the output channels. A is (window..., in_features, rank), B (rank, features)."""

    def split(self, module: nn.Conv, shape, args, kwargs):
        if module.feature_group_count != 1 or module.mask is not None:
            raise ValueError(
                f"Module '{module_path(module)}': LoRA on nn.Conv supports "
                f"feature_group_count=1 and no mask, found feature_group_count="
                f"{module.feature_group_count}, mask={'set' if module.mask is not None else None}."
            )
        return Split(0, len(shape) - 1)

    def delta(self, module, method, args, kwargs, a, b, dropout):
        down = module.clone(
            parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype, param_dtype=a.dtype
        )
        h = down.apply({"params": {"kernel": a}}, dropout(args[0].astype(a.dtype)))
        return h @ b


def module_path(module: nn.Module) -> str:
    """The '/'-joined path of a bound module's variables in the tree.

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


_RULES: dict[type, Rule] = {}


def register_rule(layer_class: type, rule: Rule) -> None:
    """Registers (or replaces) the LoRA rule for a layer class and its subclasses.

    Example:
      >>> import flax.linen as nn, lora_jax as lj
      >>> class MyLinear(nn.Module):
      ...   features: int
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
      ...     return x @ w
      >>> lj.register_rule(MyLinear, lj.LinearRule(spec=lambda m, x, kw: ("...i", "io", "...o"), param="w"))
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, nn.Module)):
        raise TypeError(f"register_rule needs a flax.linen Module class, got {layer_class!r}.")
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule needs a lora_jax.Rule, got {rule!r}.")
    _RULES[layer_class] = rule


def rule_for(layer_class: type) -> Rule | None:
    """The rule for a layer class: its own, else the nearest registered base class's."""
    return next((_RULES[c] for c in layer_class.__mro__ if c in _RULES), None)


register_rule(nn.Dense, LinearRule(spec=_dense_spec))
register_rule(nn.DenseGeneral, LinearRule(spec=_dense_general_spec))
register_rule(nn.Einsum, LinearRule(spec=_einsum_spec))
register_rule(nn.Embed, EmbedRule())
register_rule(nn.Conv, ConvRule())
