"""A Pallas kernel for ``x @ dequantize(W)`` and ``g @ dequantize(W).T`` on 4-bit codes.

Written for the Triton backend of Pallas (GPU); on other backends it runs in interpret mode,
which is how the tests check it against the jnp reference on CPU. Each program computes one
(bm, bn) tile of the output and walks the contraction axis one quantization block at a time:
it loads the block's packed bytes (block / 2, bn), decodes the low and high nibbles with a
tree of 15 selects (XLA does not fuse a 16-entry table lookup into a dot; this is the point
of the kernel), scales them by the block's absmax row, and multiplies the two halves of the
block by the two matching contiguous slices of x. No dense kernel is ever written to memory.

The refs are whole arrays, indexed by program id, so only the tiles must be powers of two:
any K (padded to the block size) and any N that is a multiple of the tile width work.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lora_jax.quant.formats import TABLES, QuantizedTensor, block_scales

_MIN_DOT = 16  # smallest dot dimension that the Triton backend accepts


def _decode(codes: jax.Array, fmt: str) -> jax.Array:
    """Values of int32 codes in [0, 16) as float32, by a select tree over the four bits."""
    if fmt == "int4":
        return (codes.astype(jnp.float32) - 8.0) * (1.0 / 7.0)
    level = [jnp.float32(v) for v in TABLES[fmt]]
    for bit in range(4):
        on = (codes & (1 << bit)) != 0
        level = [jnp.where(on, hi, lo) for lo, hi in zip(level[0::2], level[1::2], strict=True)]
    return level[0]


def _tile(size: int, largest: int) -> int:
    """The largest power-of-two tile <= `largest` dividing `size`, at least the dot minimum."""
    tile = largest
    while tile > _MIN_DOT and size % tile:
        tile //= 2
    return tile


def _row_tile(m: int) -> int:
    return min(128, max(_MIN_DOT, pl.next_power_of_2(m)))


def _forward_kernel(
    x_ref: jax.Ref,
    c_ref: jax.Ref,
    s_ref: jax.Ref,
    o_ref: jax.Ref,
    *,
    fmt: str,
    wdtype: Any,
    block: int,
    bm: int,
    bn: int,
    nblocks: int,
) -> None:
    half = block // 2
    rows, cols = pl.ds(pl.program_id(0) * bm, bm), pl.ds(pl.program_id(1) * bn, bn)

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        byte = c_ref[pl.ds(i * half, half), cols].astype(jnp.int32)
        scale = s_ref[pl.ds(i, 1), cols]
        w_lo = (_decode(byte & 0xF, fmt) * scale).astype(wdtype).astype(x_ref.dtype)
        w_hi = (_decode(byte >> 4, fmt) * scale).astype(wdtype).astype(x_ref.dtype)
        x_lo = x_ref[rows, pl.ds(i * block, half)]
        x_hi = x_ref[rows, pl.ds(i * block + half, half)]
        acc += jnp.dot(x_lo, w_lo, preferred_element_type=jnp.float32)
        return acc + jnp.dot(x_hi, w_hi, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, nblocks, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def _transposed_kernel(
    g_ref: jax.Ref,
    c_ref: jax.Ref,
    s_ref: jax.Ref,
    o_ref: jax.Ref,
    *,
    fmt: str,
    wdtype: Any,
    block: int,
    bm: int,
    bn: int,
    ntiles: int,
) -> None:
    half = block // 2
    i = pl.program_id(1)  # the quantization block of the output's columns
    rows = pl.ds(pl.program_id(0) * bm, bm)
    contract = (((1,), (1,)), ((), ()))

    def body(j: jax.Array, accs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        cols = pl.ds(j * bn, bn)
        byte = c_ref[pl.ds(i * half, half), cols].astype(jnp.int32)
        scale = s_ref[pl.ds(i, 1), cols]
        w_lo = (_decode(byte & 0xF, fmt) * scale).astype(wdtype).astype(g_ref.dtype)
        w_hi = (_decode(byte >> 4, fmt) * scale).astype(wdtype).astype(g_ref.dtype)
        g = g_ref[rows, cols]
        dot = lambda w: jax.lax.dot_general(g, w, contract, preferred_element_type=jnp.float32)
        return accs[0] + dot(w_lo), accs[1] + dot(w_hi)

    zeros = jnp.zeros((bm, half), jnp.float32)
    lo, hi = jax.lax.fori_loop(0, ntiles, body, (zeros, zeros))
    o_ref[rows, pl.ds(i * block, half)] = lo.astype(o_ref.dtype)
    o_ref[rows, pl.ds(i * block + half, half)] = hi.astype(o_ref.dtype)


def supported(qt: QuantizedTensor) -> bool:
    """Whether the kernel serves this tensor's shapes (else the XLA path is used)."""
    return not qt.lead_shape and qt.block_size // 2 >= _MIN_DOT and qt.n % _MIN_DOT == 0


def pallas_matmul(
    x: jax.Array, qt: QuantizedTensor, *, transpose: bool = False, interpret: bool | None = None
) -> jax.Array:
    """x (M, K) @ W (K, N), or with `transpose` x (M, N) @ W.T (N, K), in x's dtype.

    Args:
      x: a 2-D input in the compute dtype.
      qt: a `QuantizedTensor` without leading axes whose shapes `supported` accepts.
      transpose: multiply by the transposed kernel (the input gradient of the forward).
      interpret: run in Pallas interpret mode; default: unless the backend is GPU.
    """
    if not supported(qt):
        raise ValueError(
            f"The Pallas dequant-matmul kernel needs no leading axes, block_size >= "
            f"{2 * _MIN_DOT} and N a multiple of {_MIN_DOT}; got {qt!r}. "
            "Use QuantConfig(kernel='auto') or 'xla'."
        )
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    m = x.shape[0]
    bm = _row_tile(m)
    mp = -(-m // bm) * bm
    kp = qt.codes.shape[0] * 2
    scales = block_scales(qt)
    bn = _tile(qt.n, 128)
    if transpose:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
        kernel = functools.partial(
            _transposed_kernel, fmt=qt.fmt, wdtype=qt.dtype, block=qt.block_size, bm=bm, bn=bn,
            ntiles=qt.n // bn,
        )  # fmt: skip
        grid, out = (mp // bm, kp // qt.block_size), (mp, kp)
    else:
        x = jnp.pad(x, ((0, mp - m), (0, kp - qt.k)))
        kernel = functools.partial(
            _forward_kernel, fmt=qt.fmt, wdtype=qt.dtype, block=qt.block_size, bm=bm, bn=bn,
            nblocks=kp // qt.block_size,
        )  # fmt: skip
        grid, out = (mp // bm, qt.n // bn), (mp, qt.n)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out, x.dtype),
        grid=grid,
        interpret=interpret,
        name="lora_jax_dequant_matmul" + ("_t" if transpose else ""),
    )(x, qt.codes, scales)
    return y[:m, : qt.k] if transpose else y[:m]
