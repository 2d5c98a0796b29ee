"""Tests for `lora_jax.ops.partition`: `labels`, `trainable_paths`, `partition`, `combine`.

On small Flax models: which leaves are trainable (adapters plus `LoraConfig.trainable`
extras), labels that drive `optax.multi_transform`, exact partition/combine round trips that
keep the very same arrays, overlapping trees named by leaf, and trees that hold integer and
boolean leaves.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ADAPTERS, build, leaves_by_path

import lora_jax as lj

# ------------------------------------------------------------------------------ labels


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
        (
            ("norm/.*", "head/kernel"),
            {"params/norm/scale", "params/norm/bias", "params/head/kernel"},
        ),
    ],
)
def test_labels_include_trainable_extras(extras, expected):
    _, _, _, params = build(trainable=extras)
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


# ----------------------------------------------------------------- partition / combine


@pytest.mark.parametrize(
    "extras, expected",
    [
        ((), set()),
        (("norm/scale",), {"params/norm/scale"}),
        (("head/kernel",), {"params/head/kernel"}),
    ],
)
def test_partition_combine_round_trip(extras, expected):
    _, _, _, params = build(trainable=extras)
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


# -------------------------------------------------------------------- non-float leaves


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
