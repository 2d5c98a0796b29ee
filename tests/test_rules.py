"""Tests for `lora_jax.rules`: the layer-kind rules and their registry.

Every layer kind (Dense, DenseGeneral, Einsum with and without batch axes, Embed, Conv):
adapter shapes, identity at init, merged equals unmerged, under jit, bf16 bases with float32
adapters, dropout on the adapter path only; kernels a rule cannot split are rejected; custom
layers get rules through `register_rule`, and a custom layer with a bias but no `use_bias`
cannot take the 4-bit forward.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import QC, assert_close, few_examples, leaves_by_path, randomize_adapters
from hypothesis import given
from hypothesis import strategies as st

import lora_jax as lj

# The property tests draw ranks above min(fan_in, fan_out) on purpose; init warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:LoraConfig. a rank above:UserWarning")


class Holder(nn.Module):
    """Puts one layer at path 'layer' (and, for Embed, also calls `attend`)."""

    layer: nn.Module

    @nn.compact
    def __call__(self, x):
        y = self.layer(x)
        if isinstance(self.layer, nn.Embed):
            return y, self.layer.attend(y)
        return y


def _case(kind, draw_dims, dtype):
    """(layer, input, expected A shape, expected B shape) for a layer kind and sizes."""
    n, i, o, h, rank = draw_dims
    key = jax.random.key(7)
    kw = dict(dtype=dtype, param_dtype=dtype)
    if kind == "dense":
        x = jax.random.normal(key, (2, 3, i), dtype)
        return nn.Dense(o, **kw), x, (i, rank), (rank, o)
    if kind == "dense_general":  # attention-out style: contract (heads, head_dim)
        x = jax.random.normal(key, (2, 3, n, i), dtype)
        return nn.DenseGeneral((o, h), axis=(-2, -1), **kw), x, (n, i, rank), (rank, o, h)
    if kind == "einsum":  # query style: (features) -> (heads, head_dim)
        x = jax.random.normal(key, (2, 3, i), dtype)
        layer = nn.Einsum((i, n, h), "btd,dnh->btnh", **kw)
        return layer, x, (i, rank), (rank, n, h)
    if kind == "einsum_batched":  # per-head weights: one adapter per head
        x = jax.random.normal(key, (2, n, i), dtype)
        layer = nn.Einsum((n, i, o), "bnd,ndo->bno", **kw)
        return layer, x, (n, i, rank), (n, rank, o)
    if kind == "embed":
        x = jax.random.randint(key, (2, 5), 0, i + 2)
        return nn.Embed(i + 2, o, **kw), x, (i + 2, rank), (rank, o)
    if kind == "conv":
        x = jax.random.normal(key, (2, 5, 6, i), dtype)
        layer = nn.Conv(o, kernel_size=(3, 2), strides=(1, 2), padding="SAME", **kw)
        return layer, x, (3, 2, i, rank), (rank, o)
    raise ValueError(kind)


KINDS = ("dense", "dense_general", "einsum", "einsum_batched", "embed", "conv")
dims = st.tuples(*(st.integers(1, 6) for _ in range(4)), st.integers(1, 4))
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16])


def _build(kind, sizes, dtype, **cfg):
    layer, x, a_shape, b_shape = _case(kind, sizes, dtype)
    model = Holder(layer)
    base = model.init(jax.random.key(1), x)
    config = lj.LoraConfig(rank=sizes[-1], targets=("layer",), **cfg)
    lora_model = lj.LoRA(model, config)
    params = lj.init(lora_model, jax.random.key(2), x, base_params=base)
    return model, lora_model, base, params, x, a_shape, b_shape


@pytest.mark.parametrize("kind", KINDS)
@few_examples()  # 6 kinds x 3 examples, 5 compiled programs each
@given(sizes=dims, alpha=st.floats(0.5, 32.0), rslora=st.booleans(), dtype=dtypes)
def test_merge_equals_unmerged(kind, sizes, alpha, rslora, dtype):
    model, lora_model, base, params, x, a_shape, b_shape = _build(
        kind, sizes, dtype, alpha=alpha, use_rslora=rslora
    )
    param = "embedding" if kind == "embed" else "kernel"
    flat = leaves_by_path(params)
    assert flat[f"params/layer/{param}_lora_a"].shape == a_shape
    assert flat[f"params/layer/{param}_lora_b"].shape == b_shape
    assert flat[f"params/layer/{param}_lora_a"].dtype == jnp.float32

    apply_lora, apply_base = jax.jit(lora_model.apply), jax.jit(model.apply)
    # Identity at init: exactly the base output.
    base_out = apply_base(base, x)
    chex.assert_trees_all_equal(apply_lora(params, x), base_out)

    params = randomize_adapters(params, jax.random.key(3))
    unmerged = apply_lora(params, x)
    merged_params = jax.jit(lj.merge)(params)
    chex.assert_trees_all_equal_structs(merged_params, base)
    merged = apply_base(merged_params, x)
    chex.assert_trees_all_equal_dtypes(merged, base_out)

    # Reference: the dense float32 weight W + scale * A @ B, computed here by hand.
    reference = _reference(model, base, params, x, param)
    assert_close(unmerged, merged, dtype, reference=reference)
    assert_close(unmerged, reference, dtype)
    scale = alpha / (sizes[-1] ** 0.5 if rslora else sizes[-1])
    assert params["lora"]["layer"][f"{param}_lora"].scale == pytest.approx(scale, rel=1e-6)


def _reference(model, base, params, x, param):
    f32 = lambda t: jax.tree.map(lambda v: v.astype(jnp.float32), t)
    p = leaves_by_path(params)
    w = p[f"params/layer/{param}"].astype(jnp.float32)
    a = p[f"params/layer/{param}_lora_a"].astype(jnp.float32)
    b = p[f"params/layer/{param}_lora_b"].astype(jnp.float32)
    n_batch = a.ndim + b.ndim - 2 - w.ndim
    if n_batch:
        delta = jnp.einsum("nir,nro->nio", a, b)
    else:
        delta = jnp.tensordot(a, b, axes=1)
    ref = f32(base)
    ref["params"]["layer"][param] = w + params["lora"]["layer"][f"{param}_lora"].scale * delta
    cast = lambda layer: layer.clone(dtype=jnp.float32, param_dtype=jnp.float32)
    x32 = x if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
    return jax.jit(Holder(cast(model.layer)).apply)(ref, x32)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_base_with_fp32_adapters(kind):
    model, lora_model, base, params, x, *_ = _build(kind, (2, 3, 4, 2, 2), jnp.bfloat16)
    params = randomize_adapters(params, jax.random.key(0))
    out = lora_model.apply(params, x)
    chex.assert_trees_all_equal_dtypes(out, model.apply(base, x))
    merged = lj.merge(params)
    chex.assert_trees_all_equal_dtypes(merged, base)


def test_dropout_only_with_rng():
    model, lora_model, base, params, x, *_ = _build(
        "dense", (2, 8, 4, 2, 2), jnp.float32, dropout=0.5
    )
    params = randomize_adapters(params, jax.random.key(0))
    plain = lora_model.apply(params, x)
    chex.assert_trees_all_equal(plain, lora_model.apply(params, x))
    dropped = lora_model.apply(params, x, rngs={"dropout": jax.random.key(1)})
    assert not jnp.allclose(plain, dropped)
    # Dropout touches only the adapter path: with B = 0 the base output is unchanged.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "lora_b" in jax.tree_util.keystr(p) else v, params
    )
    chex.assert_trees_all_equal(
        lora_model.apply(zero_b, x, rngs={"dropout": jax.random.key(1)}), model.apply(base, x)
    )


def test_conv_groups_rejected():
    model = Holder(nn.Conv(4, (3,), feature_group_count=2))
    x = jnp.ones((1, 5, 4))
    with pytest.raises(ValueError, match=r"'layer'.*feature_group_count"):
        lj.init(lj.LoRA(model, lj.LoraConfig(targets=("layer",))), jax.random.key(0), x)


def test_einsum_with_permuted_kernel_rejected():
    model = Holder(nn.Einsum((4, 3), "bi,oi->bo"))
    with pytest.raises(ValueError, match=r"'layer'.*ordered batch, contracted, output"):
        lj.init(
            lj.LoRA(model, lj.LoraConfig(targets=("layer",))), jax.random.key(0), jnp.ones((2, 3))
        )


class MyLinear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        return x @ w


def test_custom_rule_registration():
    lj.rules.register_rule(
        MyLinear, lj.rules.LinearRule(spec=lambda m, x, kw: ("...i", "io", "...o"), param="w")
    )
    model = Holder(MyLinear(3))
    x = jnp.ones((2, 4))
    base = model.init(jax.random.key(0), x)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("layer",)))
    params = lj.init(lora_model, jax.random.key(1), x, base_params=base)
    assert leaves_by_path(params)["params/layer/w_lora_a"].shape == (4, 2)
    params = randomize_adapters(params, jax.random.key(2))
    assert_close(lora_model.apply(params, x), model.apply(lj.merge(params), x), jnp.float32)


def test_register_rule_rejects_non_modules():
    with pytest.raises(TypeError, match=r"flax.linen Module class"):
        lj.rules.register_rule(int, lj.rules.LinearRule(spec=lambda m, x, kw: ("i", "io", "o")))
    with pytest.raises(TypeError, match=r"lora_jax.rules.Rule"):
        lj.rules.register_rule(MyLinear, object())


class Custom(nn.Module):
    """A linear layer with a bias but no `use_bias` and no `dtype`."""

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
        return x @ w + self.param("bias", nn.initializers.ones, (8,))[None, :]


def test_custom_layer_bias_without_use_bias_is_an_error():
    lj.rules.register_rule(
        Custom, lj.rules.LinearRule(spec=lambda m, x, kw: ("...i", "io", "...o"))
    )
    model, x = Custom(), jnp.ones((2, 64))
    base = model.init(jax.random.key(0), x)
    cfg = lj.LoraConfig(targets=".*", quantize=QC())
    with pytest.raises(ValueError, match="has a 'bias' parameter but no `use_bias`"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(1), x, base_params=base)
