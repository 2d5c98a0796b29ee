"""4-bit base weights (QLoRA): the `QuantizedTensor` pytree, quantize and dequantize.

Layout. A kernel of shape (lead..., in..., out...) is seen as a stack of (K, N) matrices,
K = prod(in), N = prod(out); `lead` holds the layer's batch axes (and the layer axis of
scan-stacked models, so slicing every leaf on axis 0 slices the tensor). Each column is cut
into blocks of `block_size` consecutive weights along K, each block scaled to [-1, 1] by its
scale and rounded to the nearest of the format's 16 values. K is zero-padded to a multiple
of the block size; the padding is stored and dropped on dequantization.

Packing (explicit, not `jnp.uint4`, so storage is 4 bits on every backend): `codes` is uint8
(lead..., K_padded / 2, N). Within block `i`, byte row `i * block_size / 2 + j` holds row
`i * block_size + j` of the block in its low nibble and row `i * block_size + j +
block_size / 2` in its high nibble. A matmul kernel then reads the two halves of a block as
two contiguous slices, with no interleaving.

Double quantization. The blocks' absmax scales are stored in 8 bits too, in groups of 256
consecutive scales, each group with its own float32 log2 range [lo, hi]: a scale's code is
its position in that range on a log2 scale (code 0 is an exact zero, 255 a non-finite
scale). Per group, so a scale only shares precision with its 255 neighbours, and on a log
scale, so a block of tiny or huge weights costs the others little: the range is clipped to
`OUTLIER_OCTAVES` octaves around the group's median, and a block whose absmax lies beyond it
is scaled by the clipped value (only that block's largest weights are clipped). The 4-bit codes
are chosen against the stored (decoded) scale. 4 + 8/64 + 64/(64*256) ≈ 4.129 bits per weight at
block 64, against 4.5 with float32 scales.

Non-finite weights: `quantize_array` on concrete arrays raises, naming the parameter. Under a
trace (where it cannot look) a non-finite weight makes only its own block non-finite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import _paths, _trees
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
DQ_BLOCK = 256  # scales per double-quantization group
OUTLIER_OCTAVES = 10.0  # a group's log2 range reaches at most this far from its median
_ZERO, _NONFINITE = 0, 255  # scale codes with a fixed meaning; 1..254 span [lo, hi]
_LEVELS = 253.0


@struct.dataclass
class QuantizedTensor:
    """A 4-bit kernel that sits in the params tree where the dense kernel was.

    Attributes:
      codes: uint8 (lead..., K_padded / 2, N), two 4-bit codes per byte (see the module doc).
      scales: float32 scale per block (lead..., K_padded / block_size, N), or None with
        double quantization.
      scale_codes: uint8 (lead..., groups, 256): the double-quantized scales, or None.
      scale_range: float32 (lead..., groups, 2): each group's log2 range [lo, hi], or None.
      fmt, block_size: the format and the block size.
      in_shape, out_shape: the contraction and output axes of one (K, N) matrix.
      dtype: the dtype the tensor dequantizes to (`QuantConfig.compute_dtype`).
    """

    codes: Array
    scales: Array | None
    scale_codes: Array | None
    scale_range: Array | None
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
    """Whether `x` is a `QuantizedTensor` (boxed or not)."""
    return isinstance(_trees.unbox(x), QuantizedTensor)


# --------------------------------------------------------------------------- quantize


def _encode(normed: Array, table: tuple[float, ...]) -> Array:
    """Nearest code of each value in [-1, 1] (ties to the lower value), as uint8.

    Against the 15 midpoints, comparing each value with all of them is one elementwise loop;
    the default binary search is a loop of gathers, 5.7x as long for a 2048 x 8192 kernel on
    a CPU (the whole quantizer: 0.29 -> 0.05 s), with the same codes."""
    order = np.argsort(np.asarray(table), kind="stable")
    ordered = np.asarray(table, np.float32)[order]
    midpoints = jnp.asarray((ordered[1:] + ordered[:-1]) / 2)
    rank = jnp.searchsorted(midpoints, normed, side="left", method="compare_all")
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


def _check_shape(shape: tuple[int, ...], n_lead: int, n_in: int, block: int, path: str) -> None:
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


def _check_finite(w: Any, path: str) -> None:
    """Raises naming `path` if a concrete array holds NaN or inf (a no-op under a trace)."""
    if isinstance(w, jax.core.Tracer) or bool(jnp.isfinite(w).all()):
        return
    bad = np.argwhere(~np.isfinite(np.asarray(w, np.float32)))
    if len(bad):
        raise ValueError(
            f"Cannot quantize '{path}': it holds {len(bad)} non-finite weights (NaN or inf), "
            f"the first at index {tuple(int(i) for i in bad[0])}. Fix or drop the checkpoint's "
            "bad values, or leave this kernel out of QuantConfig.targets."
        )


@functools.partial(jax.jit, static_argnames=("n_lead", "n_in", "fmt", "block", "double"))
def _quantize(
    w: Array, *, n_lead: int, n_in: int, fmt: str, block: int, double: bool
) -> tuple[Array, ...]:
    lead, in_shape = w.shape[:n_lead], w.shape[n_lead : n_lead + n_in]
    k, n = math.prod(in_shape), math.prod(w.shape[n_lead + n_in :])
    w = w.astype(jnp.float32).reshape((*lead, k, n))
    w = jnp.pad(w, [(0, 0)] * n_lead + [(0, -k % block), (0, 0)])
    blocks = w.reshape((*lead, -1, block, n))
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # (lead..., blocks, N)
    if double:
        scale_codes, scale_range = _double_quantize(absmax)
        scales = _double_dequantize(scale_codes, scale_range, absmax.shape)
    else:
        scales = absmax
    normed = jnp.clip(blocks / jnp.where(scales == 0, 1.0, scales)[..., None, :], -1.0, 1.0)
    codes = _encode(normed, TABLES[fmt])
    half = block // 2
    packed = codes[..., :half, :] | (codes[..., half:, :] << 4)
    packed = packed.reshape((*lead, -1, n))
    if not double:
        return packed, absmax, None, None
    return packed, None, scale_codes, scale_range


def _double_quantize(absmax: Array) -> tuple[Array, Array]:
    """8-bit log2 codes of the scales in groups of 256, and each group's log2 range."""
    lead = absmax.shape[:-2]
    flat = absmax.reshape((*lead, -1))
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, -flat.shape[-1] % DQ_BLOCK)])
    groups = flat.reshape((*lead, -1, DQ_BLOCK))
    usable = jnp.isfinite(groups) & (groups > 0)
    logs = jnp.where(usable, jnp.log2(jnp.where(usable, groups, 1.0)), jnp.nan)
    median = jnp.nanmedian(logs, axis=-1, keepdims=True)
    lo = jnp.maximum(jnp.nanmin(logs, axis=-1, keepdims=True), median - OUTLIER_OCTAVES)
    hi = jnp.minimum(jnp.nanmax(logs, axis=-1, keepdims=True), median + OUTLIER_OCTAVES)
    lo, hi = jnp.nan_to_num(lo), jnp.nan_to_num(hi)  # groups without a usable scale
    span = jnp.where(hi > lo, hi - lo, 1.0)
    levels = jnp.clip(jnp.round((logs - lo) / span * _LEVELS), 0.0, _LEVELS) + 1.0
    codes = jnp.where(usable, levels, jnp.where(groups == 0, _ZERO, _NONFINITE))
    return codes.astype(jnp.uint8), jnp.concatenate([lo, hi], axis=-1)


def _double_dequantize(codes: Array, ranges: Array, shape: tuple[int, ...]) -> Array:
    """The float32 scales (lead..., blocks, N) of `shape` from their codes and ranges."""
    lo, hi = ranges[..., :1], ranges[..., 1:]
    level = codes.astype(jnp.float32) - 1.0
    scales = jnp.exp2(lo + level / _LEVELS * (hi - lo))
    scales = jnp.where(codes == _ZERO, 0.0, jnp.where(codes == _NONFINITE, jnp.nan, scales))
    lead = shape[:-2]
    count = math.prod(shape[-2:])
    return scales.reshape((*lead, -1))[..., :count].reshape(shape)


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
      w: a floating kernel, (lead..., in..., out...), with finite values.
      cfg: format, block size, double quantization and the dtype to dequantize to.
      n_lead: leading (batch or stacked-layer) axes; each index is its own matrix.
      n_in: contraction axes after the leading ones; default all but the last axis.
      path: the parameter path, for error messages.

    Returns:
      A `QuantizedTensor` of the same logical shape.

    Raises:
      ValueError: `w` holds NaN or inf (checked when `w` is concrete), or its shape does not
        fit the block size.

    Example:
      >>> import jax, lora_jax as lj
      >>> from lora_jax.quant import quantize_array
      >>> w = jax.random.normal(jax.random.key(0), (256, 64))
      >>> qt = quantize_array(w, lj.QuantConfig(fmt="nf4", block_size=64))
      >>> qt.shape, round(qt.bits_per_weight, 2)
      ((256, 64), 4.13)
    """
    shape = tuple(jnp.shape(w))
    dtype = jnp.result_type(w) if hasattr(w, "dtype") else None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"Cannot quantize '{path}': expected a floating array, got {dtype}.")
    n_in = len(shape) - n_lead - 1 if n_in is None else n_in
    _check_shape(shape, n_lead, n_in, cfg.block_size, path)
    _check_finite(w, path)
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
    """The float32 scales, (lead..., K_padded / block_size, N)."""
    if qt.scales is not None:
        return qt.scales
    nblocks = qt.codes.shape[-2] * 2 // qt.block_size
    return _double_dequantize(qt.scale_codes, qt.scale_range, (*qt.lead_shape, nblocks, qt.n))


def unpack(codes: Array, block_size: int) -> Array:
    """uint8 (..., K_padded / 2, N) packed codes -> uint8 (..., K_padded, N) codes."""
    *lead, rows, n = codes.shape
    half = block_size // 2
    blocks = codes.reshape((*lead, rows // half, half, n))
    both = jnp.concatenate([blocks & 0xF, blocks >> 4], axis=-2)
    return both.reshape((*lead, rows * 2, n))


def dequantize_matrix(
    qt: QuantizedTensor, dtype: Any = None, *, table: tuple[float, ...] | Array | None = None
) -> Array:
    """The dense (lead..., K, N) matrices, in `dtype` (default `qt.dtype`)."""
    table = TABLES[qt.fmt] if table is None else table
    values = _decode(unpack(qt.codes, qt.block_size), table)
    lead = qt.lead_shape
    values = values.reshape((*lead, -1, qt.block_size, qt.n))
    w = values * block_scales(qt)[..., None, :]
    w = w.reshape((*lead, -1, qt.n))[..., : qt.k, :]
    return w.astype(qt.dtype if dtype is None else dtype)


def dequantize(x: QuantizedTensor | Mapping, dtype: Any = None) -> Any:
    """The dense kernel of a `QuantizedTensor`, or a tree with every one made dense.

    Args:
      x: a `QuantizedTensor`, or a tree (e.g. params) holding some.
      dtype: the dense dtype; default: each tensor's compute dtype.
    """
    if not isinstance(x, QuantizedTensor):
        return dequantize_tree(x, dtype)
    return _dequantize(x, jnp.dtype(x.dtype if dtype is None else dtype))


# Compiled as one program: called eagerly (merge, analysis, a user's script), the decoding ops
# would each compile on their own, about 8x slower on first use (1.2 s against 0.15 s for a
# small kernel on CPU). Under an outer jit it is inlined.
@functools.partial(jax.jit, static_argnums=1)
def _dequantize(qt: QuantizedTensor, dtype: Any) -> Array:
    return dequantize_matrix(qt, dtype).reshape(qt.shape)


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
      paths: '/'-joined paths (as in `params`) -> (leading axes, contraction axes), e.g.
        ``{"layers_0/mlp/up_proj/kernel": (0, 1)}``; default: every floating leaf named
        "kernel" with 2 or more axes, all but the last contracted.

    Returns:
      The tree with those leaves replaced by `QuantizedTensor`s; other leaves are the same
      objects. Host (numpy) leaves move to the device one at a time, so a model read from
      disk never needs its dense copy in device memory.

    Raises:
      ValueError: a path is not in the tree or already quantized, or a kernel holds NaN or
        inf (the path is named).
    """
    boxed = _trees.flat(params)
    flat = {k: _trees.unbox(v) for k, v in boxed.items()}
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
        raise ValueError(f"quantize: paths not in the tree: {_trees.quoted(missing)}.")
    for path, (n_lead, n_in) in paths.items():
        if is_quantized(flat[path]):
            raise ValueError(f"quantize: '{path}' is already quantized.")
        qt = quantize_array(flat[path], cfg, n_lead=n_lead, n_in=n_in, path=path)
        boxed[path] = _trees.rebox(boxed[path], qt)  # a sharding box keeps its names
    return _trees.unflat(boxed)


def dequantize_tree(params: Mapping, dtype: Any = None) -> dict:
    """Replaces every `QuantizedTensor` of a tree by its dense kernel (in `dtype`, default
    each tensor's compute dtype). In a LoRA tree the "lora" collection's 4-bit markers go too:
    the result is a dense LoRA tree."""
    dense = jax.tree.map(
        lambda x: dequantize(x, dtype) if isinstance(x, QuantizedTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )
    if not (_paths.is_variables(dense) and isinstance(dense.get(_paths.LORA), Mapping)):
        return dense
    flat = _trees.flat(dense)
    return _trees.unflat({k: v for k, v in flat.items() if _paths.quantized_param(k) is None})
