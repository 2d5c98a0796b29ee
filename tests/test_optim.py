"""lj.optimizer: state only for trainable leaves, frozen updates exactly zero, LoRA+."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import leaves_by_path

import lora_jax as lj


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="value")(nn.relu(nn.Dense(8, name="query")(x)))


X = jnp.ones((2, 5))


@pytest.fixture(scope="module")
def params():
    base = Net().init(jax.random.key(0), X)
    lora_model = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query", "value")))
    return lj.init(lora_model, jax.random.key(1), X, base_params=base)


def _trainable_size(params):
    return sum(v.size for k, v in leaves_by_path(params).items() if k in lj.trainable_paths(params))


def test_state_only_for_trainable_leaves(params):
    tx = lj.optimizer(optax.adam(1e-3), params)
    state_arrays = [v for v in jax.tree.leaves(tx.init(params)) if jnp.ndim(v) > 0]
    assert sum(v.size for v in state_arrays) == 2 * _trainable_size(params)  # mu and nu
    trainable_half = lj.partition(params)[0]
    half_state = tx.init(trainable_half)
    assert sum(v.size for v in jax.tree.leaves(half_state) if jnp.ndim(v) > 0) == 2 * _trainable_size(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable_half), half_state, trainable_half)
    assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates))


def test_frozen_updates_are_exactly_zero(params):
    tx = lj.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), params)
    grads = jax.tree.map(lambda v: jnp.ones_like(v), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    trainable = lj.trainable_paths(params)
    for path, u in leaves_by_path(updates).items():
        if path in trainable:
            assert bool(jnp.all(u != 0)), path
        else:
            assert not bool(jnp.any(u)), path


def test_loraplus_scales_b_updates(params):
    half = lj.partition(params)[0]
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.5), half)
    tx0 = lj.optimizer(optax.sgd(0.1), params)
    plain, _ = tx0.update(grads, tx0.init(half), half)
    tx = lj.optimizer(optax.sgd(0.1), params, loraplus_lr_ratio=16.0)
    plus, _ = tx.update(grads, tx.init(half), half)
    for path, u in leaves_by_path(plus).items():
        ratio = 16.0 if path.endswith("_lora_b") else 1.0
        assert jnp.allclose(u, ratio * leaves_by_path(plain)[path]), path


@pytest.mark.parametrize("ratio", [0, -1.0])
def test_bad_loraplus_ratio(params, ratio):
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be positive"):
        lj.optimizer(optax.sgd(0.1), params, loraplus_lr_ratio=ratio)
