"""lj.make_train_step: trains adapters only, frozen leaves bit-identical, traces once."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_by_path, randomize_adapters

import lora_jax as lj


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="query")(x))
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(4, name="value")(h)


X = jax.random.normal(jax.random.key(0), (8, 6))
Y = jax.random.normal(jax.random.key(1), (8, 4))


def mse(apply, batch):
    x, y = batch
    return jnp.mean((apply(x) - y) ** 2)


def _setup(**cfg):
    base = Net().init(jax.random.key(2), X)
    lora_model = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query", "value"), **cfg))
    return base, lora_model, lj.init(lora_model, jax.random.key(3), X, base_params=base)


def test_trains_adapters_only_and_keeps_frozen_bit_identical():
    base, lora_model, params = _setup()
    before = {k: np.asarray(v) for k, v in leaves_by_path(params).items()}
    base_copy = jax.tree.map(np.asarray, base)
    step = lj.make_train_step(lora_model, mse, lj.optimizer(optax.adam(1e-2), params))
    opt_state = step.init(params)
    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state, (X, Y))
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    after = leaves_by_path(params)
    trainable = lj.trainable_paths(params)
    for path, value in after.items():
        if path in trainable:
            assert not np.array_equal(before[path], value), path
        else:
            np.testing.assert_array_equal(before[path], value)
            assert value is leaves_by_path(base).get(path, value), path  # same array objects
    chex.assert_trees_all_equal(base, base_copy)  # the pretrained arrays are intact


def test_traces_once():
    _, lora_model, params = _setup()
    chex.clear_trace_counter()
    counted = chex.assert_max_traces(mse, n=1)
    step = lj.make_train_step(lora_model, counted, optax.sgd(0.1))
    opt_state = step.init(params)
    for _ in range(4):
        params, opt_state, _ = step(params, opt_state, (X, Y))


def test_extras_are_trained_and_pretrained_arrays_survive_donation():
    base, lora_model, params = _setup(trainable=("norm/scale",))
    pretrained_scale = np.asarray(base["params"]["norm"]["scale"])
    step = lj.make_train_step(lora_model, mse, lj.optimizer(optax.adam(1e-2), params))
    opt_state = step.init(params)
    for _ in range(3):
        params, opt_state, _ = step(params, opt_state, (X, Y))
    np.testing.assert_array_equal(base["params"]["norm"]["scale"], pretrained_scale)  # still readable
    assert not np.array_equal(params["params"]["norm"]["scale"], pretrained_scale)


def test_dropout_rng_changes_the_loss():
    _, lora_model, params = _setup(dropout=0.5)
    params = randomize_adapters(params, jax.random.key(4))
    step = lj.make_train_step(lora_model, mse, optax.sgd(0.0), donate=False)
    opt_state = step.init(params)
    _, _, plain = step(params, opt_state, (X, Y))
    _, _, again = step(params, opt_state, (X, Y))
    _, _, dropped = step(params, opt_state, (X, Y), rng=jax.random.key(5))
    assert float(plain) == float(again) and float(plain) != float(dropped)


def test_has_aux_and_plain_optax_matches_wrapped():
    _, lora_model, params = _setup()
    aux_loss = lambda apply, b: (mse(apply, b), {"n": b[0].shape[0]})
    results = []
    for tx in (optax.adam(1e-2), lj.optimizer(optax.adam(1e-2), params)):
        step = lj.make_train_step(lora_model, aux_loss, tx, has_aux=True, donate=False)
        p, s, loss, aux = step(params, step.init(params), (X, Y))
        assert aux == {"n": 8}
        results.append(p)
    chex.assert_trees_all_close(*results)


def test_errors():
    _, lora_model, params = _setup()
    tx = optax.adam(1e-2)
    step = lj.make_train_step(lora_model, mse, tx)
    with pytest.raises(ValueError, match=r"step.init\(params\)"):
        step(params, tx.init(params), (X, Y))
    with pytest.raises(TypeError, match="make_train_step needs a lora_jax.LoRA module"):
        lj.make_train_step(Net(), mse, tx)
