"""4-bit base weights (QLoRA): the `QuantizedTensor` pytree, quantize / dequantize, and the
dequantizing matmul whose backward pass keeps only the packed codes.

Layout. A kernel of shape (lead..., in..., out...) is seen as a stack of (K, N) matrices,
K = prod(in), N = prod(out); `lead` holds the layer's batch axes (and the layer axis of
scan-stacked models, so slicing every leaf on axis 0 slices the tensor). Each column is cut
into blocks of `block_size` consecutive weights along K, each block scaled by its absmax to
[-1, 1] and rounded to the nearest of the format's 16 values. K is zero-padded to a multiple
of the block size; the padding is stored and dropped on dequantization.

Packing (explicit, not `jnp.uint4`, so storage is 4 bits on every backend): `codes` is uint8
(lead..., K_padded / 2, N). Within block `i`, byte row `i * block_size / 2 + j` holds row
`i * block_size + j` of the block in its low nibble and row `i * block_size + j +
block_size / 2` in its high nibble. A matmul kernel then reads the two halves of a block as
two contiguous slices, with no interleaving.

Double quantization (QLoRA): the float32 absmax scales (lead..., K_padded / block_size, N)
minus their mean (one float32 per matrix) are quantized to int8 in blocks of 256 with one
float32 absmax per block: 4 + 8/64 + 32/(64*256) ≈ 4.127 bits per weight at block 64,
against 4.5 with float32 scales.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from flax.core import meta

from lora_jax.config import QuantConfig

Array = jax.Array

# The 16 values of each format, indexed by code, in [-1, 1].
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# E2M1 (OCP microscaling FP4): sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, over 6.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4 = tuple(m / 6.0 for m in _E2M1) + tuple(-m / 6.0 for m in _E2M1)
# Symmetric int4: code c stands for (c - 8) / 7; code 0 (-8/7) is never produced.
INT4 = tuple((c - 8) / 7.0 for c in range(16))
TABLES = {"nf4": NF4, "fp4": FP4, "int4": INT4}
DQ_BLOCK = 256  # scales per double-quantization block


@struct.dataclass
class QuantizedTensor:
    """A 4-bit kernel that sits in the params tree where the dense kernel was.

    Attributes:
      codes: uint8 (lead..., K_padded / 2, N), two 4-bit codes per byte (see the module doc).
      scales: float32 absmax per block (lead..., K_padded / block_size, N), or None with
        double quantization.
      scale_codes: int8 (lead..., blocks of 256, 256): the double-quantized scales, or None.
      scale_absmax: float32 (lead..., blocks of 256): their per-block absmax, or None.
      scale_mean: float32 (lead...): the mean subtracted from the scales, or None.
      fmt, block_size: the format and the block size.
      in_shape, out_shape: the contraction and output axes of one (K, N) matrix.
      dtype: the dtype the tensor dequantizes to (`QuantConfig.compute_dtype`).
    """

    codes: Array
    scales: Array | None
    scale_codes: Array | None
    scale_absmax: Array | None
    scale_mean: Array | None
    fmt: str = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)
    in_shape: tuple[int, ...] = struct.field(pytree_node=False)
    out_shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dense kernel."""
        return self.lead_shape + self.in_shape + self.out_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def k(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n(self) -> int:
        return math.prod(self.out_shape)

    @property
    def double_quant(self) -> bool:
        return self.scales is None

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes and scales)."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.size

    def dequantize(self, dtype: Any = None) -> Array:
        """The dense kernel, in `dtype` (default: `self.dtype`)."""
        return dequantize(self, dtype)

    def quant_config(self) -> QuantConfig:
        """The `QuantConfig` (format, block size, double quantization, compute dtype) that
        quantized this tensor; targets and kernel choice at their defaults."""
        return QuantConfig(
            fmt=self.fmt,
            block_size=self.block_size,
            double_quant=self.double_quant,
            compute_dtype=self.dtype,
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, fmt={self.fmt!r}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, dtype={jnp.dtype(self.dtype).name}, "
            f"bits_per_weight={self.bits_per_weight:.3f})"
        )


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


def unboxed(x: Any) -> Any:
    """The value in a sharding box (`nn.Partitioned`, ...), else `x`; never adds a sharding
    constraint (which a `QuantizedTensor` could not take: its fields have other shapes)."""
    if isinstance(x, meta.Partitioned):
        return x.value
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


# --------------------------------------------------------------------------- quantize


def _encode(normed: Array, table: tuple[float, ...]) -> Array:
    """Nearest code of each value in [-1, 1] (ties to the lower value), as uint8."""
    order = np.argsort(np.asarray(table), kind="stable")
    ordered = np.asarray(table, np.float32)[order]
    midpoints = jnp.asarray((ordered[1:] + ordered[:-1]) / 2)
    rank = jnp.searchsorted(midpoints, normed, side="left")
    return jnp.asarray(order, jnp.uint8)[rank]


def _decode(codes: Array, table: tuple[float, ...] | Array) -> Array:
    """Values of uint8 codes in [0, 16), by a tree of 15 selects over the four bits.

    Elementwise, so XLA fuses it with the scaling into one loop (a gather would write the
    looked-up values to memory first).
    """
    level = [table[i] for i in range(16)]
    for bit in range(4):
        on = (codes & (1 << bit)) != 0
        level = [jnp.where(on, hi, lo) for lo, hi in zip(level[0::2], level[1::2], strict=True)]
    return level[0].astype(jnp.float32)


def _check_shape(shape: tuple[int, ...], n_lead: int, n_in: int, block: int, path: str):
    if len(shape) < n_lead + n_in + 1 or n_in < 1:
        raise ValueError(
            f"Cannot quantize '{path}': a kernel needs at least one contraction and one output "
            f"axis after {n_lead} leading axes, got shape {shape}."
        )
    k = math.prod(shape[n_lead : n_lead + n_in])
    if block > k:
        raise ValueError(
            f"Cannot quantize '{path}': QuantConfig.block_size {block} is larger than its "
            f"contraction axes ({k} weights, shape {shape}); use a block size <= {k}."
        )


@functools.partial(jax.jit, static_argnames=("n_lead", "n_in", "fmt", "block", "double"))
def _quantize(w, *, n_lead, n_in, fmt, block, double):
    lead, in_shape = w.shape[:n_lead], w.shape[n_lead : n_lead + n_in]
    k, n = math.prod(in_shape), math.prod(w.shape[n_lead + n_in :])
    w = w.astype(jnp.float32).reshape(lead + (k, n))
    w = jnp.pad(w, [(0, 0)] * n_lead + [(0, -k % block), (0, 0)])
    blocks = w.reshape(lead + (-1, block, n))
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # (lead..., blocks, N)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
    codes = _encode(normed, TABLES[fmt])
    half = block // 2
    packed = codes[..., :half, :] | (codes[..., half:, :] << 4)
    packed = packed.reshape(lead + (-1, n))
    if not double:
        return packed, absmax, None, None, None
    return (packed, None, *_double_quantize(absmax))


def _double_quantize(absmax: Array) -> tuple[Array, Array, Array]:
    lead = absmax.shape[:-2]
    mean = jnp.mean(absmax, axis=(-2, -1))
    flat = (absmax - mean[..., None, None]).reshape(lead + (-1,))
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, -flat.shape[-1] % DQ_BLOCK)])
    blocks = flat.reshape(lead + (-1, DQ_BLOCK))
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = blocks / jnp.where(amax == 0, 1.0, amax)[..., None] * 127.0
    return jnp.round(scaled).astype(jnp.int8), amax, mean


def quantize_array(
    w: Array,
    cfg: QuantConfig,
    *,
    n_lead: int = 0,
    n_in: int | None = None,
    path: str = "kernel",
) -> QuantizedTensor:
    """Quantizes one kernel.

    Args:
      w: a floating kernel, (lead..., in..., out...).
      cfg: format, block size, double quantization and the dtype to dequantize to.
      n_lead: leading (batch or stacked-layer) axes; each index is its own matrix.
      n_in: contraction axes after the leading ones; default all but the last axis.
      path: the parameter path, for error messages.

    Returns:
      A `QuantizedTensor` of the same logical shape.
    """
    shape = tuple(jnp.shape(w))
    dtype = jnp.result_type(w) if hasattr(w, "dtype") else None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"Cannot quantize '{path}': expected a floating array, got {dtype}.")
    n_in = len(shape) - n_lead - 1 if n_in is None else n_in
    _check_shape(shape, n_lead, n_in, cfg.block_size, path)
    leaves = _quantize(
        w, n_lead=n_lead, n_in=n_in, fmt=cfg.fmt, block=cfg.block_size, double=cfg.double_quant
    )
    return QuantizedTensor(
        *leaves,
        fmt=cfg.fmt,
        block_size=cfg.block_size,
        in_shape=shape[n_lead : n_lead + n_in],
        out_shape=shape[n_lead + n_in :],
        dtype=cfg.compute_dtype,
    )


def requantize_like(w: Array, like: QuantizedTensor, path: str = "kernel") -> QuantizedTensor:
    """Quantizes a dense kernel with the format, blocks and axes of `like`."""
    cfg = like.quant_config()
    return quantize_array(w, cfg, n_lead=len(like.lead_shape), n_in=len(like.in_shape), path=path)


# --------------------------------------------------------------------------- dequantize


def block_scales(qt: QuantizedTensor) -> Array:
    """The float32 absmax scales, (lead..., K_padded / block_size, N)."""
    if qt.scales is not None:
        return qt.scales
    nblocks = qt.codes.shape[-2] * 2 // qt.block_size
    lead = qt.lead_shape
    flat = qt.scale_codes.astype(jnp.float32) * (qt.scale_absmax[..., None] / 127.0)
    flat = flat.reshape(lead + (-1,))[..., : nblocks * qt.n]
    return flat.reshape(lead + (nblocks, qt.n)) + qt.scale_mean[..., None, None]


def unpack(codes: Array, block_size: int) -> Array:
    """uint8 (..., K_padded / 2, N) packed codes -> uint8 (..., K_padded, N) codes."""
    *lead, rows, n = codes.shape
    half = block_size // 2
    blocks = codes.reshape((*lead, rows // half, half, n))
    both = jnp.concatenate([blocks & 0xF, blocks >> 4], axis=-2)
    return both.reshape((*lead, rows * 2, n))


def dequantize_matrix(qt: QuantizedTensor, dtype: Any = None, *, table=None) -> Array:
    """The dense (lead..., K, N) matrices, in `dtype` (default `qt.dtype`)."""
    table = TABLES[qt.fmt] if table is None else table
    values = _decode(unpack(qt.codes, qt.block_size), table)
    lead = qt.lead_shape
    values = values.reshape(lead + (-1, qt.block_size, qt.n))
    w = values * block_scales(qt)[..., None, :]
    w = w.reshape(lead + (-1, qt.n))[..., : qt.k, :]
    return w.astype(qt.dtype if dtype is None else dtype)


def dequantize(x: QuantizedTensor | Mapping, dtype: Any = None):
    """The dense kernel of a `QuantizedTensor`, or a tree with every one made dense.

    Args:
      x: a `QuantizedTensor`, or a tree (e.g. params) holding some.
      dtype: the dense dtype; default: each tensor's compute dtype.
    """
    if not is_quantized(x):
        return dequantize_tree(x, dtype)
    return dequantize_matrix(x, dtype).reshape(x.shape)


# --------------------------------------------------------------------------- trees


def quantize(
    params: Mapping,
    cfg: QuantConfig,
    *,
    paths: Mapping[str, tuple[int, int]] | None = None,
) -> dict:
    """Quantizes kernels of a parameter tree, one leaf at a time.

    Without a model to read the layers' axes from, this function needs to be told which
    kernels to quantize and how their axes split. `lora_jax.init(..., base_params=...)` with
    `LoraConfig.quantize` set does this for you from the model.

    Args:
      params: a params dict (or variables dict) of floating kernels.
      cfg: the quantization settings (`cfg.targets` is not read here).
      paths: '/'-joined parameter paths -> (leading axes, contraction axes), e.g.
        ``{"layers_0/mlp/up_proj/kernel": (0, 1)}``; default: every floating leaf named
        "kernel" with 2 or more axes, all but the last contracted.

    Returns:
      The tree with those leaves replaced by `QuantizedTensor`s; other leaves are the same
      objects. Host (numpy) leaves move to the device one at a time, so a model read from
      disk never needs its dense copy in device memory.
    """
    boxed = traverse_util.flatten_dict(dict(params), sep="/")
    flat = {k: unboxed(v) for k, v in boxed.items()}
    if paths is None:
        paths = {
            k: (0, len(jnp.shape(v)) - 1)
            for k, v in flat.items()
            if k.rsplit("/", 1)[-1] == "kernel"
            and not is_quantized(v)
            and len(jnp.shape(v)) >= 2
            and jnp.issubdtype(jnp.result_type(v), jnp.floating)
        }
    missing = sorted(set(paths) - set(flat))
    if missing:
        raise ValueError(f"quantize: paths not in the tree: {missing}.")
    for path, (n_lead, n_in) in paths.items():
        if is_quantized(flat[path]):
            raise ValueError(f"quantize: '{path}' is already quantized.")
        qt = quantize_array(flat[path], cfg, n_lead=n_lead, n_in=n_in, path=path)
        box = boxed[path]  # a sharding box keeps its names on the 4-bit kernel
        boxed[path] = box.replace_boxed(qt) if isinstance(box, meta.AxisMetadata) else qt
    return traverse_util.unflatten_dict(boxed, sep="/")


def dequantize_tree(params: Mapping, dtype: Any = None) -> dict:
    """Replaces every `QuantizedTensor` of a tree by its dense kernel (in `dtype`, default
    each tensor's compute dtype)."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


# --------------------------------------------------------------------------- matmul


def qmatmul(x: Array, qt: QuantizedTensor, kernel: str = "auto") -> Array:
    """``x @ dequantize(qt)`` over (..., K) inputs, for a `qt` without leading axes.

    A `jax.custom_vjp`: the forward pass dequantizes inside the matmul, the backward pass
    computes only the input gradient and dequantizes again from the packed codes, so the
    residuals kept for the backward pass are the codes and scales, never a dense kernel. The
    frozen tensor gets a zero cotangent.

    Args:
      x: (..., K) in the compute dtype; the kernel is dequantized to `x.dtype`.
      qt: a `QuantizedTensor` with no leading axes.
      kernel: "auto", "xla" or "pallas" (see `QuantConfig.kernel`).

    Returns:
      (..., N) in `x.dtype`.
    """
    if qt.lead_shape:
        raise ValueError(f"qmatmul needs a tensor without leading axes, got {qt!r}.")
    if x.shape[-1] != qt.k:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} features, the kernel contracts {qt.k}.")
    batch = x.shape[:-1]
    y = _qmatmul(kernel, x.reshape(-1, qt.k), qt)
    return y.reshape(batch + (qt.n,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(kernel: str, x: Array, qt: QuantizedTensor) -> Array:
    return _matmul(kernel, x, qt, transpose=False)


def _qmatmul_fwd(kernel, x, qt):
    return _matmul(kernel, x, qt, transpose=False), qt


def _qmatmul_bwd(kernel, qt, g):
    return _matmul(kernel, g, qt, transpose=True), None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _dequantize_after(x: Array, qt: QuantizedTensor) -> Array:
    """Dequantizes `qt` in a way that depends on `x` (numerically it does not).

    Without a data dependence, XLA computes every layer's table lookup once, at the start of
    the step, and shares it between the forward and the backward pass (common-subexpression
    elimination): all dense kernels stay alive at once, which is what the custom VJP exists
    to avoid. An optimization barrier does not stop this on CPU (the barrier is expanded
    before CSE). So a zero derived from one element of `x` is added to the code table: a
    value XLA cannot fold, NaN- and inf-safe, and one scalar of work.
    """
    v = x.reshape(-1)[0].astype(jnp.float32)
    zero = jnp.where(jnp.isnan(v), 0.0, jnp.minimum(jnp.abs(v), 0.0))
    table = jnp.asarray(TABLES[qt.fmt], jnp.float32) + zero
    # Round to the compute dtype first: the forward pass then uses exactly the kernel that
    # `merge` writes, whatever the layer's own dtype.
    return dequantize_matrix(qt, qt.dtype, table=table).astype(x.dtype)


def _matmul(kernel: str, x: Array, qt: QuantizedTensor, *, transpose: bool) -> Array:
    """x (M, K) @ W (K, N), or with `transpose` x (M, N) @ W.T, in x's dtype."""
    from lora_jax.kernels import dequant_matmul  # kernels import quant's tables

    # "auto" is XLA's dequantize-then-dot on every backend: on an H200 the Pallas kernel took
    # 1.3-3.2x a bf16 x @ W (M in {1, 16, 128, 4096}, K = N = 4096), XLA's path 0.93-1.39x
    # (benchmarks/qmatmul.py, docs/qlora.md). Only kernel="pallas" selects the kernel.
    if kernel == "pallas":
        return dequant_matmul.pallas_matmul(x, qt, transpose=transpose)
    w = _dequantize_after(x, qt)
    dims = (((1,), (1 if transpose else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(x.dtype)
