"""Tests for `lora_jax.adapters.geometry`: shapes, axis maps, ΔW and the fit check."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from lora_jax.adapters import Geometry, Split


def test_shapes_of_a_multi_axis_and_a_batched_kernel():
    g = Geometry((16, 4, 8), n_batch=0, n_in=1, rank=2)  # DenseGeneral (in, heads, head_dim)
    assert (g.a_shape, g.b_shape, g.fan_in, g.fan_out) == ((16, 2), (2, 4, 8), 16, 32)
    e = Geometry((4, 8, 6), n_batch=1, n_in=1, rank=3)  # Einsum with a batch axis
    assert (e.a_shape, e.b_shape, e.batch_shape) == ((4, 8, 3), (4, 3, 6), (4,))
    assert Split(1, 1).adapter_shapes((4, 8, 6), 3) == (e.a_shape, e.b_shape)
    assert e.leaf_shapes((2, 4, 8, 6)) == {"a": (2, 4, 8, 3), "b": (2, 4, 3, 6)}  # scan-stacked
    with pytest.raises(ValueError, match="at least one input and one output axis"):
        Geometry((8,), 0, 1, 2)


def test_leaf_axes_follow_the_kernel_with_the_rank_replicated():
    g = Geometry((16, 4, 8), 0, 1, 2)
    assert g.leaf_axes(("embed", "heads", "kv")) == {
        "a": ("embed", None),
        "b": (None, "heads", "kv"),
    }
    assert g.leaf_axes(("fsdp",)) == {"a": ("fsdp", None), "b": (None, None, None)}  # padded
    stacked = g.leaf_axes(("layers", "embed", "heads", None), ndim=4)
    assert stacked == {"a": ("layers", "embed", None), "b": ("layers", None, "heads", None)}


@given(
    batch=st.integers(0, 2),
    ins=st.integers(1, 2),
    outs=st.integers(1, 2),
    rank=st.integers(1, 3),
    stacked=st.integers(0, 1),
)
def test_delta_equals_a_dense_product(batch, ins, outs, rank, stacked):
    shape = (2,) * batch + (3,) * ins + (2,) * outs
    g = Geometry(shape, batch, ins, rank)
    lead = (2,) * stacked
    a = jax.random.normal(jax.random.key(0), lead + g.a_shape)
    b = jax.random.normal(jax.random.key(1), lead + g.b_shape)
    delta = g.delta(a, b, 0.5)
    assert delta.shape == lead + shape and delta.dtype == jnp.float32
    n = int(np.prod(lead + g.batch_shape))
    dense = np.einsum(
        "nkr,nro->nko",
        np.asarray(a).reshape(n, g.fan_in, rank),
        np.asarray(b).reshape(n, rank, g.fan_out),
    )
    np.testing.assert_allclose(
        np.asarray(delta).reshape(n, g.fan_in, g.fan_out), 0.5 * dense, rtol=1e-5, atol=1e-5
    )


def test_problems_name_the_leaf_and_both_ranks():
    g = Geometry((6, 8), 0, 1, 2)
    assert g.problems("q/kernel", (6, 8), {"a": (6, 2), "b": (2, 8)}) == []
    (line,) = g.problems("q/kernel", (6, 8), {"a": (6, 4), "b": (2, 8)})
    assert (
        line
        == "Adapter leaf 'a' of 'q/kernel' has shape (6, 4) (rank 4) but its record says (6, 2) (rank 2)."
    )
    (line,) = g.problems("q/kernel", (6, 9), {})
    assert "has shape (6, 9) but its adapter was made for shape (6, 8)" in line


def test_rank_warning_only_above_min_fan():
    assert Geometry((6, 8), 0, 1, 6).rank_warning() is None
    assert (
        "rank 7 exceeds min(fan_in, fan_out) = min(6, 8) = 6"
        in Geometry((6, 8), 0, 1, 7).rank_warning()
    )
