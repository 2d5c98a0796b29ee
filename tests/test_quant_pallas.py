"""Tests for `lora_jax.quant.pallas`: the Pallas kernel, run in interpret mode on CPU.

It equals the jnp reference for every format, for ``x @ W`` and ``g @ W.T``, on sizes that
do not fill a tile, and in bfloat16.
"""

import jax
import jax.numpy as jnp
import pytest
from conftest import F32, QC, assert_close

import lora_jax as lj
from lora_jax import quant
from lora_jax.quant import pallas as dequant_matmul


@pytest.mark.parametrize("fmt", sorted(quant.TABLES))
@pytest.mark.parametrize("m,k,n,block", [(1, 64, 32, 32), (17, 100, 48, 32), (5, 128, 64, 64)])
@pytest.mark.parametrize("transpose", [False, True])
def test_pallas_kernel_matches_reference(fmt, m, k, n, block, transpose):
    w = jax.random.normal(jax.random.key(7), (k, n))
    qt = quant.quantize_array(w, QC(fmt=fmt, block_size=block))
    x = jax.random.normal(jax.random.key(8), (m, n if transpose else k))
    dense = quant.dequantize(qt)
    expected = x @ (dense.T if transpose else dense)
    out = dequant_matmul.pallas_matmul(x, qt, transpose=transpose, interpret=True)
    assert out.shape == expected.shape
    assert_close(out, expected, F32)


def test_pallas_kernel_in_bfloat16():
    w = jax.random.normal(jax.random.key(9), (128, 64))
    qt = quant.quantize_array(w, lj.QuantConfig())
    x = jax.random.normal(jax.random.key(10), (16, 128)).astype(jnp.bfloat16)
    out = dequant_matmul.pallas_matmul(x, qt, interpret=True)
    assert out.dtype == jnp.bfloat16
    expected = x.astype(F32) @ quant.dequantize(qt, F32)
    assert_close(out, expected, jnp.bfloat16)
