"""DoRA (`LoraConfig(variant="dora")`): identity at init, merged equals unmerged, what the
gradients reach, the stop-gradient on the column norm, adapter files, and what it refuses."""

import chex
import flax.linen as nn
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import QC, X6, Boxed, assert_close, few_examples, randomize_adapters
from flax import traverse_util
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax.io import load_adapter, save_adapter

X = jax.random.normal(jax.random.key(0), (2, 3, 5))


class Mixed(nn.Module):
    """Dense (5 -> 6, bias), DenseGeneral (6 -> (2, 3)) and a per-head Einsum whose output
    puts the head axis last (its bias is in the output's order, not the kernel's)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(param_dtype=self.dtype)
        h = nn.Dense(6, name="q", **kw)(x)
        h = nn.DenseGeneral((2, 3), name="g", **kw)(h)
        return nn.Einsum((2, 3, 4), "bthd,hdf->btfh", name="e", **kw)(h)


def _drawn(init, *args, seed=0):
    """Every array leaf of `init(*args)`'s tree drawn on the host (shapes traced only: the
    tests compile no random-number program but lj.init's own): normal draws, adapter factors
    halved, magnitudes positive."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        value = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key if hasattr(path[-1], "key") else ""
        value = np.abs(value) + 0.5 if name.endswith("_lora_m") else value
        value = 0.5 * value if name.endswith(("_lora_a", "_lora_b")) else value
        return jnp.asarray(value.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init, *args))


def _dora(model, x, targets=("q", "g", "e")):
    base = _drawn(model.init, jax.random.key(1), x)
    config = lj.LoraConfig(rank=2, targets=targets, variant="dora")
    lora_model = lj.LoRA(model, config)
    return base, config, lora_model, lj.init(lora_model, jax.random.key(2), x, base_params=base)


def _perturb_magnitudes(params, seed=0):
    """Moves every magnitude m away from the column norm it starts at."""
    flat = traverse_util.flatten_dict(params, sep="/")
    rng = np.random.default_rng(seed)
    for k, v in flat.items():
        if k.endswith("_lora_m"):
            factor = 1.0 + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
            flat[k] = jnp.asarray((np.asarray(v, np.float32) * factor).astype(v.dtype))
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def mixed():
    return _dora(Mixed(), X)


def test_identity_at_init_and_magnitudes_are_column_norms(mixed):
    base, _, lora_model, params = mixed
    p = params["params"]
    # m starts at the column norms of W (the norm over the contracted axes).
    norms = {
        "q": jnp.linalg.norm(base["params"]["q"]["kernel"], axis=0),
        "g": jnp.linalg.norm(base["params"]["g"]["kernel"], axis=0),
        "e": jnp.linalg.norm(base["params"]["e"]["kernel"], axis=1),  # (heads, out)
    }
    for name, norm in norms.items():
        np.testing.assert_allclose(p[name]["kernel_lora_m"], norm, rtol=1e-6)
    # B = 0, so the adapter adds (m / ‖W‖ - 1) ⊙ (x @ W), and m is ‖W‖ as init computed it.
    # Not bit-exact: the forward program reduces the norm in its own order (fused with the
    # zero ΔW), so m / ‖W‖ can be 1 ± one float32 ulp: a few ulps of the output at most.
    y, y0 = jax.jit(lambda p, b: (lora_model.apply(p, X), Mixed().apply(b, X)))(params, base)
    ulp = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(y, y0, rtol=0, atol=4 * ulp * float(jnp.max(jnp.abs(y0))))


class _Pair(nn.Module):
    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features, name="q", param_dtype=self.dtype)(x)
        return nn.DenseGeneral((2, 3), name="g", param_dtype=self.dtype)(h)


@few_examples(3)
@hypothesis.given(
    fan_in=st.integers(2, 5),
    features=st.integers(2, 4),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_merged_equals_unmerged(fan_in, features, dtype, seed):
    model = _Pair(features, dtype)
    config = lj.LoraConfig(rank=2, targets=("q", "g"), variant="dora", param_dtype=dtype)
    lora_model = lj.LoRA(model, config)

    @jax.jit
    def run(params, x):
        merged = lj.merge(params)
        return lora_model.apply(params, x), model.apply(merged, x), merged

    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 1, fan_in)), dtype)
    params = _drawn(lora_model.init, jax.random.key(0), x, seed=seed)
    unmerged, from_merged, merged = run(params, x)
    chex.assert_trees_all_equal_structs(merged, jax.eval_shape(model.init, jax.random.key(0), x))
    assert_close(from_merged, unmerged, dtype)


def test_merge_follows_the_definition(mixed):
    _, _, _, params = mixed
    params = _perturb_magnitudes(randomize_adapters(params, jax.random.key(3)))
    q = params["params"]["q"]
    w, a, b, m = (q[k] for k in ("kernel", "kernel_lora_a", "kernel_lora_b", "kernel_lora_m"))
    v = w + 8.0 * a @ b  # scale = alpha / rank = 16 / 2
    expected = (m / jnp.linalg.norm(v, axis=0))[None, :] * v
    np.testing.assert_allclose(lj.merge(params)["params"]["q"]["kernel"], expected, rtol=1e-5)


def test_train_step_reaches_only_a_b_and_m(mixed):
    _, _, lora_model, params = mixed
    params = _perturb_magnitudes(randomize_adapters(params, jax.random.key(4)))
    labels = traverse_util.flatten_dict(lj.labels(params)["params"], sep="/")
    trainable = {k for k, v in labels.items() if v == "trainable"}
    assert trainable == {f"{n}/kernel_lora_{leaf}" for n in "qge" for leaf in "abm"}
    before = jax.tree.map(np.asarray, params["params"])
    loss_fn = lambda apply, x: jnp.mean(apply(x) ** 2)
    step = lj.make_train_step(lora_model, loss_fn, optax.sgd(0.1), donate=False)
    new, _, _ = step(params, step.init(params), X)
    flat_before = traverse_util.flatten_dict(before, sep="/")
    for k, v in traverse_util.flatten_dict(new["params"], sep="/").items():
        if k in trainable:
            assert not np.array_equal(np.asarray(v), flat_before[k]), k
        else:
            np.testing.assert_array_equal(np.asarray(v), flat_before[k], err_msg=k)


class _One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, use_bias=False, name="q")(x)


def test_gradient_treats_the_column_norm_as_constant():
    x, target = (
        jnp.asarray(np.random.default_rng(5).standard_normal(s), jnp.float32)
        for s in [(4, 5), (4, 3)]
    )
    config = lj.LoraConfig(rank=2, targets=("q",), variant="dora")
    lora_model = lj.LoRA(_One(), config)
    params = _drawn(lora_model.init, jax.random.key(0), x, seed=6)
    w = params["params"]["q"]["kernel"]
    s = config.scale_for("q")

    def ours(leaves):
        p = {**params["params"], "q": {**params["params"]["q"], **leaves}}
        return jnp.sum(lora_model.apply({**params, "params": p}, x) * target)

    def reference(leaves, constant_norm=True):
        a, b, m = (leaves[f"kernel_lora_{k}"] for k in "abm")
        norm = jnp.linalg.norm(w + s * a @ b, axis=0)
        norm = jax.lax.stop_gradient(norm) if constant_norm else norm
        return jnp.sum((m / norm)[None, :] * (x @ w + s * (x @ a) @ b) * target)

    leaves = {k: v for k, v in params["params"]["q"].items() if k != "kernel"}
    grads = jax.jit(
        lambda p: (
            jax.grad(ours)(p),
            jax.grad(reference)(p),
            jax.grad(lambda p: reference(p, constant_norm=False))(p),
        )
    )
    got, expected, through_norm = grads(leaves)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    # The norm does not depend on m, but B's gradient would flow through it too.
    assert not np.allclose(got["kernel_lora_b"], through_norm["kernel_lora_b"], rtol=1e-3)


def test_save_load_round_trip(mixed, tmp_path):
    base, config, lora_model, params = mixed
    params = _perturb_magnitudes(randomize_adapters(params, jax.random.key(8)))
    save_adapter(tmp_path / "dora", params, config)
    loaded, loaded_config = load_adapter(tmp_path / "dora", base)
    assert loaded_config == config and loaded_config.variant == "dora"
    chex.assert_trees_all_equal(loaded["params"], params["params"])
    assert (
        lj.plan(lora_model, jax.random.key(0), X).adapters == lj.adapters.Plan.of(loaded).adapters
    )


def test_magnitude_takes_the_kernels_output_axes():
    config = lj.LoraConfig(rank=2, targets=("query", "value"), variant="dora")
    # Shapes only (nothing compiles): the boxes and their names are what is checked.
    params = jax.eval_shape(lambda k: lj.init(lj.LoRA(Boxed(), config), k, X6), jax.random.key(2))
    assert params["params"]["query"]["kernel_lora_m"].names == ("model",)  # kernel (None, model)
    assert params["params"]["value"]["kernel_lora_m"].names == ("mlp",)  # kernel (embed, mlp)
    specs = lj.partition_specs(params)
    assert tuple(specs["params"]["query"]["kernel_lora_m"]) == ("model",)


class _Embedded(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4, name="q")(nn.Embed(10, 6, name="tok")(ids))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"LoraConfig.variant must be one of .*'vera'"):
        lj.LoraConfig(variant="vera")


@pytest.mark.parametrize("kind", ["embed", "conv"])
def test_dora_on_embeddings_and_convolutions(kind):
    """Identity at init; with A, B and m moved, the adapted model equals the merged one (the
    embedding's `attend` too: the Holder calls it on the lookup's output)."""
    from test_rules import Holder, _case

    layer, x, _, _ = _case(kind, (2, 5, 4, 3, 2), jnp.float32)
    model = Holder(layer)
    base = model.init(jax.random.key(1), x)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("layer",), variant="dora"))
    params = lj.init(lora_model, jax.random.key(2), x, base_params=base)
    assert_close(lora_model.apply(params, x), model.apply(base, x), jnp.float32)
    params = randomize_adapters(params, jax.random.key(3), 0.3)
    leaf = next(k for k in params["params"]["layer"] if k.endswith("_lora_m"))
    params["params"]["layer"][leaf] = params["params"]["layer"][leaf] * 1.2
    assert_close(lora_model.apply(params, x), model.apply(lj.merge(params), x), jnp.float32)


def test_qdora_on_a_4bit_base():
    """QDoRA: m starts at the dequantized kernel's column norms (identity at init), the
    forward matches the merge of the dequantized kernel, and requantizing keeps the report."""
    ids = jax.random.randint(jax.random.key(3), (2, 3), 0, 10)
    model = _Embedded()
    base = model.init(jax.random.key(0), ids)
    config = lj.LoraConfig(rank=2, targets=("q",), variant="dora", quantize=QC(block_size=2))
    lora_model = lj.LoRA(model, config)
    params = lj.init(lora_model, jax.random.key(1), ids, base_params=base)
    deq = lj.dequantize(params["params"]["q"]["kernel"])
    plain = {"params": {"tok": base["params"]["tok"], "q": {**base["params"]["q"], "kernel": deq}}}
    assert_close(lora_model.apply(params, ids), model.apply(plain, ids), jnp.float32)
    params = randomize_adapters(params, jax.random.key(2), 0.3)
    params["params"]["q"]["kernel_lora_m"] = params["params"]["q"]["kernel_lora_m"] * 1.3
    merged = lj.merge(params)
    assert_close(lora_model.apply(params, ids), model.apply(merged, ids), jnp.float32)
    _, report = lj.merge(params, requantize=True)
    assert set(report.errors) == {"params/q/kernel"}
    # Without base_params too: m from the 4-bit kernel, so the model starts as the 4-bit base.
    fresh = lj.init(lora_model, jax.random.key(1), ids)
    deq = lj.dequantize(fresh["params"]["q"]["kernel"])
    plain = {
        "params": {
            "tok": fresh["params"]["tok"],
            "q": {"kernel": deq, "bias": fresh["params"]["q"]["bias"]},
        }
    }
    assert_close(lora_model.apply(fresh, ids), model.apply(plain, ids), jnp.float32)


class _Plain(nn.Module):
    """A custom layer whose rule lays out no per-output vector (no per_output / bias)."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 3))


class _PlainRule(lj.rules.Rule):
    param = "w"

    def split(self, module, shape, args, kwargs):
        return lj.rules.Split(0, 1)

    def delta(self, module, method, args, kwargs, a, b, dropout):
        return dropout(args[0].astype(a.dtype)) @ a @ b


def test_dora_on_a_rule_without_a_definition_is_refused_by_name():
    lj.rules.register_rule(_Plain, _PlainRule())
    config = lj.LoraConfig(rank=2, targets=("p",), variant="dora")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _Plain(name="p")(x)

    with pytest.raises(ValueError, match=r"targets 'p' \(_Plain\), which it cannot adapt: DoRA"):
        lj.plan(lj.LoRA(Net(), config), jax.random.key(0), jnp.ones((1, 4)))
