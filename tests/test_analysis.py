"""Tests for `lora_jax.analysis`.

The spectrum of ΔW from the factors equals the SVD of the dense ΔW (batched, under jit; the
singular vectors rebuild ΔW); effective ranks on constructed spectra (one value -> 1, r equal
values -> r, ΔW = 0 -> 0, never NaN); the subspace similarity is 1 for a subspace against
itself or a rotated basis of it, 0 for orthogonal ones and max(i, j) / d on average for
random ones; `a_subspace` is the paper's right-singular matrix of its A; amplification is
larger for a ΔW along W's weak directions than along its top ones (W of known SVD), batched,
seeded and under jit; `adapter_report` on a tiny Llama and on multi-axis, per-head and
scan-stacked kernels agrees with the SVD of ``merge(params) - W``, reads a 4-bit kernel
dequantized, and a bad or missing leaf raises naming its path.
"""

import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QC, randomize_adapters
from flax import traverse_util

import lora_jax as lj
from lora_jax import analysis
from lora_jax.adapters import Adapter, Geometry

F32_TOL = 1e-4  # relative to the largest singular value
_AMPLIFICATION = jax.jit(analysis.amplification)  # compiled once for the tests that share shapes


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _dense_svd(a, b, scale):
    delta = scale * np.einsum("...ir,...ro->...io", np.float64(a), np.float64(b))
    return delta, np.linalg.svd(delta, compute_uv=False)


# --------------------------------------------------------------------------- spectrum


@hypothesis.given(
    batch=st.sampled_from([(), (3,), (2, 2)]),
    fan_in=st.integers(1, 12),
    fan_out=st.integers(1, 12),
    rank=st.integers(1, 6),
    scale=st.sampled_from([0.5, 2.0, -1.5]),
    seed=st.integers(0, 2**16),
)
def test_spectrum_from_factors_equals_dense_svd(batch, fan_in, fan_out, rank, scale, seed):
    a, b = _normal(seed, (*batch, fan_in, rank)), _normal(seed + 1, (*batch, rank, fan_out))
    delta, expected = _dense_svd(a, b, scale)
    k = min(fan_in, rank, fan_out)
    u, s, v = analysis.delta_svd(a, b, scale)
    chex.assert_shape((u, s, v), ((*batch, fan_in, k), (*batch, k), (*batch, fan_out, k)))
    tol = F32_TOL * max(1.0, float(np.max(expected, initial=0.0)))
    np.testing.assert_allclose(s, expected[..., :k], atol=tol)
    np.testing.assert_allclose(analysis.delta_spectrum(a, b, scale), s)
    rebuilt = np.einsum("...ik,...k,...ok->...io", u, s, v)
    np.testing.assert_allclose(rebuilt, delta, atol=tol)
    eye = np.broadcast_to(np.eye(k), (*batch, k, k))
    for x in (u, v):  # orthonormal columns
        np.testing.assert_allclose(np.swapaxes(x, -1, -2) @ x, eye, atol=1e-4)


def test_spectrum_under_jit_matches_eager():
    a, b = _normal(1, (4, 16, 3)), _normal(2, (4, 3, 8))
    jitted = jax.jit(analysis.delta_spectrum)(a, b, jnp.float32(0.25))
    chex.assert_trees_all_close(jitted, analysis.delta_spectrum(a, b, 0.25), atol=1e-5)


def test_spectrum_of_bf16_factors_is_float32():
    a, b = (
        jnp.asarray(_normal(3, (8, 2)), jnp.bfloat16),
        jnp.asarray(_normal(4, (2, 8)), jnp.bfloat16),
    )
    s = analysis.delta_spectrum(a, b)
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(s, _dense_svd(np.float32(a), np.float32(b), 1.0)[1][:2], rtol=1e-4)


def test_zero_delta_gives_zero_spectrum_and_ranks():
    a, b = _normal(5, (3, 12, 2)), np.zeros((3, 2, 10), np.float32)  # B = 0 at init
    s = analysis.delta_spectrum(a, b, 2.0)
    np.testing.assert_array_equal(s, np.zeros((3, 2)))
    for rank in (analysis.stable_rank(s), analysis.entropy_rank(s), analysis.energy_rank(s, 0.9)):
        np.testing.assert_array_equal(rank, np.zeros(3))
    amp = _AMPLIFICATION(_normal(6, (3, 12, 10)), a, b, 2.0, key=jax.random.key(0))
    assert not any(np.isnan(np.asarray(x)).any() for x in amp)
    np.testing.assert_array_equal(amp.factor, np.zeros(3))


def test_mismatched_factors_raise():
    with pytest.raises(ValueError, match=r"A has shape \(8, 2\) and B has shape \(3, 4\)"):
        analysis.delta_spectrum(np.ones((8, 2)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="same batch axes"):
        analysis.delta_spectrum(np.ones((2, 8, 2)), np.ones((3, 2, 4)))


# --------------------------------------------------------------------------- effective ranks


@pytest.mark.parametrize("r", [1, 4, 16])
def test_ranks_of_constructed_spectra(r):
    one = np.zeros(r, np.float32)
    one[0] = 3.0
    equal = np.full(r, 0.7, np.float32)
    for s, expected in ((one, 1), (equal, r)):
        assert float(analysis.stable_rank(s)) == pytest.approx(expected, rel=1e-5)
        assert float(analysis.entropy_rank(s)) == pytest.approx(expected, rel=1e-5)
        assert int(analysis.energy_rank(s, 1.0)) == expected
        assert int(analysis.energy_rank(s, 0.5)) == (expected + 1) // 2 if expected > 1 else 1


def test_energy_rank_counts_the_top_energy_in_any_order():
    s = np.array([1.0, 0.0, 3.0, 1.0], np.float32)  # energies 9, 1, 1, 0 of 11
    assert [int(analysis.energy_rank(s, f)) for f in (0.5, 9 / 11, 0.9, 0.99, 1.0)] == [
        1,
        1,
        2,
        3,
        3,
    ]
    batched = analysis.energy_rank(np.stack([s, np.zeros(4, np.float32)]), 0.9)
    assert batched.dtype == jnp.int32 and batched.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        analysis.energy_rank(s, 1.5)


def test_ranks_are_batched_and_lie_between_one_and_r():
    s = np.sort(np.abs(_normal(7, (5, 6))), axis=-1)[..., ::-1]
    for rank in (analysis.stable_rank(s), analysis.entropy_rank(s)):
        chex.assert_shape(rank, (5,))
        assert np.all((np.asarray(rank) >= 1 - 1e-6) & (np.asarray(rank) <= 6 + 1e-5))


# --------------------------------------------------------------------------- subspaces


def _orthonormal(seed, d, r):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, r)))[0].astype(np.float32)


def test_similarity_of_a_subspace_with_itself_and_a_rotation_of_it():
    u = _orthonormal(8, 32, 6)
    np.testing.assert_allclose(analysis.subspace_similarity(u, u), np.ones((6, 6)), atol=1e-5)
    rotated = u @ _orthonormal(9, 6, 6)  # another basis of the same span
    phi = np.asarray(analysis.subspace_similarity(u, rotated))
    np.testing.assert_allclose(phi[:, -1], 1.0, atol=1e-5)  # span U[:, :i] ⊂ span(rotated)
    np.testing.assert_allclose(phi[-1, :], 1.0, atol=1e-5)
    assert np.all(phi <= 1 + 1e-5) and np.all(phi >= 0)


def test_similarity_of_orthogonal_subspaces_is_zero():
    q = _orthonormal(10, 16, 8)
    np.testing.assert_allclose(analysis.subspace_similarity(q[:, :4], q[:, 4:]), 0.0, atol=1e-6)


def test_similarity_of_random_subspaces_averages_max_i_j_over_d():
    d, r, draws = 24, 6, 200
    rng = np.random.default_rng(11)
    u1 = np.linalg.qr(rng.standard_normal((draws, d, r)))[0].astype(np.float32)
    u2 = np.linalg.qr(rng.standard_normal((draws, d, r)))[0].astype(np.float32)
    phi = np.asarray(analysis.subspace_similarity(u1, u2))  # batched: (draws, r, r)
    i, j = np.meshgrid(np.arange(1, r + 1), np.arange(1, r + 1), indexing="ij")
    # E‖P1ᵀP2‖²_F = i·j/d for independent uniform subspaces, so E[φ] = max(i, j)/d.
    np.testing.assert_allclose(phi.mean(axis=0), np.maximum(i, j) / d, atol=0.03)


def test_a_subspace_is_the_papers_right_singular_matrix():
    a = _normal(12, (20, 4))  # lora_jax layout (in, r); the paper's A is aᵀ (r, in)
    u = np.asarray(analysis.a_subspace(a))
    paper = np.linalg.svd(a.T)[2][:4].T  # right-singular vectors of the paper's A, (in, r)
    np.testing.assert_allclose(np.abs(u.T @ paper), np.eye(4), atol=1e-4)  # same up to sign
    phi = analysis.subspace_similarity(u, paper)
    np.testing.assert_allclose(phi, np.ones((4, 4)), atol=1e-4)


# --------------------------------------------------------------------------- amplification


def test_amplification_is_larger_along_weak_directions_of_w():
    d_in, d_out, r = 12, 10, 2  # the shapes of the other amplification tests: one compile
    u, v = _orthonormal(13, d_in, d_out), _orthonormal(14, d_out, d_out)
    sigma = np.geomspace(10.0, 0.1, d_out).astype(np.float32)
    w = (u * sigma) @ v.T  # W = U diag(σ) Vᵀ, (in, out)
    top_dirs, weak_dirs, middle = slice(0, r), slice(-r, None), slice(4, 4 + r)
    cases = [(u[:, c], v[:, c].T) for c in (top_dirs, weak_dirs, middle)]
    a, b = (np.stack(x) for x in zip(*cases, strict=True))
    top, weak, mid = zip(
        *_AMPLIFICATION(np.stack([w] * 3), a, b, 1.0, key=jax.random.key(0)), strict=True
    )
    assert float(weak[0]) > 5 * float(mid[0]) and float(mid[0]) > 5 * float(top[0])  # factors
    for amp, c in ((top, top_dirs), (weak, weak_dirs), (mid, middle)):
        factor, delta_norm, delta_projection, top_projection, random_projection = map(float, amp)
        assert delta_projection == pytest.approx(np.linalg.norm(sigma[c]), rel=1e-3)
        assert factor == pytest.approx(np.sqrt(r) / np.linalg.norm(sigma[c]), rel=1e-3)
        assert delta_norm == pytest.approx(np.sqrt(r), rel=1e-4)
        assert top_projection == pytest.approx(np.linalg.norm(sigma[:r]), rel=1e-4)
        assert 0 < random_projection < top_projection


def test_amplification_is_batched_seeded_and_jits():
    w, a, b = _normal(15, (3, 12, 10)), _normal(16, (3, 12, 2)), _normal(17, (3, 2, 10))
    amp = _AMPLIFICATION(w, a, b, 0.5, key=jax.random.key(1))
    chex.assert_shape(tuple(amp), [(3,)] * 5)
    delta = np.linalg.norm(0.5 * np.float64(a) @ b, axis=(-2, -1))
    np.testing.assert_allclose(amp.delta_norm, delta, rtol=1e-5)
    np.testing.assert_allclose(amp.factor, amp.delta_norm / amp.delta_projection, rtol=1e-5)
    assert np.all(amp.delta_projection <= amp.top_projection * (1 + 1e-5))
    other = _AMPLIFICATION(w, a, b, 0.5, key=jax.random.key(2))
    assert not np.allclose(other.random_projection, amp.random_projection)
    with pytest.raises(ValueError, match=r"W has shape \(3, 10, 12\)"):
        analysis.amplification(np.swapaxes(w, -1, -2), a, b)


# --------------------------------------------------------------------------- adapter_report


def _check_against_merge(params, expected_keys):
    """adapter_report agrees with the SVD of merge(params) - W (dequantized if 4-bit), as the
    adapter's geometry flattens it."""
    report = analysis.adapter_report(params)
    assert sorted(report) == sorted(expected_keys)
    merged = traverse_util.flatten_dict(lj.merge(params), sep="/")
    base = traverse_util.flatten_dict(lj.quant.dequantize(params, jnp.float32), sep="/")
    plan = lj.adapters.Plan.of(params)
    for (path, _), record in plan.adapters.items():
        g, got = record.geometry, report[path]
        delta = np.float64(merged[path]) - np.float64(base[path])
        lead = delta.ndim - len(g.shape) + g.n_batch
        delta = delta.reshape((*delta.shape[:lead], g.fan_in, g.fan_out))
        expected = np.linalg.svd(delta, compute_uv=False)[..., : g.rank]
        assert got.rank == g.rank and got.scale == record.scale
        assert got.shape == (g.fan_in, g.fan_out)
        np.testing.assert_allclose(got.singular_values, expected, atol=1e-3 * expected.max())
        energy = np.square(expected)
        stable = energy.sum(-1) / energy.max(-1)
        np.testing.assert_allclose(got.stable_rank, stable, rtol=1e-3)
        rank_99 = (np.cumsum(energy, -1) < 0.99 * energy.sum(-1, keepdims=True)).sum(-1) + 1
        np.testing.assert_array_equal(got.rank_99, rank_99)
        amp = got.amplification
        assert amp is not None and np.all(np.asarray(amp.factor) > 0)
        np.testing.assert_allclose(amp.delta_norm, np.linalg.norm(delta, axis=(-2, -1)), rtol=1e-3)
    return report


def _random_base(model, *sample):
    """Base variables drawn with NumPy from the model's abstract init (compiles nothing)."""
    rng = np.random.default_rng(0)
    draw = lambda s: jnp.asarray((0.05 * rng.standard_normal(s.shape)).astype(s.dtype))
    return jax.tree.map(draw, jax.eval_shape(model.init, jax.random.key(0), *sample))


def test_adapter_report_on_a_tiny_llama_agrees_with_merge():
    from lora_jax.models import Llama, LlamaConfig

    model, tokens = Llama(LlamaConfig.tiny(num_layers=1)), jnp.zeros((1, 8), jnp.int32)
    base = _random_base(model, tokens)
    cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), tokens, base_params=base)
    zero = analysis.adapter_report(params)  # B = 0 at init
    assert all(float(r.entropy_rank) == 0.0 == float(r.amplification.factor) for r in zero.values())
    params = randomize_adapters(params, jax.random.key(2), 0.1)
    keys = [f"params/layers_0/self_attn/{p}/kernel" for p in ("q_proj", "v_proj")]
    _check_against_merge(params, keys)


def test_adapter_report_of_multi_axis_per_head_and_stacked_kernels():
    def adapter(kernel, shape, n_batch, n_in, seed):
        g = Geometry(shape, n_batch, n_in, 4)
        lead = tuple(kernel.shape[: len(kernel.shape) - len(shape)])
        leaves = {"kernel": kernel, "kernel_lora_a": _normal(seed, (*lead, *g.a_shape)),
                  "kernel_lora_b": _normal(seed + 1, (*lead, *g.b_shape))}  # fmt: skip
        return leaves, {"kernel_lora": Adapter(g, 0.5)}

    # ΔW as matrices (64, 32), (64, 64) and (2, 64, 32), as in the Llama test: few compiles.
    layers = {
        "join": adapter(_normal(18, (2, 32, 32)), (2, 32, 32), 0, 2, 30),  # in axes (2, 32)
        "split": adapter(_normal(19, (64, 2, 32)), (64, 2, 32), 0, 1, 40),  # out axes (2, 32)
        "heads": adapter(_normal(20, (2, 64, 32)), (2, 64, 32), 1, 1, 50),  # per-head batch axis
        "stack": adapter(_normal(21, (2, 64, 32)), (64, 32), 0, 1, 60),  # nn.scan layer axis
    }
    tree = {
        "params": {name: leaves for name, (leaves, _) in layers.items()},
        "lora": {name: record for name, (_, record) in layers.items()},
    }
    report = _check_against_merge(tree, [f"params/{name}/kernel" for name in layers])
    assert report["params/join/kernel"].shape == (64, 32)
    assert report["params/split/kernel"].shape == (64, 64)
    for name in ("heads", "stack"):  # one ΔW per head / per layer
        assert report[f"params/{name}/kernel"].singular_values.shape == (2, 4)
        assert report[f"params/{name}/kernel"].amplification.factor.shape == (2,)


def test_adapter_report_reads_a_4bit_kernel_dequantized():
    # Checked without merge: merge decodes op by op, which compiles slowly on first use.
    w = _normal(22, (64, 32))
    q4 = lj.quant.quantize_array(w, QC(block_size=32))
    a, b = _normal(23, (64, 4)), _normal(24, (4, 32))
    tree = {
        "params": {"q": {"kernel": q4, "kernel_lora_a": a, "kernel_lora_b": b}},
        "lora": {"q": {"kernel_lora": Adapter(Geometry((64, 32), 0, 1, 4), 0.5)}},
    }
    report = analysis.adapter_report(tree)["params/q/kernel"]
    dense = np.float64(jax.jit(lj.quant.dequantize)(q4))
    assert 0 < np.abs(dense - w).max() < 0.5  # the 4-bit grid, not the float kernel
    top = np.linalg.norm(np.linalg.svd(dense, compute_uv=False)[:4])
    assert float(report.amplification.top_projection) == pytest.approx(top, rel=1e-4)
    u, s, v = np.linalg.svd(0.5 * np.float64(a) @ b, full_matrices=False)
    np.testing.assert_allclose(report.singular_values, s[:4], rtol=1e-4)
    projection = np.linalg.norm(u[:, :4].T @ dense @ v[:4].T)
    assert float(report.amplification.delta_projection) == pytest.approx(projection, rel=1e-3)
    plain = analysis.adapter_report(tree, with_amplification=False)["params/q/kernel"]
    assert plain.amplification is None
    np.testing.assert_array_equal(plain.singular_values, report.singular_values)


def test_adapter_report_of_a_bad_leaf_names_its_path():
    tree = {
        "params": {"q": {"kernel": jnp.ones((6, 4)), "kernel_lora_a": jnp.ones((6, 3)),
                         "kernel_lora_b": jnp.ones((2, 4))}},
        "lora": {"q": {"kernel_lora": Adapter(Geometry((6, 4), 0, 1, 2), 1.0)}},
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"Cannot analyse: Adapter leaf 'a' of 'params/q/kernel'"):
        analysis.adapter_report(tree)
    del tree["params"]["q"]["kernel_lora_b"]
    with pytest.raises(ValueError, match=r"lacks its leaf 'params/q/kernel_lora_b'"):
        analysis.adapter_report(tree)


# --------------------------------------------------------------------------- two trees


def _tree(a, b, scale=1.0, shape=None):
    shape = shape or (a.shape[0], b.shape[1])
    g = Geometry(shape, 0, 1, a.shape[-1])
    return {"params": {"q": {"kernel_lora_a": a, "kernel_lora_b": b}},
            "lora": {"q": {"kernel_lora": Adapter(g, scale)}}}  # fmt: skip


def test_compare_adapters_of_nested_ranks_and_every_side():
    a8, b8 = _normal(30, (32, 8)), _normal(31, (8, 16))
    small = _tree(a8[:, :2], b8[:2])  # the r = 2 adapter spans part of the r = 8 one
    big = _tree(a8, b8)
    for side in analysis.SIDES:
        phi = analysis.compare_adapters(small, big, side=side)["params/q/kernel"]
        chex.assert_shape(phi, (2, 8))
        same = analysis.compare_adapters(big, big, side=side)["params/q/kernel"]
        np.testing.assert_allclose(same, np.ones((8, 8)), atol=1e-5)  # a span against itself
    # A's side: span(A_2) lies in span(A_8), so phi(i, 8) = 1 for every i.
    phi_a = analysis.compare_adapters(small, big)["params/q/kernel"]
    np.testing.assert_allclose(phi_a[:, -1], 1.0, atol=1e-5)
    other = _tree(_normal(32, (32, 8)), _normal(33, (8, 16)))  # independent: ~ max(i, j) / 32
    phi_r = analysis.compare_adapters(small, other)["params/q/kernel"]
    assert float(phi_r[0, 0]) < 0.5 and float(phi_r[:, -1].mean()) < 0.6


def test_compare_adapters_bad_input_names_what():
    a, b = _normal(34, (8, 2)), _normal(35, (2, 4))
    with pytest.raises(ValueError, match="side must be one of a, b, delta_in, delta_out"):
        analysis.compare_adapters(_tree(a, b), _tree(a, b), side="left")
    wide = _tree(_normal(36, (8, 2)), _normal(37, (2, 6)))
    with pytest.raises(
        ValueError, match=r"Cannot compare: 'params/q/kernel' .* \(8, 4\) .* \(8, 6\)"
    ):
        analysis.compare_adapters(_tree(a, b), wide)
    elsewhere = {
        "params": {"k": _tree(a, b)["params"]["q"]},
        "lora": {"k": _tree(a, b)["lora"]["q"]},
    }
    with pytest.raises(ValueError, match=r"no adapter in common.*params/k/kernel"):
        analysis.compare_adapters(_tree(a, b), elsewhere)


# --------------------------------------------------------------------------- the report command


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory, and two adapters on it: rank 2
    (lora_jax files) and rank 4 (PEFT files)."""
    from lora_jax.hf import save_peft, save_pretrained
    from lora_jax.models import Llama, LlamaConfig

    root = tmp_path_factory.mktemp("analysis")
    model, tokens = Llama(LlamaConfig.tiny(num_layers=2)), jnp.zeros((1, 8), jnp.int32)
    base = _random_base(model, tokens)
    save_pretrained(root / "base", model, base)
    trees = {}
    for rank, save in ((2, lj.save_adapter), (4, save_peft)):
        cfg = lj.LoraConfig(rank=rank, targets=("q_proj", "v_proj"))
        params = lj.init(lj.LoRA(model, cfg), jax.random.key(rank), tokens, base_params=base)
        trees[rank] = randomize_adapters(params, jax.random.key(rank), 0.1)
        save(root / f"r{rank}", trees[rank], cfg)
    return root, trees


def test_report_command_prints_tables_and_writes_plots(saved_run, capsys):
    from lora_jax.analysis import report

    root, trees = saved_run
    out = root / "out"
    result = report.main([str(root / "r2"), str(root / "r4"), "--base", str(root / "base"),
                          "--out", str(out), "--panels", "2"])  # fmt: skip
    text = capsys.readouterr().out
    assert "layers_0/self_attn/q_proj" in text and "top direction shared" in text
    expected = analysis.adapter_report(trees[2])
    by_module = sorted(expected, key=lambda k: (k.split("/")[3], k))  # module, then depth
    assert [r["adapter"] for r in result["spectra"]] == by_module
    for row in result["spectra"]:
        np.testing.assert_allclose(
            row["singular_values"], expected[row["adapter"]].singular_values, rtol=1e-4
        )
    phis = analysis.compare_adapters(trees[2], trees[4])
    for row in result["similarity"]["rows"]:
        np.testing.assert_allclose(row["phi"], phis[row["adapter"]], atol=1e-5)
        assert row["random_mean"] == pytest.approx(np.mean([[max(i, j) for j in range(1, 5)]
                                                            for i in (1, 2)]) / 64)  # fmt: skip
    written = {p.name for p in out.iterdir()}
    assert written == {"report.json", "spectra.png", "phi_q_proj.png", "phi_v_proj.png"}


def test_report_command_bad_input_is_one_line(saved_run, capsys):
    from lora_jax.analysis import report

    root, _ = saved_run
    for argv, message in [
        ([str(root / "nowhere"), "--base", str(root / "base")], "ADAPTER '.*nowhere' is not a directory"),
        ([str(root / "base"), "--base", str(root / "base")], "is not an adapter directory"),
        ([str(root / "r2"), "--base", str(root / "r2")], "--base .*r2"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
