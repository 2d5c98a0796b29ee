"""The LoRA wrapper and lj.init from pretrained parameters."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import records_by_path, assert_close, leaves_by_path, randomize_adapters

import lora_jax as lj

CALLS = []


def _recording_init(key, shape, dtype=jnp.float32):
    CALLS.append(isinstance(key, jax.core.Tracer))
    return nn.initializers.lecun_normal()(key, shape, dtype)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="query", kernel_init=_recording_init)(x)
        h = nn.Dense(16, name="value", kernel_init=_recording_init)(nn.relu(h))
        return nn.LayerNorm(name="norm")(h)


class Net(nn.Module):
    """Two blocks, one of them called twice (shared weights), and a head."""

    @nn.compact
    def __call__(self, x):
        block = Block(name="block_0")
        h = block(block(x))
        h = Block(name="block_1")(h)
        return nn.Dense(3, name="head")(h)


X = jnp.linspace(-1.0, 1.0, 2 * 16).reshape(2, 16)


@pytest.fixture(scope="module")
def base():
    return Net().init(jax.random.key(0), X)


def test_init_keeps_base_arrays_and_paths(base):
    lora_model = lj.LoRA(Net(), lj.LoraConfig(rank=4, targets=("query", "value")))
    params = lj.init(lora_model, jax.random.key(1), X, base_params=base)
    flat, base_flat = leaves_by_path(params), leaves_by_path(base)
    for path, value in base_flat.items():
        assert flat[path] is value, path
    added = sorted((set(flat) | set(records_by_path(params))) - set(base_flat))
    assert added == sorted(
        f"{col}/{blk}/{layer}/kernel_lora{leaf}"
        for blk in ("block_0", "block_1") for layer in ("query", "value")
        for col, leaf in (("params", "_a"), ("params", "_b"), ("lora", "")))
    assert flat["params/block_0/query/kernel_lora_a"].shape == (16, 4)
    assert flat["params/block_0/query/kernel_lora_b"].shape == (4, 16)
    chex.assert_trees_all_equal(lora_model.apply(params, X), Net().apply(base, X))


def test_init_never_materializes_base_weights(base):
    CALLS.clear()
    lora_model = lj.LoRA(Net(), lj.LoraConfig(targets=("query",)))
    lj.init(lora_model, jax.random.key(1), X, base_params=base)
    assert CALLS and all(CALLS), "a base initializer ran on concrete values"


def test_bare_params_dict_is_accepted(base):
    lora_model = lj.LoRA(Net(), lj.LoraConfig(targets=("query",)))
    params = lj.init(lora_model, jax.random.key(1), X, base_params=base["params"])
    assert "kernel_lora_a" in params["params"]["block_1"]["query"]


def test_shared_layer_gets_one_adapter_and_merges(base):
    lora_model = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query", "value", "head")))
    params = randomize_adapters(lj.init(lora_model, jax.random.key(1), X, base_params=base), jax.random.key(2))
    assert_close(lora_model.apply(params, X), Net().apply(lj.merge(params), X), jnp.float32)


def test_rank_and_alpha_patterns(base):
    cfg = lj.LoraConfig(rank=8, alpha=8.0, targets=("query", "value"),
                        rank_pattern={"block_1/query": 2}, alpha_pattern={"value": 2.0})
    params = lj.init(lj.LoRA(Net(), cfg), jax.random.key(1), X, base_params=base)
    flat = leaves_by_path(params)
    assert flat["params/block_1/query/kernel_lora_a"].shape == (16, 2)
    assert flat["params/block_0/query/kernel_lora_a"].shape == (16, 8)
    assert records_by_path(params)["lora/block_1/query/kernel_lora"].scale == 8.0 / 2
    assert records_by_path(params)["lora/block_0/value/kernel_lora"].scale == 2.0 / 8


def test_gaussian_init_and_param_dtype(base):
    cfg = lj.LoraConfig(rank=4, targets=("query",), init="gaussian", param_dtype=jnp.bfloat16)
    flat = leaves_by_path(lj.init(lj.LoRA(Net(), cfg), jax.random.key(1), X, base_params=base))
    a = flat["params/block_0/query/kernel_lora_a"]
    assert a.dtype == jnp.bfloat16 and float(jnp.std(a.astype(jnp.float32))) == pytest.approx(0.25, rel=0.3)
    assert not jnp.any(flat["params/block_0/query/kernel_lora_b"])


def test_trainable_extras_are_marked_and_copied(base):
    cfg = lj.LoraConfig(targets=("query",), trainable=("head/kernel",))
    params = lj.init(lj.LoRA(Net(), cfg), jax.random.key(1), X, base_params=base)
    assert "params/head/kernel" in lj.trainable_paths(params)
    assert params["params"]["head"]["kernel"] is not base["params"]["head"]["kernel"]
    chex.assert_trees_all_equal(params["params"]["head"]["kernel"], base["params"]["head"]["kernel"])


# --------------------------------------------------------------------------- errors


def test_wrong_shape_names_the_leaf(base):
    bad = jax.tree.map(lambda v: v, base)
    bad["params"]["block_1"]["value"]["kernel"] = jnp.zeros((16, 15))
    with pytest.raises(ValueError, match=r"Leaf 'params/block_1/value/kernel' has shape \(16, 15\) but the model expects \(16, 16\)"):
        lj.init(lj.LoRA(Net(), lj.LoraConfig(targets=("query",))), jax.random.key(1), X, base_params=bad)


def test_missing_and_unexpected_leaves_are_listed(base):
    bad = jax.tree.map(lambda v: v, base)
    del bad["params"]["head"]["bias"]
    bad["params"]["head"]["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"(?s)Leaf 'params/head/bias' is missing.*Leaf 'params/head/extra' is not a parameter"):
        lj.init(lj.LoRA(Net(), lj.LoraConfig(targets=("query",))), jax.random.key(1), X, base_params=bad)


def test_targets_matching_nothing_lists_adaptable_paths(base):
    with pytest.raises(ValueError, match=r"matches no module. Adaptable module paths: \['block_0/query', .*'head'\]"):
        lj.init(lj.LoRA(Net(), lj.LoraConfig(targets=("q_proj",))), jax.random.key(1), X, base_params=base)


def test_pattern_key_matching_no_target(base):
    cfg = lj.LoraConfig(targets=("query",), alpha_pattern={"value": 2.0})
    with pytest.raises(ValueError, match=r"alpha_pattern key 'value' matches none of the targeted modules"):
        lj.init(lj.LoRA(Net(), cfg), jax.random.key(1), X, base_params=base)


def test_trainable_matching_nothing(base):
    cfg = lj.LoraConfig(targets=("query",), trainable=("lm_head/kernel",))
    with pytest.raises(ValueError, match=r"trainable pattern 'lm_head/kernel' matches no parameter path"):
        lj.init(lj.LoRA(Net(), cfg), jax.random.key(1), X, base_params=base)


def test_params_of_another_rank_are_rejected(base):
    params = lj.init(lj.LoRA(Net(), lj.LoraConfig(rank=4, targets=("query",))), jax.random.key(1), X, base_params=base)
    other = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query",)))
    with pytest.raises(ValueError, match=r"The adapter of 'block_0/query/kernel' does not match the LoraConfig: rank 4 in the tree but 2 from the config"):
        other.apply(params, X)


def test_missing_lora_collection_is_explained(base):
    lora_model = lj.LoRA(Net(), lj.LoraConfig(targets=("query",)))
    params = lj.init(lora_model, jax.random.key(1), X, base_params=base)
    with pytest.raises(ValueError, match=r"holds no adapter record for it \('lora/block_0/query/kernel_lora'\)"):
        lora_model.apply({"params": params["params"]}, X)
    with pytest.raises(ValueError, match=r"holds no adapter record .* pass the whole tree"):
        lora_model.apply(base, X)
    no_leaf = {"params": base["params"], "lora": params["lora"]}
    with pytest.raises(ValueError, match=r"'params/block_0/query/kernel_lora_a' is missing"):
        lora_model.apply(no_leaf, X)


def test_bad_arguments():
    with pytest.raises(TypeError, match="init needs a lora_jax.LoRA module"):
        lj.init(Net(), jax.random.key(0), X)
    with pytest.raises(TypeError, match="LoRA.config must be a lora_jax.LoraConfig"):
        lj.LoRA(Net(), {"rank": 4}).init(jax.random.key(0), X)


class Encoder(nn.Module):
    def setup(self):
        self.query = nn.Dense(4)
        self.head = nn.Dense(2)

    def __call__(self, x):
        return self.head(self.encode(x))

    def encode(self, x):
        return self.query(x)


def test_invoke_runs_other_methods_with_adapters():
    x = jnp.ones((3, 5))
    base = Encoder().init(jax.random.key(0), x)
    lora_model = lj.LoRA(Encoder(), lj.LoraConfig(rank=2, targets=("query",)))
    params = randomize_adapters(lj.init(lora_model, jax.random.key(1), x, base_params=base), jax.random.key(2))
    encode = lambda m, x: m.invoke("encode", x)
    adapted = lora_model.apply(params, x, method=encode)
    assert_close(adapted, Encoder().apply(lj.merge(params), x, method=Encoder.encode), jnp.float32)
    assert not jnp.allclose(adapted, Encoder().apply(base, x, method=Encoder.encode))


class Counted(nn.Module):
    @nn.compact
    def __call__(self, x):
        count = self.variable("params", "step_count", lambda: jnp.int32(3))
        return nn.Dense(4, name="value")(x) + count.value.astype(x.dtype)


def test_trainable_extra_must_be_floating():
    x = jnp.ones((2, 6))
    base = Counted().init(jax.random.key(0), x)
    cfg = lj.LoraConfig(rank=2, targets=("value",), trainable=("step_count",))
    with pytest.raises(ValueError, match=r"LoraConfig.trainable selects 'step_count', a int32 parameter"):
        lj.init(lj.LoRA(Counted(), cfg), jax.random.key(1), x, base_params=base)
