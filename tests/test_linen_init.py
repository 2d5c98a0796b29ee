"""Tests for `lora_jax.linen.init` and the plan it computes.

`lj.init` from pretrained parameters keeps the base arrays and paths, never runs a base
initializer on concrete values, accepts a bare params dict, applies rank/alpha patterns, init
schemes and trainable extras, warns about ranks above the layer size, and quantizes the kernels
QuantConfig selects (4-bit base); wrong base_params, samples, targets, patterns, trainable
extras, integer kernels and quantized kernels fail with messages naming the leaf.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    CALLS,
    QC,
    X6,
    X16,
    BlockNet,
    Layers,
    QueryValue,
    leaves_by_path,
    query_value,
    records_by_path,
)

import lora_jax as lj
from lora_jax import _eager


def test_init_keeps_base_arrays_and_paths(block_base):
    lora_model = lj.LoRA(BlockNet(), lj.LoraConfig(rank=4, targets=("query", "value")))
    params = lj.init(lora_model, jax.random.key(1), X16, base_params=block_base)
    flat, base_flat = leaves_by_path(params), leaves_by_path(block_base)
    for path, value in base_flat.items():
        assert flat[path] is value, path
    added = sorted((set(flat) | set(records_by_path(params))) - set(base_flat))
    assert added == sorted(
        f"{col}/{blk}/{layer}/kernel_lora{leaf}"
        for blk in ("block_0", "block_1")
        for layer in ("query", "value")
        for col, leaf in (("params", "_a"), ("params", "_b"), ("lora", ""))
    )
    assert flat["params/block_0/query/kernel_lora_a"].shape == (16, 4)
    assert flat["params/block_0/query/kernel_lora_b"].shape == (4, 16)
    chex.assert_trees_all_equal(lora_model.apply(params, X16), BlockNet().apply(block_base, X16))


def test_init_never_materializes_base_weights(block_base):
    CALLS.clear()
    lora_model = lj.LoRA(BlockNet(), lj.LoraConfig(targets=("query",)))
    lj.init(lora_model, jax.random.key(1), X16, base_params=block_base)
    assert CALLS and all(CALLS), "a base initializer ran on concrete values"


def test_bare_params_dict_is_accepted(block_base):
    lora_model = lj.LoRA(BlockNet(), lj.LoraConfig(targets=("query",)))
    params = lj.init(lora_model, jax.random.key(1), X16, base_params=block_base["params"])
    assert "kernel_lora_a" in params["params"]["block_1"]["query"]


def test_rank_and_alpha_patterns(block_base):
    cfg = lj.LoraConfig(
        rank=8,
        alpha=8.0,
        targets=("query", "value"),
        rank_pattern={"block_1/query": 2},
        alpha_pattern={"value": 2.0},
    )
    params = lj.init(lj.LoRA(BlockNet(), cfg), jax.random.key(1), X16, base_params=block_base)
    flat = leaves_by_path(params)
    assert flat["params/block_1/query/kernel_lora_a"].shape == (16, 2)
    assert flat["params/block_0/query/kernel_lora_a"].shape == (16, 8)
    assert records_by_path(params)["lora/block_1/query/kernel_lora"].scale == 8.0 / 2
    assert records_by_path(params)["lora/block_0/value/kernel_lora"].scale == 2.0 / 8


def test_gaussian_init_and_param_dtype(block_base):
    cfg = lj.LoraConfig(rank=4, targets=("query",), init="gaussian", param_dtype=jnp.bfloat16)
    flat = leaves_by_path(
        lj.init(lj.LoRA(BlockNet(), cfg), jax.random.key(1), X16, base_params=block_base)
    )
    a = flat["params/block_0/query/kernel_lora_a"]
    assert a.dtype == jnp.bfloat16 and float(jnp.std(a.astype(jnp.float32))) == pytest.approx(
        0.25, rel=0.3
    )
    assert not jnp.any(flat["params/block_0/query/kernel_lora_b"])


def test_trainable_extras_are_marked_and_copied(block_base):
    cfg = lj.LoraConfig(targets=("query",), trainable=("head/kernel",))
    params = lj.init(lj.LoRA(BlockNet(), cfg), jax.random.key(1), X16, base_params=block_base)
    assert "params/head/kernel" in lj.trainable_paths(params)
    assert params["params"]["head"]["kernel"] is not block_base["params"]["head"]["kernel"]
    chex.assert_trees_all_equal(
        params["params"]["head"]["kernel"], block_base["params"]["head"]["kernel"]
    )


def test_a_rank_above_the_layer_size_warns():
    with pytest.warns(
        UserWarning,
        match=r"'value/kernel': rank 6 exceeds min\(fan_in, fan_out\) = min\(8, 4\) = 4",
    ):
        query_value(rank=6)


# -------------------------------------------------------------------------- 4-bit base


def test_init_quantizes_targets_and_keeps_other_leaves(tiny_llama):
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC())
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(24), tokens, base_params=base)
    flat, base_flat = leaves_by_path(params), leaves_by_path(base)
    quantized = sorted(k for k, v in flat.items() if isinstance(v, lj.QuantizedTensor))
    assert quantized == [
        "params/layers_0/self_attn/q_proj/kernel",
        "params/layers_0/self_attn/v_proj/kernel",
    ]
    assert (
        flat["params/layers_0/mlp/up_proj/kernel"]
        is base_flat["params/layers_0/mlp/up_proj/kernel"]
    )
    everything = lj.init(
        lj.LoRA(model, lj.LoraConfig(targets=("q_proj",), quantize=QC(targets=".*_proj"))),
        jax.random.key(24),
        tokens,
        base_params=base,
    )
    assert sum(isinstance(v, lj.QuantizedTensor) for v in leaves_by_path(everything).values()) == 7
    assert lj.summary(everything).total_bytes < 0.6 * lj.summary(base).total_bytes


def test_init_without_base_params_quantizes_random_base(tiny_llama):
    model, tokens, _ = tiny_llama
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(27), tokens)
    assert isinstance(
        params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"], lj.QuantizedTensor
    )


def test_numpy_base_leaves_end_on_the_device(tiny_llama):
    model, tokens, base = tiny_llama
    host = jax.tree.map(np.asarray, base)
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=host)
    assert not any(isinstance(v, np.ndarray) for v in jax.tree.leaves(params))


# ------------------------------------------------------------------------------ errors


def test_wrong_shape_names_the_leaf(block_base):
    bad = jax.tree.map(lambda v: v, block_base)
    bad["params"]["block_1"]["value"]["kernel"] = jnp.zeros((16, 15))
    with pytest.raises(
        ValueError,
        match=r"Leaf 'params/block_1/value/kernel' has shape \(16, 15\) but the model expects \(16, 16\)",
    ):
        lj.init(
            lj.LoRA(BlockNet(), lj.LoraConfig(targets=("query",))),
            jax.random.key(1),
            X16,
            base_params=bad,
        )


def test_missing_and_unexpected_leaves_are_listed(block_base):
    bad = jax.tree.map(lambda v: v, block_base)
    del bad["params"]["head"]["bias"]
    bad["params"]["head"]["extra"] = jnp.zeros(3)
    with pytest.raises(
        ValueError,
        match=r"(?s)Leaf 'params/head/bias' is missing.*Leaf 'params/head/extra' is not a parameter",
    ):
        lj.init(
            lj.LoRA(BlockNet(), lj.LoraConfig(targets=("query",))),
            jax.random.key(1),
            X16,
            base_params=bad,
        )


def test_wrong_sample_shape_is_not_blamed_on_the_weights():
    base = QueryValue().init(jax.random.key(1), X6)
    lora_model = lj.LoRA(QueryValue(), lj.LoraConfig(rank=2, targets=("query",)))
    with pytest.raises(
        ValueError,
        match=r"only shapes differ: if the parameters are right, the sample inputs \(shapes \[\(2, 5\)\]\) are not",
    ):
        lj.init(lora_model, jax.random.key(2), jnp.ones((2, 5)), base_params=base)


def test_extra_collections_and_lora_trees_as_base_are_explained():
    base, _cfg, lora_model, params = query_value()
    with pytest.raises(
        ValueError,
        match=r"base_params hold collections \['batch_stats'\] that the model does not use",
    ):
        lj.init(
            lora_model,
            jax.random.key(2),
            X6,
            base_params={**base, "batch_stats": {"n": jnp.ones(2)}},
        )
    with pytest.raises(
        ValueError, match=r"base_params already hold LoRA adapters .*lora_jax.merge"
    ):
        lj.init(lora_model, jax.random.key(2), X6, base_params=params)


def test_targets_matching_nothing_lists_adaptable_paths(block_base):
    with pytest.raises(
        ValueError,
        match=r"matches no module. Adaptable module paths: \['block_0/query', .*'head'\]",
    ):
        lj.init(
            lj.LoRA(BlockNet(), lj.LoraConfig(targets=("q_proj",))),
            jax.random.key(1),
            X16,
            base_params=block_base,
        )


def test_pattern_key_matching_no_target(block_base):
    cfg = lj.LoraConfig(targets=("query",), alpha_pattern={"value": 2.0})
    with pytest.raises(
        ValueError, match=r"alpha_pattern key 'value' matches none of the targeted modules"
    ):
        lj.init(lj.LoRA(BlockNet(), cfg), jax.random.key(1), X16, base_params=block_base)


def test_trainable_matching_nothing(block_base):
    cfg = lj.LoraConfig(targets=("query",), trainable=("lm_head/kernel",))
    with pytest.raises(
        ValueError, match=r"trainable pattern 'lm_head/kernel' matches no parameter path"
    ):
        lj.init(lj.LoRA(BlockNet(), cfg), jax.random.key(1), X16, base_params=block_base)


class Counted(nn.Module):
    @nn.compact
    def __call__(self, x):
        count = self.variable("params", "step_count", lambda: jnp.int32(3))
        return nn.Dense(4, name="value")(x) + count.value.astype(x.dtype)


def test_trainable_extra_must_be_floating():
    x = jnp.ones((2, 6))
    base = Counted().init(jax.random.key(0), x)
    cfg = lj.LoraConfig(rank=2, targets=("value",), trainable=("step_count",))
    with pytest.raises(
        ValueError, match=r"LoraConfig.trainable selects 'step_count', a int32 parameter"
    ):
        lj.init(lj.LoRA(Counted(), cfg), jax.random.key(1), x, base_params=base)


def test_integer_kernels_cannot_take_adapters():
    class Counts(nn.Module):
        @nn.compact
        def __call__(self, x):
            zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)
            return nn.Embed(10, 4, param_dtype=jnp.int32, embedding_init=zeros, name="table")(x)

    ids = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(
        ValueError, match=r"selects 'table', whose 'embedding' is int32: LoRA adapts floating"
    ):
        lj.init(
            lj.LoRA(Counts(), lj.LoraConfig(rank=2, targets=("table",))), jax.random.key(0), ids
        )


# -------------------------------------------------------------- errors of a 4-bit base


def test_quant_targets_matching_nothing(tiny_llama):
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC(targets=("embed_tokens",)))
    with pytest.raises(ValueError, match=r"QuantConfig.targets.*matches no linear layer"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_default_quant_targets_without_linear_adapted_layers(tiny_llama):
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(targets=("embed_tokens",), quantize=QC())
    with pytest.raises(ValueError, match="matches no linear layer"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_stray_quantized_leaf_not_selected(tiny_llama):
    model, tokens, base = tiny_llama
    quantized = lj.quantize(base["params"], QC(), paths={"layers_0/mlp/up_proj/kernel": (0, 1)})
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    with pytest.raises(ValueError, match=r"does not select.*'params/layers_0/mlp/up_proj/kernel'"):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params={"params": quantized})


def test_kernel_quantized_with_wrong_axes():
    model, x = Layers(), jnp.ones((1, 2, 64))
    base = model.init(jax.random.key(0), x)
    wrong = lj.quantize(
        base["params"], QC(block_size=2), paths={"join/kernel": (0, 1)}
    )  # 2 in-axes
    cfg = lj.LoraConfig(targets=("dense",), quantize=QC(block_size=2, targets=("join",)))
    with pytest.raises(
        ValueError, match="'params/join/kernel' was quantized with 0 leading and 1 contraction"
    ):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), x, base_params={"params": wrong})


def test_trainable_extra_that_is_quantized_is_an_error(tiny_llama):
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(
        targets=("q_proj",),
        trainable=("lm_head/kernel",),
        quantize=QC(targets=("q_proj", "lm_head")),
    )
    with pytest.raises(
        ValueError, match="trainable selects 'lm_head/kernel', which QuantConfig quantizes"
    ):
        lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_all_linear_adapts_every_linear_layer_but_the_head():
    """PEFT's "all-linear": the seven linear layers of every block, not the embedding nor an
    untied output head; the default targets are q_proj and v_proj, which the model has."""
    from lora_jax.models import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(num_layers=2, tie_embeddings=False))
    x = jnp.zeros((1, 8), jnp.int32)
    linear = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj"]
    linear += ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]
    plan = lj.plan(lj.LoRA(model, lj.LoraConfig(targets="all-linear")), jax.random.key(0), x)
    adapted = sorted(param for param, _ in plan.adapters)
    assert adapted == sorted(f"params/layers_{i}/{m}/kernel" for i in (0, 1) for m in linear)
    excluded = lj.LoraConfig(targets="all-linear", exclude=("mlp/down_proj",))
    plan = lj.plan(lj.LoRA(model, excluded), jax.random.key(0), x)
    assert len(plan.adapters) == 12 and not any("down_proj" in p for p, _ in plan.adapters)
    default = lj.plan(lj.LoRA(model, lj.LoraConfig()), jax.random.key(0), x)
    assert sorted(p for p, _ in default.adapters) == sorted(
        f"params/layers_{i}/self_attn/{m}/kernel" for i in (0, 1) for m in ("q_proj", "v_proj")
    )


def test_all_linear_leaves_embeddings_and_convs_alone():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(16, 8, name="embed")(ids)
            h = nn.Conv(8, (3,), name="conv")(h)
            return nn.Dense(4, name="proj")(h)

    x = jnp.zeros((1, 5), jnp.int32)
    plan = lj.plan(lj.LoRA(Mixed(), lj.LoraConfig(targets="all-linear")), jax.random.key(0), x)
    assert [p for p, _ in plan.adapters] == ["params/proj/kernel"]


@pytest.mark.parametrize("bias, trained", [("all", 8), ("lora_only", 2)])
def test_bias_modes_train_biases_and_survive_save_and_merge(tmp_path, bias, trained):
    from lora_jax.models import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(qkv_bias=True, o_bias=True))
    x = jnp.zeros((1, 8), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), x)
    cfg = lj.LoraConfig(targets=("q_proj",), bias=bias)
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), x, base_params=base)
    biases = sorted(p for p in lj.trainable_paths(params) if p.endswith("/bias"))
    assert len(biases) == trained and all(("q_proj" in p) or bias == "all" for p in biases)
    params = lj.combine(*_shifted(lj.partition(params)))
    lj.save_adapter(tmp_path, params, cfg)
    loaded, loaded_cfg = lj.load_adapter(tmp_path, base)
    assert loaded_cfg.bias == bias
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    same(lj.LoRA(model, cfg).apply(loaded, x), lj.LoRA(model, cfg).apply(params, x))
    same(
        lj.merge(params)["params"]["layers_0"]["self_attn"]["q_proj"]["bias"],
        _at(params, "params/layers_0/self_attn/q_proj/bias"),
    )
    with pytest.raises(ValueError, match=r"LoraConfig\(bias='all'\) finds no parameter named"):
        lj.init(lj.LoRA(Llama(LlamaConfig.tiny()), lj.LoraConfig(bias="all")), jax.random.key(1), x)
    with pytest.raises(ValueError, match=r"LoraConfig.bias must be one of"):
        lj.LoraConfig(bias="some")


def _shifted(halves):
    trainable, frozen = halves
    return jax.tree.map(lambda v: v + 0.5, trainable), frozen


def _at(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("config", ["all_linear", "gaussian", "dora_and_embed", "4bit"])
def test_adapter_leaves_are_made_without_the_forward_pass_and_equal_one_compiled_program(
    tiny_llama, monkeypatch, config
):
    """`init` makes the adapter leaves from the traced model cut to what they need (the keys'
    derivation and the random draws; for DoRA the kernels' norms), run op by op: the same
    bits as compiling the whole apply as one program, which is what it falls back to."""
    model, tokens, base = tiny_llama
    configs = {
        "all_linear": lj.LoraConfig(rank=4, targets="all-linear"),
        "gaussian": lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"), init="gaussian"),
        "dora_and_embed": lj.LoraConfig(
            rank=4, variant="dora", targets=("q_proj", "v_proj", "embed_tokens")
        ),
        "4bit": lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"), quantize=lj.QuantConfig()),
    }
    lora_model = lj.LoRA(model, configs[config])
    kept = []
    real = _eager._dce_jaxpr

    def recording(jaxpr, used):
        kept.append(real(jaxpr, used)[0])
        return real(jaxpr, used)

    monkeypatch.setattr(_eager, "_dce_jaxpr", recording)
    cut = lj.init(lora_model, jax.random.key(3), tokens[:, :-1], base_params=base)
    assert len(kept) == 1 and "dot_general" not in str(kept[0])  # no product of the model ran
    monkeypatch.setattr(_eager, "_dce_jaxpr", None)
    whole = lj.init(lora_model, jax.random.key(3), tokens[:, :-1], base_params=base)
    # Bit for bit where measured; the test allows one ulp, which XLA's fusion of the whole
    # program may change in a value computed from the same random bits.
    chex.assert_trees_all_equal_structs(cut, whole)
    for a, b in zip(jax.tree.leaves(cut), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)
    assert len(jax.tree.leaves(cut["params"])) > len(jax.tree.leaves(base["params"]))
