"""Tests for `lora_jax.quant.matmul`: the dequantizing matmul and its VJP.

`qmatmul` equals the dense product (float32 and bfloat16), its gradient equals the dense one
while the backward pass saves only the packed codes and gives the frozen tensor no gradient,
a deep stack never keeps every dense kernel alive; the removed Pallas kernel is named.
"""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import F32, QC, assert_close
from hypothesis import given
from jax.ad_checkpoint import print_saved_residuals

import lora_jax as lj
from lora_jax import quant


@pytest.mark.parametrize("kernel", ["xla"])
def test_qmatmul_gradient_and_residuals(kernel, capsys):
    w = jax.random.normal(jax.random.key(5), (96, 80))
    qt = quant.quantize_array(w, QC(block_size=32))
    x = jax.random.normal(jax.random.key(6), (3, 96))
    dense = quant.dequantize(qt)
    f = lambda x: jnp.sum(jnp.sin(quant.qmatmul(x, qt, kernel)))
    g = lambda x: jnp.sum(jnp.sin(x @ dense))
    assert_close(jax.grad(f)(x), jax.grad(g)(x), F32)
    print_saved_residuals(f, x)
    saved = capsys.readouterr().out
    assert "u8[48,80]" in saved  # the packed codes
    assert "f32[96,80]" not in saved and "f32[80,96]" not in saved  # never a dense kernel


def test_qmatmul_has_no_gradient_for_the_frozen_tensor():
    qt = quant.quantize_array(jnp.ones((64, 16)), QC())
    grads = jax.grad(lambda q, x: jnp.sum(quant.qmatmul(x, q)), allow_int=True)(
        qt, jnp.ones((2, 64))
    )
    assert not any(
        np.any(np.asarray(leaf, dtype=np.float64))
        for leaf in jax.tree.leaves(grads)
        if leaf.dtype != jax.dtypes.float0
    )


@given(
    m=st.integers(1, 5),
    k=st.integers(8, 80),
    n=st.integers(1, 24),
    block=st.sampled_from([8, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_qmatmul_equals_dense_product(m, k, n, block, dtype, seed):
    keys = jax.random.split(jax.random.key(seed))
    qt = quant.quantize_array(
        jax.random.normal(keys[0], (k, n)), lj.QuantConfig(block_size=block, compute_dtype=dtype)
    )
    x = jax.random.normal(keys[1], (2, m, k)).astype(dtype)
    out = jax.jit(quant.qmatmul)(x, qt)
    chex.assert_shape(out, (2, m, n))
    chex.assert_type(out, dtype)
    expected = x.astype(F32) @ jax.jit(quant.dequantize, static_argnums=1)(qt, F32)
    assert_close(out, expected, dtype)


def test_dense_kernels_never_all_alive_at_once():
    """Compiled temp memory of a deep stack's gradient holds a few dense kernels, not all.

    Without the data dependence in the XLA path, XLA shares each layer's dequantization
    between the forward and backward pass and keeps all of them alive (measured: 37.8 MB
    for eight 4 MB kernels; 13.8 MB with it).
    """
    layers, k = 8, 256
    qts = [
        quant.quantize_array(jax.random.normal(jax.random.key(i), (k, k)), QC())
        for i in range(layers)
    ]

    def loss(x, qts):
        for q in qts:
            x = jnp.tanh(quant.qmatmul(x, q, "xla"))
        return jnp.sum(x)

    x = jnp.ones((8, k))
    temp = jax.jit(jax.grad(loss)).lower(x, qts).compile().memory_analysis().temp_size_in_bytes
    assert temp < layers / 2 * k * k * 4


def test_the_removed_pallas_kernel_is_named():
    with pytest.raises(ValueError, match=r"kernel='pallas' was removed: on an H200"):
        lj.QuantConfig(kernel="pallas")
