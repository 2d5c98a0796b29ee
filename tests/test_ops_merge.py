"""Tests for `lora_jax.ops.merge`.

Merging folds every adapter into the parameter it adapts and gives the base tree: its
structure, dtypes, values and sharding boxes, under jit too, in float32 arithmetic for bf16
kernels; wrongly shaped or orphaned adapters, missing records, a trainable half of another
rank and integer kernels raise naming the path; integer and boolean leaves pass through; 4-bit
kernels merge to dense ones, or are requantized with a `RequantizeReport` of what the 4-bit
grid lost (zero for a zero delta), under jit too.
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    F32,
    QC,
    X6,
    Boxed,
    Layers,
    assert_close,
    build,
    leaves_by_path,
    query_value,
    randomize_adapters,
)

import lora_jax as lj
from lora_jax import quant
from lora_jax.adapters import Adapter, Geometry


def _copy_tree(tree):
    """A structural copy (new dicts, same leaves) that can be edited without touching `tree`."""
    return jax.tree.map(lambda v: v, tree, is_leaf=lambda v: isinstance(v, nn.Partitioned))


def test_merge_without_adapters_returns_the_same_object(net):
    _, _, base, params = net
    assert lj.merge(base) is base
    merged = lj.merge(params)
    assert lj.merge(merged) is merged
    boxed = Boxed().init(jax.random.key(0), X6)
    assert lj.merge(boxed) is boxed


def test_merge_matches_the_base_tree_and_folds_the_delta(net):
    model, lora_model, base, params = net
    params = randomize_adapters(params, jax.random.key(3))
    merged = lj.merge(params)
    chex.assert_trees_all_equal_structs(merged, base)
    chex.assert_trees_all_equal_shapes(merged, base)
    chex.assert_trees_all_equal_dtypes(merged, base)
    assert "lora" not in merged
    assert not any("_lora_" in k for k in leaves_by_path(merged))
    p = params["params"]
    for name in ("query", "value"):
        scale = float(params["lora"][name]["kernel_lora"].scale)
        assert scale == 16.0 / 2
        expected = np.asarray(p[name]["kernel"]) + scale * (
            np.asarray(p[name]["kernel_lora_a"], np.float64) @ np.asarray(p[name]["kernel_lora_b"])
        )
        np.testing.assert_allclose(merged["params"][name]["kernel"], expected, rtol=1e-5, atol=1e-5)
    flat, merged_flat = leaves_by_path(params), leaves_by_path(merged)
    for path in ("params/norm/scale", "params/head/kernel", "params/query/bias"):
        assert merged_flat[path] is flat[path]  # untouched leaves are passed through
    assert_close(model.apply(merged, X6), lora_model.apply(params, X6), jnp.float32)


def test_merge_under_jit(net):
    _, _, base, params = net
    params = randomize_adapters(params, jax.random.key(4))
    jitted = jax.jit(lj.merge)(params)
    chex.assert_trees_all_equal_structs(jitted, base)
    chex.assert_trees_all_equal_dtypes(jitted, base)
    chex.assert_trees_all_close(jitted, lj.merge(params), rtol=1e-6, atol=1e-6)


class _Holder(nn.Module):
    layer: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.layer(x)


def test_merge_of_bf16_computes_in_float32_and_casts_back():
    model = _Holder(nn.Dense(5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    lora_model = lj.LoRA(
        model, lj.LoraConfig(rank=3, alpha=6.0, targets=("layer",), param_dtype=jnp.bfloat16)
    )
    base = model.init(jax.random.key(0), X6)
    params = lj.init(lora_model, jax.random.key(1), X6, base_params=base)
    params = randomize_adapters(params, jax.random.key(2))
    p = params["params"]["layer"]
    assert p["kernel"].dtype == p["kernel_lora_a"].dtype == jnp.bfloat16
    w, a, b = (np.asarray(p[k], np.float32) for k in ("kernel", "kernel_lora_a", "kernel_lora_b"))
    expected = jnp.asarray(w + np.float32(2.0) * (a @ b)).astype(jnp.bfloat16)  # scale 6 / 3
    merged = lj.merge(params)["params"]["layer"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(expected, np.float32))
    # Rounding each product to bf16 first gives a different (worse) kernel.
    naive = p["kernel"] + jnp.bfloat16(2.0) * (p["kernel_lora_a"] @ p["kernel_lora_b"])
    assert not np.array_equal(np.asarray(naive, np.float32), np.asarray(expected, np.float32))


def test_merge_keeps_partitioning_boxes():
    model, lora_model, base, params = build(Boxed())
    # The boxes survive lj.init itself: base leaves come back as the very same objects.
    for name, box_type in (("query", nn.Partitioned), ("value", nn.LogicallyPartitioned)):
        assert isinstance(params["params"][name]["kernel"], box_type)
        assert params["params"][name]["kernel"] is base["params"][name]["kernel"]
    params = randomize_adapters(params, jax.random.key(6))
    for merged in (lj.merge(params), jax.jit(lj.merge)(params)):
        chex.assert_trees_all_equal_structs(merged, base)
        chex.assert_trees_all_equal_shapes(merged, base)
        chex.assert_trees_all_equal_dtypes(merged, base)
        query, value = merged["params"]["query"]["kernel"], merged["params"]["value"]["kernel"]
        assert type(query) is nn.Partitioned and query.names == (None, "model")
        assert type(value) is nn.LogicallyPartitioned and value.names == ("embed", "mlp")
        p = params["params"]["query"]
        expected = p["kernel"].value + 8.0 * (p["kernel_lora_a"].value @ p["kernel_lora_b"].value)
        np.testing.assert_allclose(query.value, expected, rtol=1e-5, atol=1e-5)
        assert_close(model.apply(merged, X6), lora_model.apply(params, X6), jnp.float32)


def test_non_float_leaves_survive_merge(counters):
    model, lora_model, base, params = counters
    params = randomize_adapters(params, jax.random.key(7))
    for merged in (lj.merge(params), jax.jit(lj.merge)(params)):
        chex.assert_trees_all_equal_structs(merged, base)
        chex.assert_trees_all_equal_dtypes(merged, base)
        for name in ("step_count", "ids", "flag"):
            np.testing.assert_array_equal(merged["params"][name], base["params"][name])
        assert_close(model.apply(merged, X6), lora_model.apply(params, X6), jnp.float32)
    assert lj.merge(params)["params"]["flag"] is base["params"]["flag"]
    s = lj.summary(params)
    assert s.total_params - s.trainable_params == (6 * 8 + 8) + (8 * 4 + 4) + 1 + 3 + 2
    assert s.total_bytes - s.trainable_bytes == 4 * ((6 * 8 + 8) + (8 * 4 + 4) + 1 + 3) + 2


# ------------------------------------------------------------------------------ errors


def test_merge_of_a_wrongly_shaped_adapter_raises_naming_the_kernel(net):
    _, _, _, params = net
    bad = _copy_tree(params)
    bad["params"]["value"]["kernel_lora_b"] = jnp.zeros((3, 4))  # rank 3, A has rank 2
    with pytest.raises(ValueError, match=re.escape("'params/value/kernel'")):
        lj.merge(bad)
    bad = _copy_tree(params)
    bad["params"]["query"]["kernel_lora_b"] = jnp.zeros((2, 7))  # out 7, kernel has 8
    with pytest.raises(ValueError, match=re.escape("'params/query/kernel'") + ".*shape \\(2, 7\\)"):
        jax.jit(lj.merge)(bad)


def test_merge_without_its_record_or_b_raises_naming_the_path(net):
    _, _, _, params = net
    missing = _copy_tree(params)
    del missing["lora"]["query"]["kernel_lora"]
    with pytest.raises(ValueError, match=re.escape("'lora/query/kernel_lora' is missing")):
        lj.merge(missing)
    missing = _copy_tree(params)
    del missing["params"]["value"]["kernel_lora_b"]
    with pytest.raises(ValueError, match=re.escape("'params/value/kernel_lora_b'")):
        lj.merge(missing)
    with pytest.raises(ValueError, match=re.escape("'params/query/kernel_lora_a' has no record")):
        lj.merge(lj.partition(params)[0])  # the trainable half has no base kernels nor records


def test_merge_of_b_without_a_raises(net):
    _, _, _, params = net
    params = randomize_adapters(params, jax.random.key(5))
    orphan = _copy_tree(params)
    del orphan["params"]["value"]["kernel_lora_a"]
    with pytest.raises(ValueError, match=re.escape("params/value/kernel")):
        lj.merge(orphan)


def test_trainable_half_of_another_rank_is_refused_by_merge_and_apply():
    _, _, lora_model, params = query_value()
    _, _, _, other = query_value(rank=4)
    joined = lj.combine(lj.partition(other)[0], lj.partition(params)[1])
    with pytest.raises(
        ValueError,
        match=r"Adapter leaf 'a' of 'params/query/kernel' has shape \(6, 4\) \(rank 4\) but its record says \(6, 2\) \(rank 2\)",
    ):
        lj.merge(joined)
    with pytest.raises(ValueError, match=r"'params/query/kernel_lora_a' does not fit its adapter"):
        lora_model.apply(joined, X6)


def test_merge_refuses_an_integer_kernel():
    _base, _cfg, _, params = query_value()
    params = jax.tree.map(lambda v: v, params)
    params["params"]["query"]["kernel"] = params["params"]["query"]["kernel"].astype(jnp.int32)
    with pytest.raises(
        ValueError, match=r"Parameter 'params/query/kernel' is int32: merging would truncate"
    ):
        lj.merge(params)


# ----------------------------------------------------------------------- 4-bit kernels


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
    tree = lambda scale: {
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


def test_requantize_report_of_a_zero_delta_is_zero():
    _, _, _, params = query_value(quantize=lj.QuantConfig(block_size=2, compute_dtype=jnp.float32))
    _, report = lj.merge(params, requantize=True)  # B starts at zero: ΔW = 0
    assert report.errors and all(float(e) == 0.0 for e in report.errors.values())
