"""labels / partition / combine / merge / summary over LoRA trees."""

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
        count = self.variable("params", "step_count", lambda: jnp.int32(3))  # a non-float leaf
        h = nn.Dense(8, name="query", kernel_init=nn.with_partitioning(
            nn.initializers.lecun_normal(), (None, "model")))(x)
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(4, name="value")(h) + count.value.astype(x.dtype)


X = jnp.ones((2, 6))


def _params(**cfg):
    model = Net()
    base = model.init(jax.random.key(0), X)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("query", "value"), **cfg))
    return model, lora_model, base, lj.init(lora_model, jax.random.key(1), X, base_params=base)


def test_labels_and_partition_round_trip():
    _, _, _, params = _params(trainable=("norm/scale",))
    flat_labels = leaves_by_path(lj.labels(params))
    trainable = {k for k, v in flat_labels.items() if v == "trainable"}
    assert trainable == {
        "params/query/kernel_lora_a", "params/query/kernel_lora_b",
        "params/value/kernel_lora_a", "params/value/kernel_lora_b", "params/norm/scale"}
    tr, fr = lj.partition(params)
    assert set(leaves_by_path(tr)) == trainable
    assert not set(leaves_by_path(fr)) & trainable
    back = lj.combine(tr, fr)
    chex.assert_trees_all_equal(back, params)
    for path, value in leaves_by_path(back).items():
        assert value is leaves_by_path(params)[path]
    with pytest.raises(ValueError, match=r"combine got leaf 'params/norm/scale' twice \(5 shared leaves\)"):
        lj.combine(tr, tr)


def test_merge_structure_dtypes_boxes_and_jit():
    model, lora_model, base, params = _params()
    params = randomize_adapters(params, jax.random.key(2))
    merged = lj.merge(params)
    chex.assert_trees_all_equal_structs(merged, base)
    chex.assert_trees_all_equal_dtypes(merged, base)
    box = merged["params"]["query"]["kernel"]
    assert isinstance(box, nn.Partitioned) and box.names == (None, "model")
    chex.assert_trees_all_close(jax.jit(lj.merge)(params), merged)
    chex.assert_trees_all_close(model.apply(merged, X), lora_model.apply(params, X), atol=1e-5)


def test_merge_bf16_is_float32_math_rounded_once():
    model = nn.Dense(5, name="query", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    holder = lj.LoRA(_Wrap(model), lj.LoraConfig(rank=3, alpha=6.0, targets=("layer",)))
    base = _Wrap(model).init(jax.random.key(0), X)
    params = randomize_adapters(lj.init(holder, jax.random.key(1), X, base_params=base), jax.random.key(2))
    p = params["params"]["layer"]
    w, a, b = (np.asarray(p[k], np.float32) for k in ("kernel", "kernel_lora_a", "kernel_lora_b"))
    expected = jnp.asarray(w + 2.0 * (a @ b)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(lj.merge(params)["params"]["layer"]["kernel"], expected)


class _Wrap(nn.Module):
    layer: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.layer(x)


def test_merge_without_adapters_returns_the_same_object():
    base = Net().init(jax.random.key(0), X)
    assert lj.merge(base) is base


def test_merge_errors_name_the_path():
    _, _, _, params = _params()
    bad = jax.tree.map(lambda v: v, params)
    bad["params"]["value"]["kernel_lora_b"] = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"Adapter of 'params/value/kernel' does not fit it: parameter shape \(8, 4\)"):
        lj.merge(bad)
    missing = jax.tree.map(lambda v: v, params)
    del missing["lora"]["query"]["kernel_lora_scale"]
    with pytest.raises(ValueError, match=r"'params/query/kernel_lora_a' has no 'lora/query/kernel_lora_scale'"):
        lj.merge(missing)


def test_summary_counts_and_bytes():
    _, _, _, params = _params()
    s = lj.summary(params)
    adapters = 6 * 2 + 2 * 8 + 8 * 2 + 2 * 4
    base = 6 * 8 + 8 + 8 + 8 + 8 * 4 + 4 + 1  # kernels, biases, norm, step_count
    assert (s.trainable_params, s.total_params) == (adapters, adapters + base)
    assert (s.trainable_bytes, s.total_bytes) == (4 * adapters, 4 * (adapters + base))
    assert "trainable params: 52 || all params: 161" in str(s)
    assert lj.summary(jax.eval_shape(lambda: params)) == s


def test_non_float_leaves_pass_through_everything():
    _, lora_model, _, params = _params()
    assert leaves_by_path(lj.labels(params))["params/step_count"] == "frozen"
    tx = lj.optimizer(optax.adam(1e-2), params)
    state = tx.init(params)
    grads = jax.tree.map(lambda v: jnp.zeros_like(v), params)
    updates, _ = tx.update(grads, state, params)
    assert leaves_by_path(updates)["params/step_count"] == 0
    assert int(lj.merge(params)["params"]["step_count"]) == 3
