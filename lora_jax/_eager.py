"""Running a traced function op by op, cut to what its outputs need.

Used where a function is called once and its compiled program would be mostly random draws:
making adapter leaves in `lora_jax.init` (and random base weights in the benchmarks). XLA
compiles each key derivation and draw of such a program anew, about 20 ms each on a 2-core
CPU; run op by op, the draws of one shape share one compiled kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

try:  # JAX's dead-code pass over a jaxpr (internal; `jax.jit` where a JAX lacks it)
    from jax._src.interpreters.partial_eval import dce_jaxpr as _dce_jaxpr
except ImportError:  # pragma: no cover - a JAX without it
    _dce_jaxpr = None


def needed_only(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` without the work its outputs do not need, and without compiling it as one
    program: traced once, cut by JAX's dead-code pass (for adapter leaves: the keys'
    derivation and the draws, not the model's forward pass), then run op by op. The random
    bits are those of `jax.jit(fn)(*args)` (which is what runs where this JAX lacks the
    pass); a value computed from them may differ in its last bit where XLA fuses the whole
    program differently (flax's scaled normal initializers: within 1.2e-7 relative; the
    adapter inits of `lora_jax.init` came out bit-identical in every config tested; the test
    allows one ulp).

    Measured (2-core CPU): the adapter leaves of SmolLM2-135M with adapters on all 210 linear
    layers, 11.6 s -> 1.65 s; Llama-3.2-1B-shaped random base weights, 29 s -> 17 s (most of
    what is left is drawing 1.2e9 numbers).
    """
    if _dce_jaxpr is None:
        return jax.jit(fn)(*args)
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    try:
        jaxpr, used = _dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    except (TypeError, ValueError):  # pragma: no cover - the internal pass changed its form
        return jax.jit(fn)(*args)
    inputs = [x for x, u in zip(jax.tree.leaves(args), used, strict=True) if u]
    out = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, closed.consts))(*inputs)
    # An output that traced to a constant comes back as a host value: arrays, as from jit.
    return jax.tree.unflatten(jax.tree.structure(shape), [jnp.asarray(x) for x in out])
