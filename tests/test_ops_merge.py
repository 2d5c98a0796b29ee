"""Tests for the tree transforms in `lora_jax.tree`.

Covers `labels`, `trainable_paths`, `partition`, `combine`, `merge` and `summary` on small
Flax models: which leaves are trainable (adapters plus `LoraConfig.trainable` extras), exact
partition/combine round trips, the structure, dtypes, values, sharding boxes and error
messages of `merge`, exact parameter counts and bytes, and trees that hold integer and
boolean leaves.
"""

import re
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, leaves_by_path, randomize_adapters

import lora_jax as lj

X = jax.random.normal(jax.random.key(0), (2, 6))
ADAPTERS = frozenset({
    "params/query/kernel_lora_a",
    "params/query/kernel_lora_b",
    "params/value/kernel_lora_a",
    "params/value/kernel_lora_b",
})


class Net(nn.Module):
    """query (6 -> 8), LayerNorm, value (8 -> 4), head (4 -> 3)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(param_dtype=self.param_dtype)
        h = nn.Dense(8, name="query", **kw)(x)
        h = nn.LayerNorm(name="norm", param_dtype=self.param_dtype)(h)
        h = nn.Dense(4, name="value", **kw)(h)
        return nn.Dense(3, name="head", **kw)(h)


class Boxed(nn.Module):
    """Kernels carrying sharding metadata: a Partitioned and a LogicallyPartitioned box."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(8, name="query", kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        return nn.Dense(
            4, name="value", kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp"))
        )(h)


class Counters(nn.Module):
    """Adapted Dense layers beside integer and boolean leaves in the "params" collection."""

    @nn.compact
    def __call__(self, x):
        count = self.variable("params", "step_count", lambda: jnp.int32(3))
        ids = self.param("ids", lambda key: jnp.arange(3, dtype=jnp.int32))
        flag = self.param("flag", lambda key: jnp.array([True, False]))
        h = nn.Dense(8, name="query")(x)
        h = h + (count.value + ids.sum() + flag.sum()).astype(x.dtype)
        return nn.Dense(4, name="value")(h)


def _build(model=None, **cfg):
    """(model, lora_model, base variables, LoRA variables) with rank-2 q/v adapters."""
    model = Net() if model is None else model
    base = model.init(jax.random.key(1), X)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("query", "value"), **cfg))
    params = lj.init(lora_model, jax.random.key(2), X, base_params=base)
    return model, lora_model, base, params


def _copy_tree(tree):
    """A structural copy (new dicts, same leaves) that can be edited without touching `tree`."""
    return jax.tree.map(lambda v: v, tree, is_leaf=lambda v: isinstance(v, nn.Partitioned))


@pytest.fixture(scope="module")
def net():
    return _build()


@pytest.fixture(scope="module")
def counters():
    return _build(Counters())


# ----------------------------------------------------------------------------- labels


def test_labels_mark_adapters_trainable_and_everything_else_frozen(net):
    _, _, _, params = net
    labels = lj.labels(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = leaves_by_path(labels)
    assert set(flat) == set(leaves_by_path(params))
    assert {k for k, v in flat.items() if v == "trainable"} == ADAPTERS
    assert {v for k, v in flat.items() if k not in ADAPTERS} == {"frozen"}
    assert labels["lora"] == params["lora"]  # the records hold no arrays: kept as they are
    assert lj.trainable_paths(params) == ADAPTERS


@pytest.mark.parametrize(
    "extras, expected",
    [
        (("norm/scale",), {"params/norm/scale"}),
        (("head/kernel",), {"params/head/kernel"}),
        (("norm/.*", "head/kernel"), {"params/norm/scale", "params/norm/bias", "params/head/kernel"}),
    ],
)
def test_labels_include_trainable_extras(extras, expected):
    _, _, _, params = _build(trainable=extras)
    flat = leaves_by_path(lj.labels(params))
    assert {k for k, v in flat.items() if v == "trainable"} == ADAPTERS | expected
    assert lj.trainable_paths(params) == ADAPTERS | expected
    # The markers that select the extras live in the "lora" collection; they hold no arrays.
    markers = {k for k, v in leaves_by_path(params["lora"]).items()}
    assert not markers
    plan = lj.adapters.Plan.of(params)
    assert plan.extras == expected


def test_labels_drive_optax_multi_transform(net):
    _, _, _, params = net
    tx = optax.multi_transform(
        {"trainable": optax.adam(0.1), "frozen": optax.set_to_zero()}, lj.labels(params)
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    chex.assert_trees_all_close(jax.jit(tx.update)(grads, state, params)[0], updates)
    for path, u in leaves_by_path(updates).items():
        if path in ADAPTERS:
            assert bool(jnp.all(u != 0)), path
        else:
            np.testing.assert_array_equal(u, np.zeros_like(u), err_msg=path)
    new = optax.apply_updates(params, updates)
    before = leaves_by_path(params)
    for path, value in leaves_by_path(new).items():
        if path not in ADAPTERS:
            np.testing.assert_array_equal(value, before[path], err_msg=path)


# ------------------------------------------------------------------ partition / combine


@pytest.mark.parametrize(
    "extras, expected",
    [((), set()), (("norm/scale",), {"params/norm/scale"}), (("head/kernel",), {"params/head/kernel"})],
)
def test_partition_combine_round_trip(extras, expected):
    _, _, _, params = _build(trainable=extras)
    trainable, frozen = lj.partition(params)
    flat, tr, fr = leaves_by_path(params), leaves_by_path(trainable), leaves_by_path(frozen)
    assert set(tr) == ADAPTERS | expected == lj.trainable_paths(params)
    assert not set(tr) & set(fr)
    assert set(tr) | set(fr) == set(flat)
    for back in (lj.combine(trainable, frozen), lj.combine(frozen, trainable)):
        chex.assert_trees_all_equal(back, params)
        chex.assert_trees_all_equal_structs(back, params)
        for path, value in leaves_by_path(back).items():
            assert value is flat[path], path  # the very same arrays, no copies


def test_partition_of_a_tree_without_adapters(net):
    _, _, base, _ = net
    trainable, frozen = lj.partition(base)
    assert trainable == {}
    chex.assert_trees_all_equal(frozen, base)
    assert lj.combine(trainable, frozen) == frozen
    assert lj.labels(base) == jax.tree.map(lambda _: "frozen", base)


def test_combine_of_overlapping_trees_raises_naming_the_leaf(net):
    _, _, _, params = net
    trainable, frozen = lj.partition(params)
    with pytest.raises(ValueError, match=re.escape("'params/query/kernel_lora_a' twice (4 shared")):
        lj.combine(trainable, trainable)
    extra = {"params": {"norm": {"scale": jnp.ones(8)}}}
    with pytest.raises(ValueError, match=re.escape("'params/norm/scale' twice (1 shared")):
        lj.combine(trainable, frozen, extra)


# ------------------------------------------------------------------------------- merge


def test_merge_without_adapters_returns_the_same_object(net):
    _, _, base, params = net
    assert lj.merge(base) is base
    merged = lj.merge(params)
    assert lj.merge(merged) is merged
    boxed = Boxed().init(jax.random.key(0), X)
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
    assert_close(model.apply(merged, X), lora_model.apply(params, X), jnp.float32)


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
    base = model.init(jax.random.key(0), X)
    params = lj.init(lora_model, jax.random.key(1), X, base_params=base)
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


def test_merge_keeps_partitioning_boxes():
    model, lora_model, base, params = _build(Boxed())
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
        assert_close(model.apply(merged, X), lora_model.apply(params, X), jnp.float32)


# ----------------------------------------------------------------------------- summary


def test_summary_counts_and_bytes_exactly():
    _, _, _, params = _build(Net(param_dtype=jnp.bfloat16))  # bf16 base, float32 adapters
    adapters = (6 * 2 + 2 * 8) + (8 * 2 + 2 * 4)  # query A, B; value A, B = 52
    base = (6 * 8 + 8) + (8 + 8) + (8 * 4 + 4) + (4 * 3 + 3)  # query, norm, value, head = 123
    s = lj.summary(params)
    assert s == lj.Summary(
        trainable_params=52, total_params=175, trainable_bytes=4 * 52, total_bytes=4 * 52 + 2 * 123
    )
    assert (s.trainable_params, s.total_params) == (adapters, adapters + base)
    assert s.trainable_percent == pytest.approx(100 * 52 / 175)
    text = str(s)
    assert "trainable params: 52 || all params: 175" in text
    assert "trainable params:" in text and "all params:" in text
    # A trainable extra moves its count and its bf16 bytes over; "lora" leaves never count.
    _, _, _, params = _build(Net(param_dtype=jnp.bfloat16), trainable=("norm/scale",))
    assert lj.summary(params) == lj.Summary(
        trainable_params=60, total_params=175, trainable_bytes=4 * 52 + 2 * 8, total_bytes=454
    )


def test_summary_of_a_base_tree_has_nothing_trainable(net):
    _, _, base, _ = net
    assert lj.summary(base) == lj.Summary(
        trainable_params=0, total_params=123, trainable_bytes=0, total_bytes=4 * 123
    )
    assert "trainable params: 0 || all params: 123" in str(lj.summary(base))


def test_summary_works_on_eval_shape_output(net):
    _, lora_model, base, params = net
    expected = lj.summary(params)
    abstract = jax.eval_shape(lambda key: lj.init(lora_model, key, X), jax.random.key(0))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(abstract))
    assert lj.summary(abstract) == expected
    assert lj.summary(jax.eval_shape(lambda: params)) == expected
    boxed = _build(Boxed())[3]
    assert lj.summary(jax.eval_shape(lambda: boxed)) == lj.summary(boxed)
    assert lj.summary(boxed).total_params == (6 * 8 + 8) + (8 * 4 + 4) + 6 * 2 + 2 * 8 + 8 * 2 + 2 * 4


# ------------------------------------------------------------------ non-float leaves


def test_non_float_leaves_are_frozen_and_pass_through_partition_and_combine(counters):
    _, _, _, params = counters
    labels = leaves_by_path(lj.labels(params))
    for path in ("params/step_count", "params/ids", "params/flag"):
        assert labels[path] == "frozen"
    assert lj.trainable_paths(params) == ADAPTERS
    trainable, frozen = lj.partition(params)
    assert {"step_count", "ids", "flag"} <= set(frozen["params"])
    back = lj.combine(trainable, frozen)
    chex.assert_trees_all_equal(back, params)
    assert back["params"]["ids"] is params["params"]["ids"]


def test_non_float_leaves_survive_merge(counters):
    model, lora_model, base, params = counters
    params = randomize_adapters(params, jax.random.key(7))
    for merged in (lj.merge(params), jax.jit(lj.merge)(params)):
        chex.assert_trees_all_equal_structs(merged, base)
        chex.assert_trees_all_equal_dtypes(merged, base)
        for name in ("step_count", "ids", "flag"):
            np.testing.assert_array_equal(merged["params"][name], base["params"][name])
        assert_close(model.apply(merged, X), lora_model.apply(params, X), jnp.float32)
    assert lj.merge(params)["params"]["flag"] is base["params"]["flag"]
    s = lj.summary(params)
    assert s.total_params - s.trainable_params == (6 * 8 + 8) + (8 * 4 + 4) + 1 + 3 + 2
    assert s.total_bytes - s.trainable_bytes == 4 * ((6 * 8 + 8) + (8 * 4 + 4) + 1 + 3) + 2


def test_non_float_leaves_do_not_break_the_optimizer(counters):
    _, _, _, params = counters
    tx = lj.optimizer(optax.adam(1e-2), params)
    grads = jax.tree.map(jnp.ones_like, params)  # int ones, bool True
    for update in (tx.update, jax.jit(tx.update)):
        updates, _ = update(grads, tx.init(params), params)
        for name in ("step_count", "ids", "flag"):
            u = updates["params"][name]
            assert u.dtype == params["params"][name].dtype
            assert not np.any(np.asarray(u)), name
        new = optax.apply_updates(params, updates)
        for name in ("step_count", "ids", "flag"):
            np.testing.assert_array_equal(new["params"][name], params["params"][name])
            assert new["params"][name].dtype == params["params"][name].dtype
    half = lj.partition(params)[0]
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, half), tx.init(half), half)
    assert set(leaves_by_path(updates)) == ADAPTERS
