"""The rule for linear layers: any layer computing ``einsum(spec, x, param)``.

`nn.Dense`, `nn.DenseGeneral` (multi-axis in/out, as inside attention) and `nn.Einsum` (with
batch axes: one adapter per batch index) are linear; so is a custom layer whose `spec`
function gives its einsum subscripts. Linear layers are the ones whose kernels can be 4-bit:
their forward pass then runs through the dequantizing matmul.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax import _paths, _trees
from lora_jax.adapters.geometry import Shape, Split
from lora_jax.quant.formats import QuantizedTensor
from lora_jax.quant.matmul import qmatmul
from lora_jax.rules.base import Rule

Array = jax.Array
EinsumSpec = tuple[str, str, str]  # (input, parameter, output) subscripts


@dataclasses.dataclass(frozen=True)
class _Up:
    """How `LinearRule.up` finishes a delta that `down` started: the einsum subscripts of h,
    B and the output, and the token axes to restore (None: nothing was merged)."""

    h_spec: str
    b_spec: str
    y_spec: str
    tokens: tuple[int, ...] | None


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

    def split(self, module: nn.Module, shape: Shape, args: tuple, kwargs: dict) -> Split:
        x_spec, p_spec, y_spec = self.spec(module, args[0], kwargs)
        kinds = [
            "b" if c in x_spec and c in y_spec else "i" if c in x_spec else "o" for c in p_spec
        ]
        if "".join(kinds) != "".join(sorted(kinds)):  # "b" < "i" < "o"
            raise ValueError(
                f"Module '{_paths.module_path(module)}' ({type(module).__name__}) contracts "
                f"'{x_spec},{p_spec}->{y_spec}': its parameter axes must be ordered batch, "
                f"contracted, output for LoRA, found {''.join(kinds)} (b/i/o). Register a "
                "custom rule for this layer with lora_jax.register_rule."
            )
        return Split(kinds.count("b"), kinds.count("i"))

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
        h, plan = self.down(module, args, kwargs, a, dropout)
        return self.up(plan, h, b)

    def down(
        self,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        a: Array,
        dropout: Callable[[Array], Array],
    ) -> tuple[Array, _Up]:
        """The adapter's first product ``h = dropout(x) @ A`` (h's last axis is the rank),
        and what `up` needs to finish the delta. Split from `delta` so that sibling layers
        reading the same input can run one product with their A's concatenated along the
        rank axis (`lora_jax.linen`'s fused siblings) and finish each with its own B."""
        x = args[0]
        split = self.split(module, (0,) * len(self.spec(module, x, kwargs)[1]), args, kwargs)
        x_spec, p_spec, y_spec = _expand(self.spec(module, x, kwargs), x.ndim)
        # Leading token axes (batch, sequence) shared by input and output, not by the
        # parameter, merge into one: contracted over two axes, XLA on CPU transposes the
        # activation-sized gradient for B's gradient (measured: 39 vs 17 ms for gate/up
        # adapters of a 512 x 1408 MLP, 4 x 128 tokens); over one axis it does not.
        lead = 0
        while (
            lead < min(len(x_spec), len(y_spec))
            and x_spec[lead] == y_spec[lead]
            and x_spec[lead] not in p_spec
        ):
            lead += 1
        tokens = x.shape[:lead]
        if lead > 1:
            x = x.reshape((-1, *x.shape[lead:]))
            x_spec, y_spec = x_spec[lead - 1 :], y_spec[lead - 1 :]
        cut = split.n_batch + split.n_in
        r = next(c for c in string.ascii_letters if c not in x_spec + p_spec + y_spec)
        a_spec = p_spec[:cut] + r
        b_spec = p_spec[: split.n_batch] + r + p_spec[cut:]
        h_spec = "".join(c for c in y_spec if c not in p_spec[cut:]) + r
        h = jnp.einsum(f"{x_spec},{a_spec}->{h_spec}", dropout(x.astype(a.dtype)), a)
        return h, _Up(h_spec, b_spec, y_spec, tokens if lead > 1 else None)

    def up(self, plan: _Up, h: Array, b: Array) -> Array:
        """The adapter's second product ``h @ B``, in the method's output layout."""
        y = jnp.einsum(f"{plan.h_spec},{plan.b_spec}->{plan.y_spec}", h, b)
        return y if plan.tokens is None else y.reshape((*plan.tokens, *y.shape[1:]))

    def per_output(self, module: nn.Module, args: tuple, kwargs: dict, values: Array) -> Array:
        """`values` over the parameter's batch and output axes, (batch..., out...) — the
        layout of the layer's bias — laid out to broadcast against the method's output."""
        x = args[0]
        _, p_spec, y_spec = _expand(self.spec(module, x, kwargs), x.ndim)
        split = self.split(module, (0,) * len(p_spec), args, kwargs)
        v_spec = p_spec[: split.n_batch] + p_spec[split.n_batch + split.n_in :]
        order = "".join(c for c in y_spec if c in v_spec)
        values = _transpose(values, v_spec, order)
        return values.reshape([values.shape[order.index(c)] if c in order else 1 for c in y_spec])

    def bias(self, module: nn.Module, args: tuple, kwargs: dict) -> Array | None:
        """The bias the layer adds, laid out to broadcast against the method's output (its
        axes are the output's axes that the parameter has, in the output's order), or None."""
        bias = _bias(module, _paths.module_path(module), "DoRA")
        if bias is None:
            return None
        x = args[0]
        _, p_spec, y_spec = _expand(self.spec(module, x, kwargs), x.ndim)
        shape = iter(bias.shape)
        return bias.reshape([next(shape) if c in p_spec else 1 for c in y_spec])

    def quantized_forward(
        self,
        module: nn.Module,
        method: str,
        args: tuple,
        kwargs: dict,
        qt: QuantizedTensor,
        kernel: str,
    ) -> Array:
        """``einsum(x, dequantize(qt)) + bias`` through `lora_jax.quant.qmatmul`.

        The input is laid out as (batch..., rows, K) to meet the (K, N) matrices of `qt`
        (one per batch index, vmapped); the bias is added as the layer adds it: its axes are
        the output axes that the parameter has.
        """
        x = args[0]
        x_spec, p_spec, y_spec = _expand(self.spec(module, x, kwargs), x.ndim)
        split = self.split(module, qt.shape, args, kwargs)
        path = _paths.module_path(module)
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
        xt = xt.reshape((*lead, math.prod(free_shape), qt.k))
        matmul = lambda x, q: qmatmul(x, q, kernel)
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


def _bias(module: nn.Module, path: str, user: str = "4-bit") -> Array | None:
    """The bias the layer adds, for the quantized forward (which computes the whole output)
    and DoRA (which rescales the output without it)."""
    if not module.has_variable("params", "bias"):
        return None
    if not hasattr(module, "use_bias"):
        fix = "of QuantConfig.targets" if user == "4-bit" else "of LoraConfig.targets"
        raise ValueError(
            f"'{path}' has a 'bias' parameter but no `use_bias` attribute: the {user} forward "
            f"cannot tell whether the layer adds it. Give the layer `use_bias`, or leave it out "
            f"{fix}."
        )
    return _trees.unbox(module.get_variable("params", "bias")) if module.use_bias else None


def dense_spec(module: nn.Dense, x: Array, kwargs: dict) -> EinsumSpec:
    return "...i", "io", "...o"


def dense_general_spec(module: nn.DenseGeneral, x: Array, kwargs: dict) -> EinsumSpec:
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


def _normalize(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = axes if isinstance(axes, Sequence) else (axes,)
    return tuple(a % ndim for a in axes)


def einsum_spec(module: nn.Einsum, x: Array, kwargs: dict) -> EinsumSpec:
    einsum_str = kwargs.get("einsum_str") or module.einsum_str
    inputs, output = einsum_str.replace(" ", "").split("->")
    x_spec, p_spec = inputs.split(",")
    return x_spec, p_spec, output
