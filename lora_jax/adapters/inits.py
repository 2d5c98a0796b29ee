"""Initializations that start the adapter from the base weight, and change the base to match.

Each takes the kernel W as a matrix (lead..., fan_in, fan_out) — input and output axes
flattened as `Geometry` lays them, batch (per-head) and stacked axes leading — and returns
(A, B, W_res) with ``W_res + scale · A @ B ≈ W``, so the adapted model starts as the base:

- **PiSSA** (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation"): A, B from the top-r singular triplets of W, ``A = U_r √(S_r/s)``,
  ``B = √(S_r/s) Vᵀ_r``; the base keeps the rest. Exact SVD, or the randomized SVD of
  Halko et al. with `niter` subspace iterations (PEFT's ``"pissa_niter_<n>"``).
- **OLoRA** (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): the QR
  factorization of Wᵀ (as PEFT takes it of the (out, in) weight): ``B = Q_rᵀ``,
  ``A = R_rᵀ`` (first r columns of Q, rows of R).
- **LoftQ** (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"): for a 4-bit
  base, alternate ``Q = quantize(W − s·A@B)`` and ``A, B = SVD_r((W − dequantize(Q)) / s)``,
  so that ``dequantize(Q) + s·A@B`` is closer to W than ``dequantize(quantize(W))``. The
  factors are divided by the scale, so this holds at any alpha (PEFT's LoftQ leaves the
  scale out and is exact at alpha = rank only).

All computed in float32; these are pure functions (`lora_jax.init` applies them).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _t(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def svd_factors(u: Array, s: Array, vh: Array, rank: int, scale: float) -> tuple[Array, Array]:
    """A (…, m, r) and B (…, r, n) with ``scale · A @ B`` the rank-r part of ``U S Vh``."""
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def randomized_svd(w: Array, rank: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """The top-`rank` SVD of `w` (…, m, n) by randomized subspace iteration (Halko, Martinsson
    and Tropp 2011, Algorithm 4.4): a Gaussian sketch, `niter` power iterations with
    re-orthonormalization, then the SVD of the small projected matrix."""
    omega = jax.random.normal(key, (*w.shape[:-2], w.shape[-1], rank), w.dtype)
    q, _ = jnp.linalg.qr(w @ omega)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(_t(w) @ q)
        q, _ = jnp.linalg.qr(w @ z)
    u_small, s, vh = jnp.linalg.svd(_t(q) @ w, full_matrices=False)
    return q @ u_small, s, vh


@jax.jit
def _svd(w: Array) -> tuple[Array, Array, Array]:
    return jnp.linalg.svd(w, full_matrices=False)


def pissa(
    w: Array, rank: int, scale: float, niter: int | None = None, key: Array | None = None
) -> tuple[Array, Array, Array]:
    """(A, B, W_res) of PiSSA for the matrix (stack) `w`; `niter` None: the exact SVD."""
    w = w.astype(jnp.float32)
    if niter is None:
        u, s, vh = _svd(w)
    else:
        u, s, vh = jax.jit(randomized_svd, static_argnums=(1, 2))(w, rank, niter, key)
    a, b = svd_factors(u, s, vh, rank, scale)
    return a, b, w - scale * (a @ b)


@jax.jit
def _qr(w: Array) -> tuple[Array, Array]:
    return jnp.linalg.qr(_t(w))  # W^T = Q R: Q (…, n, k), R (…, k, m)


def olora(w: Array, rank: int, scale: float) -> tuple[Array, Array, Array]:
    """(A, B, W_res) of OLoRA for the matrix (stack) `w`."""
    w = w.astype(jnp.float32)
    q, r = _qr(w)
    a, b = _t(r[..., :rank, :]), _t(q[..., :, :rank])
    return a, b, w - scale * (a @ b)


def loftq(
    w: Array,
    rank: int,
    scale: float,
    quantize: Callable[[Array], object],
    dequantize: Callable[[object], Array],
    iters: int,
) -> tuple[Array, Array, object, tuple[float, float]]:
    """(A, B, Q, (error of Q(W) alone, error with the adapter)) of LoftQ.

    `quantize` maps a float32 matrix stack to the 4-bit kernel, `dequantize` back; the
    errors are ``‖W − deq(Q(W))‖_F / ‖W‖_F`` and ``‖W − (deq(Q) + s·A@B)‖_F / ‖W‖_F``.
    """
    w = w.astype(jnp.float32)
    size = jnp.linalg.norm(w)
    a = b = None
    q = quantize(w)
    plain = float(jnp.linalg.norm(w - dequantize(q)) / size)
    for i in range(iters):
        if i:
            q = quantize(w - scale * (a @ b))
        u, s, vh = _svd(w - dequantize(q))
        a, b = svd_factors(u, s, vh, rank, scale)
    after = float(jnp.linalg.norm(w - (dequantize(q) + scale * (a @ b))) / size)
    return a, b, q, (plain, after)
