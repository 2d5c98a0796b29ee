"""4-bit base weights: formats, packing, double quantization, the dequantizing matmul and its
Pallas kernel (interpret mode), quantized layers under LoRA, and merge semantics."""

import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import F32_REL_TOL, assert_close, leaves_by_path, randomize_adapters, same_arrays
from hypothesis import given
from jax.ad_checkpoint import print_saved_residuals

import lora_jax as lj
from lora_jax import quant
from lora_jax.adapters import Adapter, Geometry
from lora_jax.quant import pallas as dequant_matmul
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

F32 = jnp.float32
DEQ = jax.jit(lambda qt: quant.dequantize(qt))
QC = lambda **kw: lj.QuantConfig(**{"compute_dtype": F32, **kw})  # noqa: E731

# bitsandbytes get_4bit_type("nf4"), the QLoRA code.
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def rel_rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b**2)))


# --------------------------------------------------------------------------- formats


def test_nf4_code_values_are_qloras():
    assert list(quant.NF4) == QLORA_NF4
    assert all(len(t) == 16 for t in quant.TABLES.values())
    assert max(map(abs, quant.FP4)) == 1.0 and max(map(abs, quant.INT4[1:])) == 1.0


# Measured on 256x512 standard-normal weights: nf4 0.0917, fp4 0.1052, int4 0.1060 (same with
# and without double quantization to 3 digits). NF4 at block 64 keeps the relative RMS error
# near 9%, the level QLoRA's NF4 reaches (about 10% worse with fp4/int4 codes).
@pytest.mark.parametrize("fmt,bound", [("nf4", 0.095), ("fp4", 0.11), ("int4", 0.11)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_on_gaussian_weights(fmt, bound, double_quant):
    w = jax.random.normal(jax.random.key(0), (256, 512))
    qt = quant.quantize_array(w, QC(fmt=fmt, double_quant=double_quant))
    assert qt.shape == w.shape and qt.codes.dtype == jnp.uint8
    assert rel_rms(quant.dequantize(qt), w) < bound


def test_nf4_beats_int4_on_gaussian_weights():
    w = jax.random.normal(jax.random.key(1), (256, 256))
    err = {
        f: rel_rms(quant.dequantize(quant.quantize_array(w, QC(fmt=f))), w) for f in quant.TABLES
    }
    assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"]


@given(
    fmt=st.sampled_from(sorted(quant.TABLES)),
    k=st.integers(4, 70),
    n=st.integers(1, 9),
    block=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_grid_values_round_trip_exactly(fmt, k, n, block, seed):
    """Weights already on a block's grid come back bit for bit (quantize is idempotent)."""
    w = jax.random.normal(jax.random.key(seed), (k, n)) * 3.0
    qt = quant.quantize_array(w, QC(fmt=fmt, block_size=block, double_quant=False))
    again = quant.quantize_array(DEQ(qt), QC(fmt=fmt, block_size=block, double_quant=False))
    chex.assert_trees_all_equal(DEQ(again), DEQ(qt))


def test_packing_order():
    """Row j of a block goes to the low nibble of byte row j, row j + block/2 to the high one."""
    t = quant.NF4
    column = jnp.array([t[3], t[15], t[7], t[0], t[9], t[15], t[1], t[2]], F32)[:, None]
    qt = quant.quantize_array(column, QC(block_size=4, double_quant=False))
    expected = [3 | (7 << 4), 15 | (0 << 4), 9 | (1 << 4), 15 | (2 << 4)]
    assert qt.codes[:, 0].tolist() == expected
    same_arrays(qt.scales, [[1.0], [1.0]])
    chex.assert_trees_all_equal(quant.dequantize(qt), column)


def test_double_quant_size():
    w = jax.random.normal(jax.random.key(2), (1024, 1024))
    dq = quant.quantize_array(w, QC())
    plain = quant.quantize_array(w, QC(double_quant=False))
    # 4 + 8/64 + 64/(64*256) bits: a code per scale, a float32 range per 256 scales.
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 64 / (64 * 256))
    assert dq.bits_per_weight < 4.13
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert rel_rms(quant.dequantize(dq), w) < 1.01 * rel_rms(quant.dequantize(plain), w)


def test_padding_when_block_does_not_divide():
    w = jax.random.normal(jax.random.key(3), (100, 7))
    qt = quant.quantize_array(w, QC(block_size=64))
    assert qt.codes.shape == (64, 7)  # K padded to 128, two codes per byte
    assert quant.dequantize(qt).shape == (100, 7)
    assert rel_rms(quant.dequantize(qt), w) < 0.095


def test_multi_axis_and_leading_axes():
    w = jax.random.normal(jax.random.key(4), (3, 4, 16, 2, 5))
    qt = quant.quantize_array(w, QC(block_size=32), n_lead=1, n_in=2)
    assert (qt.lead_shape, qt.in_shape, qt.out_shape) == ((3,), (4, 16), (2, 5))
    assert quant.dequantize(qt).shape == w.shape
    # Slicing every leaf on the leading axis slices the tensor (what nn.scan does).
    first = jax.tree.map(lambda leaf: leaf[1], qt)
    same_arrays(quant.dequantize(first), quant.dequantize(qt)[1])


def test_zero_block_and_dtypes():
    w = jnp.zeros((64, 3), jnp.bfloat16).at[:, 0].set(1.5)
    qt = quant.quantize_array(w, lj.QuantConfig())
    out = quant.dequantize(qt)
    assert out.dtype == jnp.bfloat16
    chex.assert_trees_all_close(out.astype(F32), w.astype(F32), atol=0.02)
    assert quant.dequantize(qt, F32).dtype == F32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fmt="nf3"), "QuantConfig.fmt"),
        (dict(block_size=48), "QuantConfig.block_size"),
        (dict(block_size=1), "QuantConfig.block_size"),
        (dict(compute_dtype=jnp.int8), "QuantConfig.compute_dtype"),
        (dict(kernel="cuda"), "QuantConfig.kernel"),
    ],
)
def test_quant_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.QuantConfig(**kwargs)


def test_quantize_array_errors():
    with pytest.raises(ValueError, match="'enc/kernel'.*block_size 64 is larger"):
        quant.quantize_array(jnp.ones((32, 8)), QC(), path="enc/kernel")
    with pytest.raises(TypeError, match="'ids'.*floating"):
        quant.quantize_array(jnp.ones((64, 8), jnp.int32), QC(), path="ids")
    with pytest.raises(ValueError, match="'norm/scale'.*contraction and one output"):
        quant.quantize_array(jnp.ones((128,)), QC(), path="norm/scale")


def test_quantize_tree_defaults_and_paths():
    params = {"a": {"kernel": jnp.ones((64, 4)), "bias": jnp.ones(4)}, "emb": jnp.ones((64, 4))}
    out = lj.quantize(params, QC())
    assert isinstance(out["a"]["kernel"], lj.QuantizedTensor)
    assert out["a"]["bias"] is params["a"]["bias"] and out["emb"] is params["emb"]
    back = lj.dequantize(out)
    same_arrays(back["a"]["kernel"], params["a"]["kernel"])
    with pytest.raises(ValueError, match="not in the tree.*'a/nope'"):
        lj.quantize(params, QC(), paths={"a/nope": (0, 1)})
    with pytest.raises(ValueError, match="'a/kernel' is already quantized"):
        lj.quantize(out, QC(), paths={"a/kernel": (0, 1)})


# --------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_qmatmul_gradient_and_residuals(kernel, capsys):
    w = jax.random.normal(jax.random.key(5), (96, 80))
    qt = quant.quantize_array(w, QC(block_size=32))
    x = jax.random.normal(jax.random.key(6), (3, 96))
    dense = quant.dequantize(qt)
    f = lambda x: jnp.sum(jnp.sin(quant.qmatmul(x, qt, kernel)))  # noqa: E731
    g = lambda x: jnp.sum(jnp.sin(x @ dense))  # noqa: E731
    assert_close(jax.grad(f)(x), jax.grad(g)(x), F32)
    print_saved_residuals(f, x)
    saved = capsys.readouterr().out
    assert "u8[48,80]" in saved  # the packed codes
    assert "f32[96,80]" not in saved and "f32[80,96]" not in saved  # never a dense kernel


def test_qmatmul_has_no_gradient_for_the_frozen_tensor():
    qt = quant.quantize_array(jnp.ones((64, 16)), QC())
    grads = jax.grad(lambda q, x: jnp.sum(quant.qmatmul(x, q)), allow_int=True)(
        qt, jnp.ones((2, 64))
    )
    assert not any(
        np.any(np.asarray(leaf, dtype=np.float64))
        for leaf in jax.tree.leaves(grads)
        if leaf.dtype != jax.dtypes.float0
    )


@given(
    m=st.integers(1, 5),
    k=st.integers(8, 80),
    n=st.integers(1, 24),
    block=st.sampled_from([8, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_qmatmul_equals_dense_product(m, k, n, block, dtype, seed):
    keys = jax.random.split(jax.random.key(seed))
    qt = quant.quantize_array(
        jax.random.normal(keys[0], (k, n)), lj.QuantConfig(block_size=block, compute_dtype=dtype)
    )
    x = jax.random.normal(keys[1], (2, m, k)).astype(dtype)
    out = jax.jit(quant.qmatmul)(x, qt)
    chex.assert_shape(out, (2, m, n))
    chex.assert_type(out, dtype)
    expected = x.astype(F32) @ jax.jit(quant.dequantize, static_argnums=1)(qt, F32)
    assert_close(out, expected, dtype)


def test_summary_and_nbytes_work_on_abstract_trees():
    qt = quant.quantize_array(jnp.ones((128, 64)), QC())
    abstract = jax.eval_shape(lambda q: q, qt)
    assert abstract.nbytes == qt.nbytes and abstract.shape == (128, 64)


@pytest.mark.parametrize("fmt", sorted(quant.TABLES))
@pytest.mark.parametrize("m,k,n,block", [(1, 64, 32, 32), (17, 100, 48, 32), (5, 128, 64, 64)])
@pytest.mark.parametrize("transpose", [False, True])
def test_pallas_kernel_matches_reference(fmt, m, k, n, block, transpose):
    w = jax.random.normal(jax.random.key(7), (k, n))
    qt = quant.quantize_array(w, QC(fmt=fmt, block_size=block))
    x = jax.random.normal(jax.random.key(8), (m, n if transpose else k))
    dense = quant.dequantize(qt)
    expected = x @ (dense.T if transpose else dense)
    out = dequant_matmul.pallas_matmul(x, qt, transpose=transpose, interpret=True)
    assert out.shape == expected.shape
    assert_close(out, expected, F32)


def test_pallas_kernel_in_bfloat16():
    w = jax.random.normal(jax.random.key(9), (128, 64))
    qt = quant.quantize_array(w, lj.QuantConfig())
    x = jax.random.normal(jax.random.key(10), (16, 128)).astype(jnp.bfloat16)
    out = dequant_matmul.pallas_matmul(x, qt, interpret=True)
    assert out.dtype == jnp.bfloat16
    expected = x.astype(F32) @ quant.dequantize(qt, F32)
    assert_close(out, expected, jnp.bfloat16)


def test_kernel_selection(monkeypatch):
    qt = quant.quantize_array(jnp.ones((64, 32)), QC())
    x = jnp.ones((2, 64))
    calls = []
    real = dequant_matmul.pallas_matmul
    monkeypatch.setattr(dequant_matmul, "pallas_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    # Only kernel="pallas" runs the Pallas kernel; "auto" is XLA's path on every backend.
    for kernel, used in (("xla", 0), ("auto", 0), ("pallas", 1)):
        out = quant.matmul._matmul(kernel, x, qt, transpose=False)
        assert len(calls) == used, kernel
        assert_close(out, x @ quant.dequantize(qt, F32), jnp.float32)
        calls.clear()
    small = quant.quantize_array(jnp.ones((64, 32)), QC(block_size=16))
    assert not dequant_matmul.supported(small)
    with pytest.raises(ValueError, match="block_size >= 32"):
        dequant_matmul.pallas_matmul(x, small)


# --------------------------------------------------------------------------- layers


class Layers(nn.Module):
    """Every linear layer kind, with and without bias, with multi-axis and batch kernels."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(64, name="dense")(x)
        h = nn.DenseGeneral((2, 32), use_bias=False, name="split")(h)  # out axes (2, 32)
        h = nn.DenseGeneral(48, axis=(-2, -1), name="join")(h)  # in axes (2, 32)
        h = nn.Einsum((48, 4, 32), "bsd,dhk->bshk", name="heads")(h)
        h = nn.Einsum((4, 32, 32), "bshk,hkj->bshj", name="per_head")(h)  # batch axis h
        return nn.Dense(16, name="out")(h.reshape(h.shape[:2] + (-1,)))


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_quantized_layers_forward_and_gradients(kernel):
    model, x = Layers(), jax.random.normal(jax.random.key(11), (2, 3, 64))
    base = model.init(jax.random.key(12), x)
    cfg = lj.LoraConfig(targets=".*", quantize=QC(block_size=32, kernel=kernel))
    lora = lj.LoRA(model, cfg)
    params = randomize_adapters(
        lj.init(lora, jax.random.key(13), x, base_params=base), jax.random.key(14), 0.05
    )
    kinds = {
        k: type(v).__name__ for k, v in leaves_by_path(params).items() if k.endswith("/kernel")
    }
    assert set(kinds.values()) == {"QuantizedTensor"}
    assert params["params"]["per_head"]["kernel"].lead_shape == (4,)
    dense = lj.dequantize(params)
    plain = lj.LoRA(model, lj.LoraConfig(targets=".*"))
    assert_close(jax.jit(lora.apply)(params, x), jax.jit(plain.apply)(dense, x), F32)

    trainable, frozen = lj.partition(params)
    loss = lambda lora, frozen: lambda t: jnp.sum(lora.apply(lj.combine(t, frozen), x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss(lora, frozen)))(trainable)
    expected = jax.jit(jax.grad(loss(plain, lj.dequantize(frozen))))(trainable)
    assert_close(grads, expected, F32)


def test_merge_of_quantized_model():
    model, x = Layers(), jax.random.normal(jax.random.key(15), (2, 3, 64))
    base = model.init(jax.random.key(16), x)
    lora = lj.LoRA(
        model, lj.LoraConfig(targets=("dense", "join"), quantize=QC(block_size=32, targets=".*"))
    )
    params = randomize_adapters(
        lj.init(lora, jax.random.key(17), x, base_params=base), jax.random.key(18), 0.05
    )
    merged = lj.merge(params)
    kernels = {k: v for k, v in leaves_by_path(merged).items() if k.endswith("kernel")}
    assert all(isinstance(v, jax.Array) and v.dtype == F32 for v in kernels.values())
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert_close(model.apply(merged, x), lora.apply(params, x), F32)


def test_merge_requantize_reports_the_adapter_loss():
    w = jax.random.normal(jax.random.key(19), (128, 64))
    qt = quant.quantize_array(w, QC())
    a = jax.random.normal(jax.random.key(20), (128, 4))
    b = jax.random.normal(jax.random.key(21), (4, 64))
    tree = lambda scale: {  # noqa: E731
        "params": {"l": {"kernel": qt, "kernel_lora_a": a, "kernel_lora_b": b}},
        "lora": {"l": {"kernel_lora": Adapter(Geometry((128, 64), 0, 1, 4), scale)}},
    }
    # A delta far below the 4-bit grid step is mostly lost; a large one mostly kept.
    _, small = lj.merge(tree(1e-4), requantize=True)
    merged, large = lj.merge(tree(1.0), requantize=True)
    assert small.errors["params/l/kernel"] > 0.5 > 0.2 > large.worst
    requantized = merged["params"]["l"]["kernel"]
    assert isinstance(requantized, lj.QuantizedTensor) and requantized.fmt == "nf4"
    assert "params/l/kernel" in str(large)
    dense = lj.merge(tree(1.0))["params"]["l"]["kernel"]
    expected = quant.dequantize(qt) + a @ b
    chex.assert_trees_all_close(dense, expected, atol=1e-5)


# --------------------------------------------------------------------------- reference model


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig.tiny(num_layers=1)
    model, tokens = Llama(cfg), jax.random.randint(jax.random.key(22), (2, 17), 0, 256)
    return model, tokens, model.init(jax.random.key(23), tokens[:, :-1])


def test_init_quantizes_targets_and_keeps_other_leaves(llama):
    model, tokens, base = llama
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC())
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(24), tokens, base_params=base)
    flat, base_flat = leaves_by_path(params), leaves_by_path(base)
    quantized = sorted(k for k, v in flat.items() if isinstance(v, lj.QuantizedTensor))
    assert quantized == [
        "params/layers_0/self_attn/q_proj/kernel",
        "params/layers_0/self_attn/v_proj/kernel",
    ]
    assert (
        flat["params/layers_0/mlp/up_proj/kernel"]
        is base_flat["params/layers_0/mlp/up_proj/kernel"]
    )
    everything = lj.init(
        lj.LoRA(model, lj.LoraConfig(targets=("q_proj",), quantize=QC(targets=".*_proj"))),
        jax.random.key(24),
        tokens,
        base_params=base,
    )
    assert sum(isinstance(v, lj.QuantizedTensor) for v in leaves_by_path(everything).values()) == 7
    assert lj.summary(everything).total_bytes < 0.6 * lj.summary(base).total_bytes


def test_qlora_train_step_with_dropout(llama):
    model, tokens, base = llama
    cfg = lj.LoraConfig(
        targets=("q_proj", "v_proj", "down_proj"), dropout=0.1, quantize=QC(targets=".*_proj")
    )
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(25), tokens, base_params=base)
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])  # noqa: E731
    step = lj.make_train_step(lora, loss, lj.optimizer(optax.adam(1e-2), params))
    state, frozen = step.init(params), lj.partition(params)[1]
    losses = []
    for i in range(4):
        params, state, value = step(params, state, tokens, rng=jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(lj.partition(params)[1], frozen)


def test_identity_at_init_with_quantized_base(llama):
    model, tokens, base = llama
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC())
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(26), tokens, base_params=base)
    expected = model.apply(lj.merge(params), tokens)  # the dequantized base, no delta
    chex.assert_trees_all_close(lora.apply(params, tokens), expected, atol=F32_REL_TOL * 10)


def test_init_without_base_params_quantizes_random_base(llama):
    model, tokens, _ = llama
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(27), tokens)
    assert isinstance(
        params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"], lj.QuantizedTensor
    )


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def qparams(llama):
    """The tiny Llama with a 4-bit q_proj and its adapter."""
    model, tokens, base = llama
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    return lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_quantized_tree_with_config_without_quantize(llama, qparams):
    model, tokens, _ = llama
    quantized_base = lj.merge(qparams, requantize=True)[0]
    plain = lj.LoRA(model, lj.LoraConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="q_proj/kernel.*LoraConfig.quantize is None"):
        lj.init(plain, jax.random.key(0), tokens, base_params=quantized_base)
    with pytest.raises(
        ValueError, match="'layers_0/self_attn/q_proj/kernel' is quantized.*quantize is None"
    ):
        plain.apply(qparams, tokens)


def test_quantized_tree_with_other_format(llama, qparams):
    model, tokens, _ = llama
    other = lj.LoRA(model, lj.LoraConfig(targets=("q_proj",), quantize=QC(block_size=32)))
    with pytest.raises(
        ValueError,
        match="q_proj/kernel' was quantized with block_size=64 \\(QuantConfig says 32\\)",
    ):
        other.apply(qparams, tokens)


def test_dense_tree_with_quantizing_config(llama):
    model, tokens, base = llama
    plain = lj.init(
        lj.LoRA(model, lj.LoraConfig(targets=("q_proj",))),
        jax.random.key(0),
        tokens,
        base_params=base,
    )
    quantizing = lj.LoRA(model, lj.LoraConfig(targets=("q_proj",), quantize=QC()))
    with pytest.raises(ValueError, match="'layers_0/self_attn/q_proj/kernel' is a dense array"):
        quantizing.apply(plain, tokens)


def test_quant_targets_matching_nothing(llama):
    model, tokens, base = llama
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC(targets=("embed_tokens",)))
    with pytest.raises(ValueError, match="QuantConfig.targets.*matches no linear layer"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_stray_quantized_leaf_not_selected(llama):
    model, tokens, base = llama
    quantized = lj.quantize(base["params"], QC(), paths={"layers_0/mlp/up_proj/kernel": (0, 1)})
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    with pytest.raises(ValueError, match="does not select.*'params/layers_0/mlp/up_proj/kernel'"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params={"params": quantized})


def test_kernel_quantized_with_wrong_axes():
    model, x = Layers(), jnp.ones((1, 2, 64))
    base = model.init(jax.random.key(0), x)
    wrong = lj.quantize(
        base["params"], QC(block_size=2), paths={"join/kernel": (0, 1)}
    )  # 2 in-axes
    cfg = lj.LoraConfig(targets=("dense",), quantize=QC(block_size=2, targets=("join",)))
    with pytest.raises(
        ValueError, match="'params/join/kernel' was quantized with 0 leading and 1 contraction"
    ):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), x, base_params={"params": wrong})


def test_dense_kernels_never_all_alive_at_once():
    """Compiled temp memory of a deep stack's gradient holds a few dense kernels, not all.

    Without the data dependence in the XLA path, XLA shares each layer's dequantization
    between the forward and backward pass and keeps all of them alive (measured: 37.8 MB
    for eight 4 MB kernels; 13.8 MB with it).
    """
    layers, k = 8, 256
    qts = [
        quant.quantize_array(jax.random.normal(jax.random.key(i), (k, k)), QC())
        for i in range(layers)
    ]

    def loss(x, qts):
        for q in qts:
            x = jnp.tanh(quant.qmatmul(x, q, "xla"))
        return jnp.sum(x)

    x = jnp.ones((8, k))
    temp = jax.jit(jax.grad(loss)).lower(x, qts).compile().memory_analysis().temp_size_in_bytes
    assert temp < layers / 2 * k * k * 4


def test_qlora_with_scan_stacked_layers():
    """Under nn.scan every leaf of a stacked QuantizedTensor is sliced per layer."""
    model = Llama(LlamaConfig.tiny(scan_layers=True))
    tokens = jax.random.randint(jax.random.key(30), (2, 17), 0, 256)
    base = model.init(jax.random.key(31), tokens[:, :-1])
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC(targets=".*_proj"))
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(32), tokens[:, :-1], base_params=base)
    kernel = params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, lj.QuantizedTensor) and kernel.lead_shape == (2,)
    assert kernel.in_shape == (64,) and kernel.out_shape == (64,)
    params = randomize_adapters(params, jax.random.key(33), 0.1)
    merged = lj.merge(params)
    assert_close(model.apply(merged, tokens[:, :-1]), lora.apply(params, tokens[:, :-1]), F32)
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])  # noqa: E731
    step = lj.make_train_step(lora, loss, optax.adam(1e-2))
    state, frozen = step.init(params), lj.partition(params)[1]
    params, state, _ = step(params, state, tokens)
    chex.assert_trees_all_equal(lj.partition(params)[1], frozen)


# --------------------------------------------------------------------------- review fixes


def test_forward_uses_the_kernel_that_merge_writes():
    """compute_dtype rounds the kernel in the forward pass too: with the adapters at zero the
    merged model is exact; with trained ones only the merged sum's rounding differs."""
    model, x = nn.Dense(64, name="d"), jax.random.normal(jax.random.key(40), (4, 256))
    base = model.init(jax.random.key(41), x)
    lora = lj.LoRA(model, lj.LoraConfig(targets=".*", quantize=lj.QuantConfig()))  # bf16 kernels
    params = lj.init(lora, jax.random.key(42), x, base_params=base)
    chex.assert_trees_all_equal(lora.apply(params, x), model.apply(lj.merge(params), x))
    params = randomize_adapters(params, jax.random.key(43), 0.05)
    assert_close(lora.apply(params, x), model.apply(lj.merge(params), x), jnp.bfloat16)


def test_requantizing_merge_works_under_jit():
    qt = quant.quantize_array(jax.random.normal(jax.random.key(44), (64, 32)), QC())
    tree = {
        "params": {
            "l": {
                "kernel": qt,
                "kernel_lora_a": jnp.ones((64, 2)),
                "kernel_lora_b": jnp.ones((2, 32)),
            }
        },
        "lora": {"l": {"kernel_lora": Adapter(Geometry((64, 32), 0, 1, 2), 0.5)}},
    }
    merged, report = jax.jit(lambda p: lj.merge(p, requantize=True))(tree)
    assert isinstance(merged["params"]["l"]["kernel"], lj.QuantizedTensor) and report.worst >= 0


def test_quantization_keeps_logical_boxes_and_trains_on_a_mesh():
    model = Llama(LlamaConfig.tiny(num_layers=1, logical_axes=True))
    tokens = jax.random.randint(jax.random.key(45), (2, 17), 0, 256)
    base = model.init(jax.random.key(46), tokens[:, :-1])
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC(block_size=32))
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(47), tokens[:, :-1], base_params=base)
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]
    assert isinstance(q["kernel"], nn.LogicallyPartitioned) and isinstance(
        q["kernel"].value, lj.QuantizedTensor
    )
    assert q["kernel_lora_b"].names == (None, "heads")
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])  # noqa: E731
    step = lj.make_train_step(lora, loss, optax.adam(1e-2), mesh=mesh, rules=(("batch", "data"),))
    state = step.init(params)
    params, state, value = step(params, state, tokens)
    assert np.isfinite(float(value))
    kernel = lj._trees.unbox_tree(params)["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.codes.sharding.mesh.shape == {"data": 2}


def test_quantize_keeps_boxes_of_a_boxed_tree():
    boxed = {"l": {"kernel": nn.LogicallyPartitioned(jnp.ones((64, 8)), ("embed", "mlp"))}}
    out = lj.quantize(boxed, QC())
    assert isinstance(out["l"]["kernel"], nn.LogicallyPartitioned)
    assert isinstance(out["l"]["kernel"].value, lj.QuantizedTensor)


class Custom(nn.Module):
    """A linear layer with a bias but no `use_bias` and no `dtype`."""

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
        return x @ w + self.param("bias", nn.initializers.ones, (8,))[None, :]


def test_custom_layer_bias_without_use_bias_is_an_error():
    lj.rules.register_rule(Custom, lj.rules.LinearRule(spec=lambda m, x, kw: ("...i", "io", "...o")))
    model, x = Custom(), jnp.ones((2, 64))
    base = model.init(jax.random.key(0), x)
    cfg = lj.LoraConfig(targets=".*", quantize=QC())
    with pytest.raises(ValueError, match="has a 'bias' parameter but no `use_bias`"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(1), x, base_params=base)


def test_trainable_extra_that_is_quantized_is_an_error(llama):
    model, tokens, base = llama
    cfg = lj.LoraConfig(
        targets=("q_proj",),
        trainable=("lm_head/kernel",),
        quantize=QC(targets=("q_proj", "lm_head")),
    )
    with pytest.raises(
        ValueError, match="trainable selects 'lm_head/kernel', which QuantConfig quantizes"
    ):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_default_quant_targets_without_linear_adapted_layers(llama):
    model, tokens, base = llama
    cfg = lj.LoraConfig(targets=("embed_tokens",), quantize=QC())
    with pytest.raises(ValueError, match="matches no linear layer"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_numpy_base_leaves_end_on_the_device(llama):
    model, tokens, base = llama
    host = jax.tree.map(np.asarray, base)
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=host)
    assert not any(isinstance(v, np.ndarray) for v in jax.tree.leaves(params))
