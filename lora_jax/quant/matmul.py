"""The dequantizing matmul: ``x @ dequantize(W)`` with a backward pass that keeps only the
packed codes, on XLA's dequantize-then-dot.

(A fused Pallas kernel was here as an opt-in until 2026-12-01; on an H200 it ran 1.4-3.2x a
bf16 ``x @ W`` where this path runs 0.93-1.33x, so it was removed: docs/qlora.md.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lora_jax.quant.formats import TABLES, QuantizedTensor, dequantize_matrix

Array = jax.Array


def qmatmul(x: Array, qt: QuantizedTensor, kernel: str = "auto") -> Array:
    """``x @ dequantize(qt)`` over (..., K) inputs, for a `qt` without leading axes.

    A `jax.custom_vjp`: the forward pass dequantizes inside the matmul, the backward pass
    computes only the input gradient and dequantizes again from the packed codes, so the
    residuals kept for the backward pass are the codes and scales, never a dense kernel. The
    frozen tensor gets a zero cotangent.

    Args:
      x: (..., K) in the compute dtype; the kernel is dequantized to `x.dtype`.
      qt: a `QuantizedTensor` with no leading axes.
      kernel: "auto" or "xla" (see `QuantConfig.kernel`): XLA's dequantize-then-dot.

    Returns:
      (..., N) in `x.dtype`.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.quant import qmatmul, quantize_array
      >>> w = jax.random.normal(jax.random.key(0), (128, 32))
      >>> qt = quantize_array(w, lj.QuantConfig(compute_dtype=jnp.float32))
      >>> x = jnp.ones((4, 128))
      >>> qmatmul(x, qt).shape
      (4, 32)
    """
    if qt.lead_shape:
        raise ValueError(f"qmatmul needs a tensor without leading axes, got {qt!r}.")
    if x.shape[-1] != qt.k:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} features, the kernel contracts {qt.k}.")
    batch = x.shape[:-1]
    y = _qmatmul(kernel, x.reshape(-1, qt.k), qt)
    return y.reshape((*batch, qt.n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(kernel: str, x: Array, qt: QuantizedTensor) -> Array:
    return _matmul(kernel, x, qt, transpose=False)


def _qmatmul_fwd(kernel: str, x: Array, qt: QuantizedTensor) -> tuple[Array, QuantizedTensor]:
    return _matmul(kernel, x, qt, transpose=False), qt


def _qmatmul_bwd(kernel: str, qt: QuantizedTensor, g: Array) -> tuple[Array, None]:
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
    del kernel  # "auto" and "xla" are the same path (QuantConfig checks the value)
    w = _dequantize_after(x, qt)
    dims = (((1,), (1 if transpose else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(x.dtype)
