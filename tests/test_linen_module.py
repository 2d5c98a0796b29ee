"""Tests for `lora_jax.linen.module`: the `LoRA` wrapper at apply time.

A layer called twice gets one adapter; `invoke` runs other methods with the adapters; 4-bit
layers give the values and gradients of their dequantized kernels, the base output at init and
the kernel that merge writes; and the tree is checked against the config at apply: adapters of
another rank or that the config does not target, missing records and leaves, quantized kernels
under a dense config and the reverse, and bad arguments to `LoRA`.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import (
    F32,
    F32_REL_TOL,
    QC,
    X6,
    X16,
    BlockNet,
    Layers,
    QueryValue,
    assert_close,
    leaves_by_path,
    query_value,
    randomize_adapters,
)

import lora_jax as lj


def test_shared_layer_gets_one_adapter_and_merges(block_base):
    lora_model = lj.LoRA(BlockNet(), lj.LoraConfig(rank=2, targets=("query", "value", "head")))
    params = randomize_adapters(
        lj.init(lora_model, jax.random.key(1), X16, base_params=block_base), jax.random.key(2)
    )
    assert_close(
        lora_model.apply(params, X16), BlockNet().apply(lj.merge(params), X16), jnp.float32
    )


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
    params = randomize_adapters(
        lj.init(lora_model, jax.random.key(1), x, base_params=base), jax.random.key(2)
    )
    encode = lambda m, x: m.invoke("encode", x)
    adapted = lora_model.apply(params, x, method=encode)
    assert_close(adapted, Encoder().apply(lj.merge(params), x, method=Encoder.encode), jnp.float32)
    assert not jnp.allclose(adapted, Encoder().apply(base, x, method=Encoder.encode))


# ------------------------------------------------------------------------ 4-bit layers


@pytest.mark.parametrize("kernel", ["auto"])
def test_quantized_layers_forward_and_gradients(kernel):
    model, x = Layers(), jax.random.normal(jax.random.key(11), (2, 3, 64))
    base = model.init(jax.random.key(12), x)
    cfg = lj.LoraConfig(targets=".*", quantize=QC(block_size=32, kernel=kernel))
    lora = lj.LoRA(model, cfg)
    params = randomize_adapters(
        lj.init(lora, jax.random.key(13), x, base_params=base), jax.random.key(14), 0.05
    )
    kinds = {
        k: type(v).__name__ for k, v in leaves_by_path(params).items() if k.endswith("/kernel")
    }
    assert set(kinds.values()) == {"QuantizedTensor"}
    assert params["params"]["per_head"]["kernel"].lead_shape == (4,)
    dense = lj.dequantize(params)
    plain = lj.LoRA(model, lj.LoraConfig(targets=".*"))
    assert_close(jax.jit(lora.apply)(params, x), jax.jit(plain.apply)(dense, x), F32)

    trainable, frozen = lj.partition(params)
    loss = lambda lora, frozen: lambda t: jnp.sum(lora.apply(lj.combine(t, frozen), x) ** 2)
    grads = jax.jit(jax.grad(loss(lora, frozen)))(trainable)
    expected = jax.jit(jax.grad(loss(plain, lj.dequantize(frozen))))(trainable)
    assert_close(grads, expected, F32)


def test_identity_at_init_with_quantized_base(tiny_llama):
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(targets=("q_proj", "v_proj"), quantize=QC())
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(26), tokens, base_params=base)
    expected = model.apply(lj.merge(params), tokens)  # the dequantized base, no delta
    chex.assert_trees_all_close(lora.apply(params, tokens), expected, atol=F32_REL_TOL * 10)


def test_forward_uses_the_kernel_that_merge_writes():
    """compute_dtype rounds the kernel in the forward pass too: with the adapters at zero the
    merged model is exact; with trained ones only the merged sum's rounding differs."""
    model, x = nn.Dense(64, name="d"), jax.random.normal(jax.random.key(40), (4, 256))
    base = model.init(jax.random.key(41), x)
    lora = lj.LoRA(model, lj.LoraConfig(targets=".*", quantize=lj.QuantConfig()))  # bf16 kernels
    params = lj.init(lora, jax.random.key(42), x, base_params=base)
    chex.assert_trees_all_equal(lora.apply(params, x), model.apply(lj.merge(params), x))
    params = randomize_adapters(params, jax.random.key(43), 0.05)
    assert_close(lora.apply(params, x), model.apply(lj.merge(params), x), jnp.bfloat16)


# --------------------------------------------------------- the tree against the config


def test_params_of_another_rank_are_rejected(block_base):
    params = lj.init(
        lj.LoRA(BlockNet(), lj.LoraConfig(rank=4, targets=("query",))),
        jax.random.key(1),
        X16,
        base_params=block_base,
    )
    other = lj.LoRA(BlockNet(), lj.LoraConfig(rank=2, targets=("query",)))
    with pytest.raises(
        ValueError,
        match=r"The adapter of 'block_0/query/kernel' does not match the LoraConfig: rank 4 in the tree but 2 from the config",
    ):
        other.apply(params, X16)


def test_adapters_the_config_does_not_target_are_an_error():
    _, _, _, params = query_value()
    narrower = lj.LoRA(QueryValue(), lj.LoraConfig(rank=2, targets=("query",)))
    with pytest.raises(
        ValueError,
        match=r"holds an adapter for 'value/kernel', but LoraConfig.targets=\('query',\) .* silently dropped",
    ):
        narrower.apply(params, X6)


def test_missing_lora_collection_is_explained(block_base):
    lora_model = lj.LoRA(BlockNet(), lj.LoraConfig(targets=("query",)))
    params = lj.init(lora_model, jax.random.key(1), X16, base_params=block_base)
    with pytest.raises(
        ValueError, match=r"holds no adapter record for it \('lora/block_0/query/kernel_lora'\)"
    ):
        lora_model.apply({"params": params["params"]}, X16)
    with pytest.raises(ValueError, match=r"holds no adapter record .* pass the whole tree"):
        lora_model.apply(block_base, X16)
    no_leaf = {"params": block_base["params"], "lora": params["lora"]}
    with pytest.raises(ValueError, match=r"'params/block_0/query/kernel_lora_a' is missing"):
        lora_model.apply(no_leaf, X16)


@pytest.fixture(scope="module")
def qparams(tiny_llama):
    """The tiny Llama with a 4-bit q_proj and its adapter."""
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(targets=("q_proj",), quantize=QC())
    return lj.init(lj.LoRA(model, cfg), jax.random.key(0), tokens, base_params=base)


def test_quantized_tree_with_config_without_quantize(tiny_llama, qparams):
    model, tokens, _ = tiny_llama
    quantized_base = lj.merge(qparams, requantize=True)[0]
    plain = lj.LoRA(model, lj.LoraConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match=r"q_proj/kernel.*LoraConfig.quantize is None"):
        lj.init(plain, jax.random.key(0), tokens, base_params=quantized_base)
    with pytest.raises(
        ValueError, match=r"'layers_0/self_attn/q_proj/kernel' is quantized.*quantize is None"
    ):
        plain.apply(qparams, tokens)


def test_quantized_tree_with_other_format(tiny_llama, qparams):
    model, tokens, _ = tiny_llama
    other = lj.LoRA(model, lj.LoraConfig(targets=("q_proj",), quantize=QC(block_size=32)))
    with pytest.raises(
        ValueError,
        match="q_proj/kernel' was quantized with block_size=64 \\(QuantConfig says 32\\)",
    ):
        other.apply(qparams, tokens)


def test_dense_tree_with_quantizing_config(tiny_llama):
    model, tokens, base = tiny_llama
    plain = lj.init(
        lj.LoRA(model, lj.LoraConfig(targets=("q_proj",))),
        jax.random.key(0),
        tokens,
        base_params=base,
    )
    quantizing = lj.LoRA(model, lj.LoraConfig(targets=("q_proj",), quantize=QC()))
    with pytest.raises(ValueError, match="'layers_0/self_attn/q_proj/kernel' is a dense array"):
        quantizing.apply(plain, tokens)


# ----------------------------------------------------------------------- bad arguments


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"init needs a lora_jax.LoRA module"):
        lj.init(BlockNet(), jax.random.key(0), X16)
    with pytest.raises(TypeError, match=r"LoRA.config must be a lora_jax.LoraConfig"):
        lj.LoRA(BlockNet(), {"rank": 4}).init(jax.random.key(0), X16)


def test_lora_with_a_dict_config_is_a_type_error():
    with pytest.raises(
        TypeError, match=r"LoRA.config must be a lora_jax.LoraConfig, got dict. Build it with"
    ):
        lj.LoRA(QueryValue(), {"rank": 2, "targets": ["query"]})
    with pytest.raises(TypeError, match=r"LoRA.model must be a flax.linen Module, got str"):
        lj.LoRA("model", lj.LoraConfig(targets=("q",)))


class _Siblings(nn.Module):
    """q and k read the same input; v reads another one; gate contracts another axis of the
    same input (wrong sibling groups, which must cost time only)."""

    @nn.compact
    def __call__(self, x):
        q, k = nn.Dense(6, name="q_proj")(x), nn.Dense(5, name="k_proj")(x)
        v = nn.Dense(4, name="v_proj")(x * 2.0)
        up = nn.Dense(3, name="up_proj")(x)
        gate = nn.DenseGeneral(3, axis=-2, name="gate_proj")(x)  # contracts the other axis
        return jnp.concatenate([q, k, v, up], axis=-1), gate


@pytest.mark.parametrize("scan", [False, True])
def test_sibling_adapters_share_their_first_product_exactly(scan):
    """LoraConfig.siblings: q/k/v (and gate/up) run x @ [A_q A_k A_v] once; outputs and
    gradients equal the separate products; a member fed another input computes its own."""
    import dataclasses

    from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

    model = Llama(LlamaConfig.tiny(num_layers=2, scan_layers=scan))
    x = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)
    base = jax.jit(model.init)(jax.random.key(1), x)
    cfg = lj.LoraConfig(rank=4, targets="all-linear")
    fused, alone = lj.LoRA(model, cfg), lj.LoRA(model, dataclasses.replace(cfg, siblings=()))
    params = randomize_adapters(
        lj.init(fused, jax.random.key(2), x, base_params=base), jax.random.key(3)
    )
    trainable, frozen = lj.partition(params)
    loss = lambda t, m: causal_lm_loss(m.apply(lj.combine(t, frozen), x[:, :-1]), x[:, 1:])
    grads = [jax.jit(jax.grad(loss), static_argnums=1)(trainable, m) for m in (fused, alone)]
    chex.assert_trees_all_close(*grads, atol=1e-5, rtol=1e-5)
    hlo = [
        jax.jit(m.apply).lower(params, x).compile().as_text().count(" dot(") for m in (fused, alone)
    ]
    assert hlo[0] < hlo[1]  # fewer products
    net, y = _Siblings(), jax.random.normal(jax.random.key(5), (2, 3, 3))
    net_base = net.init(jax.random.key(0), y)
    targets = ("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj")
    lm = lj.LoRA(net, lj.LoraConfig(rank=2, targets=targets))
    p = randomize_adapters(
        lj.init(lm, jax.random.key(1), y, base_params=net_base), jax.random.key(2)
    )
    assert_close(lm.apply(p, y), net.apply(lj.merge(p), y), jnp.float32)
