"""Shared test set-up: strict JAX numerics, hypothesis profiles, small helpers."""

import os
import zlib

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

import lora_jax as lj

jax.config.update("jax_numpy_rank_promotion", "raise")
# Eight CPU devices, so that the mesh tests (test_sharding.py) run in-process; everything else
# still runs on device 0. Must precede the first use of a device; an XLA_FLAGS device count
# given by the caller wins. (Unlike XLA_FLAGS, this does not leak into subprocesses.)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)

hypothesis.settings.register_profile(
    "default", max_examples=8, deadline=None, derandomize=True, print_blob=True)
hypothesis.settings.register_profile(
    "thorough", max_examples=200, deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Bound for bfloat16 comparisons: bf16 keeps 8 significant bits (relative step 2**-8); the
# merged kernel is rounded to bf16 once and the unmerged path rounds the base output and the
# delta separately, then a dot over up to a few hundred terms accumulates the rounding.
BF16_REL_TOL = 5e-2
F32_REL_TOL = 1e-5


def randomize_adapters(params, key, scale=0.5):
    """Replaces every adapter leaf by a normal draw, so that ΔW is non-zero."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, v in flat.items():
        if path.endswith(("_lora_a", "_lora_b")):
            k = jax.random.fold_in(key, zlib.crc32(path.encode()))
            value = meta.unbox(v)  # adapters of a sharding-annotated kernel are boxed alike
            new = (scale * jax.random.normal(k, value.shape, jnp.float32)).astype(value.dtype)
            flat[path] = v.replace_boxed(new) if isinstance(v, meta.AxisMetadata) else new
    return traverse_util.unflatten_dict(flat, sep="/")


def assert_close(actual, expected, dtype, reference=None):
    """Asserts two outputs agree to the tolerance of `dtype`, relative to the output's size."""
    reference = expected if reference is None else reference
    f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)
    size = max([1.0] + [float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(f32(reference))])
    tol = (BF16_REL_TOL if jnp.dtype(dtype) == jnp.bfloat16 else F32_REL_TOL) * size
    chex.assert_trees_all_close(f32(actual), f32(expected), atol=tol, rtol=0)


def leaves_by_path(tree):
    """Array leaves by '/'-joined path (the "lora" collection's records hold no arrays)."""
    return {
        k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()
        if not isinstance(v, lj.adapters.Record)
    }


def same_arrays(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def records_by_path(tree):
    """The "lora" collection's records by '/'-joined path."""
    return {
        k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()
        if isinstance(v, lj.adapters.Record)
    }
