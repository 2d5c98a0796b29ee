"""The spectrum of ΔW, its effective rank, its subspaces, and how it relates to the weight it
adapts (Hu et al. 2021, "LoRA", §7): functions on matrices, and `adapter_report` on a tree.

Layout. lora_jax stores a kernel W as (in, out), A as (in, rank) and B as (rank, out), and
ΔW = scale · A @ B maps in → out (the transpose of the paper's W₀ ∈ ℝ^{d×k}, A ∈ ℝ^{r×k},
B ∈ ℝ^{d×r}, ΔW = BA). So here the *left* singular vectors U (in, k) of ΔW lie in the input
space and the right ones V (out, k) in the output space; the paper's "right-singular unitary
matrix of A" is the left singular vectors of lora_jax's A (`a_subspace`).

Every function takes matrices with optional leading batch axes (e.g. stacked layers:
A (layers, in, rank), B (layers, rank, out)) and works under `jax.jit`. The spectrum of
ΔW comes from the factors without forming ΔW: with A = Q_A R_A and Bᵀ = Q_B R_B (reduced QR),
ΔW = Q_A (scale · R_A R_Bᵀ) Q_Bᵀ, so the SVD of the small rank × rank core gives ΔW's.
`adapter_report` runs all of it over a lora_jax tree, reading each adapter's record.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _paths, _trees
from lora_jax.adapters.geometry import Geometry
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Adapter
from lora_jax.adapters.variant import variant_for
from lora_jax.quant.formats import QuantizedTensor, dequantize

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_HIGHEST = jax.lax.Precision.HIGHEST
_mm = functools.partial(jnp.matmul, precision=_HIGHEST)


def _t(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


class DeltaSVD(NamedTuple):
    """The thin SVD of ΔW = scale · A @ B: ``ΔW == U @ diag(s) @ Vᵀ`` (up to rounding).

    Attributes:
      u: (batch..., in, k) left singular vectors (input space), columns orthonormal.
      s: (batch..., k) singular values, descending; k = min(in, rank, out).
      v: (batch..., out, k) right singular vectors (output space), columns orthonormal.
    """

    u: Array
    s: Array
    v: Array


def _check_factors(a: Array, b: Array) -> None:
    ok = (
        a.ndim >= 2
        and b.ndim == a.ndim
        and a.shape[-1] == b.shape[-2]
        and a.shape[:-2] == b.shape[:-2]
    )
    if not ok:
        raise ValueError(
            f"A has shape {a.shape} and B has shape {b.shape}, but they must be A "
            "(batch..., in, rank) and B (batch..., rank, out) with the same batch axes and "
            "rank; flatten multi-axis adapters first (adapter_report does)."
        )


def delta_svd(a: ArrayLike, b: ArrayLike, scale: float | ArrayLike = 1.0) -> DeltaSVD:
    """The thin SVD of ΔW = scale · A @ B, from the factors (ΔW is never formed).

    QR of A (in, rank) and of Bᵀ (out, rank), then the SVD of the small core
    scale · R_A · R_Bᵀ; the singular vectors are rotated back by Q_A and Q_B. Costs
    O((in + out) · rank²) instead of O(in · out · rank). Computed in float32.

    Args:
      a: A, (batch..., in, rank).
      b: B, (batch..., rank, out), with the same batch axes.
      scale: the factor on A @ B (an adapter record's `scale`).

    Returns:
      A `DeltaSVD` (u, s, v) with k = min(in, rank, out) singular triplets per batch index.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.analysis import delta_svd
      >>> a = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (in=3, rank=2)
      >>> b = jnp.array([[3.0, 0.0], [0.0, 1.0]])  # (rank=2, out=2)
      >>> u, s, v = delta_svd(a, b, 0.5)
      >>> s.round(4).tolist(), u.shape, v.shape
      ([1.5, 1.0], (3, 2), (2, 2))
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    _check_factors(a, b)
    return _delta_svd(a, b, jnp.asarray(scale, jnp.float32))


@jax.jit
def _delta_svd(a: Array, b: Array, scale: Array) -> DeltaSVD:
    q_a, r_a = jnp.linalg.qr(a)  # (in, ka), (ka, rank)
    q_b, r_b = jnp.linalg.qr(_t(b))  # (out, kb), (kb, rank)
    core = _mm(r_a, _t(r_b)) * scale  # (ka, kb)
    u_c, s, vt_c = jnp.linalg.svd(core, full_matrices=False)
    return DeltaSVD(_mm(q_a, u_c), s, _mm(q_b, _t(vt_c)))


def delta_spectrum(a: ArrayLike, b: ArrayLike, scale: float | ArrayLike = 1.0) -> Array:
    """The singular values of ΔW = scale · A @ B, from the factors (see `delta_svd`).

    Args:
      a: A, (batch..., in, rank).
      b: B, (batch..., rank, out), with the same batch axes.
      scale: the factor on A @ B.

    Returns:
      (batch..., k) singular values, descending, k = min(in, rank, out); zeros when B = 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.analysis import delta_spectrum
      >>> a = jnp.stack([jnp.eye(3, 2), 2 * jnp.eye(3, 2)])  # two layers, (2, in=3, rank=2)
      >>> b = jnp.stack([jnp.eye(2, 4), jnp.zeros((2, 4))])  # (2, rank=2, out=4)
      >>> delta_spectrum(a, b, 2.0).tolist()
      [[2.0, 2.0], [0.0, 0.0]]
    """
    return delta_svd(a, b, scale).s


# --------------------------------------------------------------------------- effective rank


def stable_rank(s: ArrayLike) -> Array:
    """The stable rank Σ sᵢ² / max(s)² of singular values `s` (last axis); 0 for all zeros.

    Example:
      >>> from lora_jax.analysis import stable_rank
      >>> stable_rank([2.0, 2.0, 0.0]).item(), stable_rank([0.0, 0.0]).item()
      (2.0, 0.0)
    """
    return _stable_rank(jnp.asarray(s, jnp.float32))


@jax.jit
def _stable_rank(s: Array) -> Array:
    s2 = jnp.square(s)
    top = jnp.max(s2, axis=-1)
    return jnp.where(top > 0, jnp.sum(s2, axis=-1) / jnp.where(top > 0, top, 1.0), 0.0)


def entropy_rank(s: ArrayLike) -> Array:
    """The effective rank exp(H(p)), p = s / Σ s (Roy & Vetterli 2007), over the last axis.

    Between 1 (one non-zero value) and the number of values (all equal); 0 for all zeros.

    Example:
      >>> from lora_jax.analysis import entropy_rank
      >>> entropy_rank([1.0, 1.0, 1.0, 1.0]).round(4).item(), entropy_rank([3.0, 0.0]).item()
      (4.0, 1.0)
    """
    return _entropy_rank(jnp.asarray(s, jnp.float32))


@jax.jit
def _entropy_rank(s: Array) -> Array:
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.where(total > 0, total, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.where(total[..., 0] > 0, jnp.exp(-jnp.sum(plogp, axis=-1)), 0.0)


def energy_rank(s: ArrayLike, fraction: float | ArrayLike = 0.9) -> Array:
    """The smallest k whose top-k singular values hold `fraction` of the energy Σ sᵢ²:
    ``Σ_{i<k} sᵢ² ≥ fraction · Σ sᵢ²`` over the values sorted descending (last axis).

    Args:
      s: singular values (batch..., n), in any order.
      fraction: the share of the energy, in (0, 1].

    Returns:
      (batch...) int32 ranks in [0, n]; 0 for all zeros.

    Example:
      >>> from lora_jax.analysis import energy_rank
      >>> s = [3.0, 1.0, 1.0]  # energies 9, 1, 1 of 11
      >>> energy_rank(s, 0.8).item(), energy_rank(s, 0.9).item(), energy_rank(s, 1.0).item()
      (1, 2, 3)
    """
    if isinstance(fraction, (int, float)) and not 0 < fraction <= 1:
        raise ValueError(f"energy_rank: fraction must be in (0, 1], got {fraction!r}.")
    return _energy_rank(jnp.asarray(s, jnp.float32), jnp.asarray(fraction, jnp.float32))


@jax.jit
def _energy_rank(s: Array, fraction: Array) -> Array:
    s2 = jnp.square(jnp.sort(s, axis=-1)[..., ::-1])
    cum = jnp.cumsum(s2, axis=-1)
    total = cum[..., -1:]
    # c_k for k = 1..n is nondecreasing; k = 0 (c_0 = 0) fails exactly when the target is > 0.
    short = (cum < fraction * total).sum(axis=-1)
    return jnp.where(total[..., 0] > 0, short + 1, 0).astype(jnp.int32)


# --------------------------------------------------------------------------- subspaces


def a_subspace(a: ArrayLike) -> Array:
    """The input-space directions of an A matrix, ordered by singular value: the left
    singular vectors of lora_jax's A (in, rank), which are the paper's right-singular
    unitary matrix of its A (rank, in) (Hu et al. 2021, §7.2).

    Args:
      a: A, (batch..., in, rank).

    Returns:
      (batch..., in, min(in, rank)) with orthonormal columns, for `subspace_similarity`.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.analysis import a_subspace
      >>> jnp.abs(a_subspace(jnp.array([[0.0, 1.0], [0.0, 0.0], [5.0, 0.0]]))).tolist()
      [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    """
    return jnp.linalg.svd(jnp.asarray(a, jnp.float32), full_matrices=False)[0]


def subspace_similarity(u1: ArrayLike, u2: ArrayLike) -> Array:
    """The normalized subspace similarity of Hu et al. 2021 (§7.2, eq. 4) for every pair of
    leading column counts: ``φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)``.

    φ is 1 when one span contains the other and 0 when they are orthogonal; for independent
    random subspaces of ℝᵈ, E[φ(i, j)] = max(i, j) / d.

    Args:
      u1: (batch..., d, r1) with orthonormal columns, most important first (`a_subspace`).
      u2: (batch..., d, r2) with orthonormal columns.

    Returns:
      (batch..., r1, r2): entry [i - 1, j - 1] is φ(i, j).

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.analysis import subspace_similarity
      >>> subspace_similarity(jnp.eye(3, 2), jnp.eye(3)[:, 1:]).tolist()  # span{e1,e2} vs {e2,e3}
      [[0.0, 0.0], [1.0, 0.5]]
    """
    u1, u2 = jnp.asarray(u1, jnp.float32), jnp.asarray(u2, jnp.float32)
    if u1.ndim < 2 or u1.shape[:-1] != u2.shape[:-1]:
        raise ValueError(
            f"subspace_similarity: U1 has shape {u1.shape} and U2 has shape {u2.shape}, but "
            "they must be (batch..., d, r1) and (batch..., d, r2) with the same batch axes and d."
        )
    return _subspace_similarity(u1, u2)


@jax.jit
def _subspace_similarity(u1: Array, u2: Array) -> Array:
    overlap = jnp.cumsum(jnp.cumsum(jnp.square(_mm(_t(u1), u2)), axis=-2), axis=-1)
    i = jnp.arange(1, u1.shape[-1] + 1)[:, None]
    j = jnp.arange(1, u2.shape[-1] + 1)[None, :]
    return overlap / jnp.broadcast_to(jnp.minimum(i, j), overlap.shape)


# --------------------------------------------------------------------------- amplification


class Amplification(NamedTuple):
    """How ΔW relates to W (Hu et al. 2021, §7.3): each entry has the batch axes of W.

    U, V are the top-k singular vectors of ΔW (k = its rank), and every projection is a
    Frobenius norm ‖Uᵀ W V‖_F of W onto k input and k output directions.

    Attributes:
      factor: ‖ΔW‖_F / ‖Uᵀ W V‖_F: how much ΔW amplifies the directions of W it lies along
        (0 when ΔW = 0; inf when W is zero along them).
      delta_norm: ‖ΔW‖_F.
      delta_projection: ‖Uᵀ W V‖_F, W on ΔW's directions.
      top_projection: W on its own top-k singular directions (the largest possible).
      random_projection: W on random orthonormal directions (seeded).
    """

    factor: Array
    delta_norm: Array
    delta_projection: Array
    top_projection: Array
    random_projection: Array


def _projection(w: Array, u: Array, v: Array) -> Array:
    return jnp.linalg.norm(_mm(_mm(_t(u), w), v), axis=(-2, -1))


def amplification(
    w: ArrayLike,
    a: ArrayLike,
    b: ArrayLike,
    scale: float | ArrayLike = 1.0,
    *,
    key: Array | None = None,
) -> Amplification:
    """How strongly ΔW = scale · A @ B amplifies the directions of W it lies along.

    With U (in, k), V (out, k) the top singular vectors of ΔW (`delta_svd`), the factor is
    ‖ΔW‖_F / ‖Uᵀ W V‖_F. For comparison, W projected onto its own top-k singular
    directions and onto k random orthonormal directions. The paper finds ΔW amplifies
    directions that W does not emphasize: ‖Uᵀ W V‖_F near the random projection, far below
    the top one, and a large factor.

    Args:
      w: the kernel, (batch..., in, out), float (dequantize a `QuantizedTensor` first).
      a: A, (batch..., in, rank).
      b: B, (batch..., rank, out).
      scale: the factor on A @ B.
      key: PRNG key of the random directions (default `jax.random.key(0)`).

    Returns:
      An `Amplification` (a NamedTuple of arrays with W's batch axes).

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.analysis import amplification
      >>> w = jnp.diag(jnp.array([4.0, 2.0, 1.0]))  # (in=3, out=3), known SVD
      >>> weak = amplification(w, jnp.eye(3)[:, 2:], jnp.eye(3)[2:], 3.0)  # ΔW along e3 ⊗ e3
      >>> weak.factor.item(), weak.delta_projection.item(), weak.top_projection.item()
      (3.0, 1.0, 4.0)
    """
    w = jnp.asarray(w, jnp.float32)
    svd = delta_svd(a, b, scale)
    u, v = svd.u, svd.v
    if w.shape[:-2] != u.shape[:-2] or w.shape[-2:] != (u.shape[-2], v.shape[-2]):
        raise ValueError(
            f"amplification: W has shape {w.shape} but A @ B is "
            f"{(*u.shape[:-2], u.shape[-2], v.shape[-2])}; both must be (batch..., in, out)."
        )
    key = jax.random.key(0) if key is None else key
    gauss = jax.random.normal(key, _gauss_shape(w.shape, svd.s.shape[-1]), jnp.float32)
    return _amplification(w, svd, gauss)


def _gauss_shape(w_shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    """The Gaussian draw of both sides' random directions: (batch..., in + out, k)."""
    return (*w_shape[:-2], w_shape[-2] + w_shape[-1], k)


@jax.jit
def _amplification(w: Array, svd: DeltaSVD, gauss: Array) -> Amplification:
    u, s, v = svd
    k, n_in = s.shape[-1], w.shape[-2]
    delta_norm = jnp.linalg.norm(s, axis=-1)
    projected = _projection(w, u, v)
    top = jnp.linalg.norm(jnp.linalg.svd(w, compute_uv=False)[..., :k], axis=-1)
    # Random orthonormal directions: the Q of a Gaussian matrix, one draw for both sides.
    rand = _projection(
        w, jnp.linalg.qr(gauss[..., :n_in, :])[0], jnp.linalg.qr(gauss[..., n_in:, :])[0]
    )
    safe = jnp.where(projected > 0, projected, 1.0)
    factor = jnp.where(projected > 0, delta_norm / safe, jnp.where(delta_norm > 0, jnp.inf, 0.0))
    return Amplification(factor, delta_norm, projected, top, rand)


# --------------------------------------------------------------------------- a whole tree


@dataclasses.dataclass(frozen=True)
class AdapterReport:
    """The figures of one adapter. Arrays have the adapter's leading axes: those of a
    stacked-layer model, then its geometry's batch axes (none for a plain Dense).

    Attributes:
      rank: the adapter's rank r.
      scale: its scale (alpha / rank, or alpha / sqrt(rank) with rsLoRA).
      shape: ΔW as a matrix, (fan_in, fan_out): the input axes flattened, then the output axes.
      singular_values: (lead..., k) of ΔW, descending; k = min(fan_in, r, fan_out).
      stable_rank, entropy_rank: (lead...) effective ranks (0 for ΔW = 0).
      rank_90, rank_99: (lead...) int32 ranks holding 90 % / 99 % of ΔW's energy.
      amplification: against the kernel (dequantized if 4-bit), or None when the kernel is
        absent, not floating point, or `with_amplification=False`.
    """

    rank: int
    scale: float
    shape: tuple[int, int]
    singular_values: Array
    stable_rank: Array
    entropy_rank: Array
    rank_90: Array
    rank_99: Array
    amplification: Amplification | None


def adapter_report(
    params: Mapping[str, Any], *, with_amplification: bool = True, seed: int = 0
) -> dict[str, AdapterReport]:
    """The spectrum, effective ranks and amplification of every adapter in a lora_jax tree.

    Reads each adapter's record (geometry, scale) from the "lora" collection. A multi-axis
    kernel is analysed as the matrix (fan_in, fan_out) that its geometry's axis split gives
    (input axes flattened, output axes flattened); batch axes (per-head kernels) and the
    stacked axis of an `nn.scan` model stay leading axes, one ΔW per index.

    Args:
      params: a variables dict as `lora_jax.init` returns (with its "lora" collection).
      with_amplification: also compute `amplification` against each kernel (an SVD of W).
      seed: seed of the random directions of `amplification`, combined with each adapted
        parameter's path (drawn with NumPy: a `jax.random` draw would compile per shape).

    Returns:
      Variables path of the adapted parameter (``params/.../kernel``; ``...@<name>`` for a
      named adapter) -> `AdapterReport`, sorted by path.

    Raises:
      ValueError: an adapter leaf is missing or does not fit its record, or an adapter is
        of a variant other than plain LoRA. Every bad adapter is listed.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax.adapters import Adapter, Geometry
      >>> from lora_jax.analysis import adapter_report
      >>> tree = {"params": {"q": {"kernel": jnp.eye(3), "kernel_lora_a": jnp.eye(3, 1),
      ...                          "kernel_lora_b": jnp.array([[0.0, 3.0, 4.0]])}},
      ...         "lora": {"q": {"kernel_lora": Adapter(Geometry((3, 3), 0, 1, 1), scale=2.0)}}}
      >>> r = adapter_report(tree)["params/q/kernel"]
      >>> r.rank, r.singular_values.round(4).tolist(), r.rank_90.item(), r.stable_rank.item()
      (1, [10.0], 1, 1.0)
    """
    out = {}
    for label, (record, a, b, kernel) in adapters(params, what="analyse").items():
        w = _kernel(kernel, record.geometry) if with_amplification else None
        gauss = None
        if w is not None:
            g = record.geometry
            shape = _gauss_shape(w.shape, min(g.fan_in, g.rank, g.fan_out))
            rng = np.random.default_rng((seed, zlib.crc32(label.encode())))
            gauss = rng.standard_normal(shape, np.float32)
        out[label] = _report(record, a, b, w, gauss)
    return out


def adapters(params: Mapping[str, Any], *, what: str = "read") -> dict[str, tuple]:
    """Label -> (record, A, B, kernel or None) of every plain-LoRA adapter in a lora_jax tree,
    sorted; A and B as stored (multi-axis, stacked). Every missing or misfit leaf and every
    adapter of another variant is listed in one ValueError ("Cannot {what}: ...")."""
    flat = _trees.flat(params)
    problems, found = [], {}
    for (param, name), record in sorted(Plan.of(params).adapters.items()):
        if record.variant != "lora":
            problems.append(
                f"Adapter of '{param}' is of variant {record.variant!r}: the analysis reads "
                "ΔW = scale · A @ B, plain LoRA only."
            )
            continue
        leaves = {}
        for leaf in variant_for(record.variant).leaves(record.geometry):
            path = _paths.leaf_path(param, leaf, name)
            if path not in flat:
                problems.append(f"Adapter of '{param}' lacks its leaf '{path}'.")
            else:
                leaves[leaf] = _trees.unbox(flat[path])
        if len(leaves) < 2:
            continue
        kernel = _trees.unbox(flat.get(param))
        stored = _stored_shape(record.geometry, leaves["a"]) if kernel is None else kernel.shape
        problems += record.geometry.problems(param, stored, {k: v.shape for k, v in leaves.items()})
        label = param if name == _paths.DEFAULT else f"{param}@{name}"
        found[label] = (record, leaves["a"], leaves["b"], kernel)
    _trees.raise_problems(f"Cannot {what}", problems)
    return found


def as_matrices(geometry: Geometry, a: Array, b: Array) -> tuple[Array, Array]:
    """A as (lead..., fan_in, rank) and B as (lead..., rank, fan_out): input axes and output
    axes flattened; batch axes (per-head) and stacked axes (nn.scan) stay leading."""
    g = geometry
    a_m = a.reshape((*a.shape[: a.ndim - g.n_in - 1], g.fan_in, g.rank))
    b_m = b.reshape((*b.shape[: g.b_rank_axis(b.ndim)], g.rank, g.fan_out))
    return a_m, b_m


def _stored_shape(geometry: Geometry, a: Array) -> tuple[int, ...]:
    """The kernel's stored shape as A implies it (stacked axes included), for an adapter
    whose kernel is absent from the tree."""
    lead = a.shape[: max(a.ndim - len(geometry.a_shape), 0)]
    return (*lead, *geometry.shape)


def _kernel(kernel: Any, geometry: Geometry) -> Array | None:
    """The kernel as (lead..., fan_in, fan_out) float32, or None when it cannot be read."""
    w = _trees.unbox(kernel)
    if isinstance(w, QuantizedTensor):
        w = dequantize(w, jnp.float32)
    if w is None or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        return None
    lead = w.ndim - len(geometry.shape) + geometry.n_batch
    return jnp.asarray(w, jnp.float32).reshape((*w.shape[:lead], geometry.fan_in, geometry.fan_out))


def _report(
    record: Adapter, a: Array, b: Array, w: Array | None, gauss: np.ndarray | None
) -> AdapterReport:
    g = record.geometry
    a_m, b_m = as_matrices(g, a, b)
    s, ranks, amp = _figures(a_m, b_m, w, jnp.float32(record.scale), gauss)
    return AdapterReport(
        rank=g.rank,
        scale=float(record.scale),
        shape=(g.fan_in, g.fan_out),
        singular_values=s,
        stable_rank=ranks[0],
        entropy_rank=ranks[1],
        rank_90=ranks[2],
        rank_99=ranks[3],
        amplification=amp,
    )


@jax.jit
def _figures(
    a: Array, b: Array, w: Array | None, scale: Array, gauss: Array | None
) -> tuple[Array, tuple[Array, ...], Amplification | None]:
    """One compiled call per adapter shape (eagerly, each small op would compile on its own)."""
    svd = delta_svd(a, b, scale)
    s = svd.s
    ranks = (stable_rank(s), entropy_rank(s), energy_rank(s, 0.9), energy_rank(s, 0.99))
    amp = None if w is None else _amplification(w, svd, gauss)
    return s, ranks, amp
