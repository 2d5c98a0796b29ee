"""Tests for `lora_jax.optimizer`.

The wrapped optimizer keeps state (Adam's mu and nu) for the trainable leaves only, gives
frozen leaves updates that are exactly zero even when handed a whole-tree gradient, works
on the whole tree and on its trainable half alike, implements LoRA+ (B updates scaled by
`loraplus_lr_ratio`), and leaves integer and boolean leaves as they are.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ADAPTERS, leaves_by_path

import lora_jax as lj

X = jnp.ones((2, 5))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="query")(x))
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(3, name="value")(h)


def _params(**cfg):
    base = Net().init(jax.random.key(0), X)
    lora_model = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query", "value"), **cfg))
    return lj.init(lora_model, jax.random.key(1), X, base_params=base)


@pytest.fixture(scope="module")
def params():
    return _params()


@pytest.fixture(scope="module", params=[(), ("norm/scale",)], ids=["adapters", "with_extra"])
def any_params(request):
    return _params(trainable=request.param)


def _trainable_elements(params):
    trainable = lj.trainable_paths(params)
    return sum(v.size for k, v in leaves_by_path(params).items() if k in trainable)


def _moment(state, name):
    """The one `name` ("mu" or "nu") tree in an optimizer state, flattened to arrays by path."""
    found = optax.tree_utils.tree_get_all_with_path(state, name)
    assert len(found) == 1, found
    # Frozen leaves hold optax.MaskedNode(), an empty pytree: flatten it away.
    flat = leaves_by_path(found[0][1])
    return {k: v for k, v in flat.items() if jax.tree.leaves(v)}


def test_whole_tree_state_holds_moments_for_trainable_leaves_only(any_params):
    params = any_params
    trainable = lj.trainable_paths(params)
    n = _trainable_elements(params)
    state = lj.optimizer(optax.adam(1e-3), params).init(params)
    arrays = [v for v in jax.tree.leaves(state) if jnp.ndim(v) > 0]
    assert len(arrays) == 2 * len(trainable)  # one mu and one nu per trainable leaf
    assert sum(v.size for v in arrays) == 2 * n
    assert [int(v) for v in jax.tree.leaves(state) if jnp.ndim(v) == 0] == [0]  # Adam's count
    flat = leaves_by_path(params)
    for name in ("mu", "nu"):
        moment = _moment(state, name)
        assert set(moment) == trainable
        assert sum(v.size for v in moment.values()) == n
        for path, v in moment.items():
            assert v.shape == flat[path].shape, path


def test_whole_tree_gradient_moves_only_trainable_leaves(any_params):
    params = any_params
    trainable = lj.trainable_paths(params)
    tx = lj.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), params)
    grads = jax.tree.map(jnp.ones_like, params)  # the "lora" scales get gradients too
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_structs(updates, params)
    for path, u in leaves_by_path(updates).items():
        if path in trainable:
            assert bool(jnp.all(u != 0)), path
        else:
            np.testing.assert_array_equal(u, np.zeros(u.shape, u.dtype), err_msg=path)
    new, flat = leaves_by_path(optax.apply_updates(params, updates)), leaves_by_path(params)
    for path in flat.keys() - trainable:
        np.testing.assert_array_equal(new[path], flat[path], err_msg=path)


def test_same_optimizer_works_on_the_trainable_half(any_params):
    params = any_params
    tx = lj.optimizer(optax.adam(1e-2), params)
    half = lj.partition(params)[0]
    state = tx.init(half)
    assert sum(
        v.size for v in jax.tree.leaves(state) if jnp.ndim(v) > 0
    ) == 2 * _trainable_elements(params)
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.5), params)
    half_grads = lj.partition(grads)[0]
    updates, _ = tx.update(half_grads, state, half)
    chex.assert_trees_all_equal_structs(updates, half)
    assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates))
    # The same numbers as the trainable leaves of a whole-tree update.
    whole, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates, lj.partition(whole)[0])


def test_loraplus_scales_b_updates_exactly(params):
    half = lj.partition(params)[0]
    keys = iter(jax.random.split(jax.random.key(2), 8))
    grads = jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape), half)
    plain_tx = lj.optimizer(optax.sgd(0.1), params)
    plain, _ = plain_tx.update(grads, plain_tx.init(half), half)
    plus_tx = lj.optimizer(optax.sgd(0.1), params, loraplus_lr_ratio=16)
    plus, _ = plus_tx.update(grads, plus_tx.init(half), half)
    plain, plus = leaves_by_path(plain), leaves_by_path(plus)
    assert set(plus) == set(plain) == lj.trainable_paths(params)
    for path, u in plus.items():
        if path.endswith("_lora_b"):
            np.testing.assert_array_equal(u, 16 * plain[path], err_msg=path)
            assert bool(jnp.all(u != 0)), path
        else:
            np.testing.assert_array_equal(u, plain[path], err_msg=path)


def test_loraplus_on_the_whole_tree_still_freezes_frozen_leaves(params):
    tx = lj.optimizer(optax.adam(1e-2), params, loraplus_lr_ratio=4.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    trainable = lj.trainable_paths(params)
    for path, u in leaves_by_path(updates).items():
        assert bool(jnp.all(u != 0)) if path in trainable else not bool(jnp.any(u)), path


def test_loraplus_ratio_one_changes_nothing(params):
    half = lj.partition(params)[0]
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.25), half)
    outs = []
    for ratio in (None, 1.0):
        tx = lj.optimizer(optax.adam(1e-2), params, loraplus_lr_ratio=ratio)
        outs.append(tx.update(grads, tx.init(half), half)[0])
    chex.assert_trees_all_equal(*outs)


@pytest.mark.parametrize("ratio", [0, -1, 0.0, -1.0, float("nan")])
def test_invalid_loraplus_ratio_raises(params, ratio):
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be positive"):
        lj.optimizer(optax.sgd(0.1), params, loraplus_lr_ratio=ratio)


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
