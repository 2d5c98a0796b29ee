"""Tests for `lora_jax.ops.summary`: exact parameter counts and bytes of a LoRA tree.

Adapters and trainable extras count as trainable (extras with their own dtype's bytes), the
"lora" records never count, a base tree has nothing trainable, and `jax.eval_shape` output
(boxed or not) gives the same summary as the arrays.
"""

import jax
import jax.numpy as jnp
import pytest
from conftest import X6, Boxed, Net, build

import lora_jax as lj


def test_summary_counts_and_bytes_exactly():
    _, _, _, params = build(Net(param_dtype=jnp.bfloat16))  # bf16 base, float32 adapters
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
    _, _, _, params = build(Net(param_dtype=jnp.bfloat16), trainable=("norm/scale",))
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
    _, lora_model, _base, params = net
    expected = lj.summary(params)
    abstract = jax.eval_shape(lambda key: lj.init(lora_model, key, X6), jax.random.key(0))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(abstract))
    assert lj.summary(abstract) == expected
    assert lj.summary(jax.eval_shape(lambda: params)) == expected
    boxed = build(Boxed())[3]
    assert lj.summary(jax.eval_shape(lambda: boxed)) == lj.summary(boxed)
    assert (
        lj.summary(boxed).total_params == (6 * 8 + 8) + (8 * 4 + 4) + 6 * 2 + 2 * 8 + 8 * 2 + 2 * 4
    )
