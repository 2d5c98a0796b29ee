"""The reference Llama decoder on its own (no LoRA)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import leaves_by_path

from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

IDS = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)


@pytest.fixture(scope="module")
def tiny():
    model = Llama(LlamaConfig.tiny())
    return model, model.init(jax.random.key(1), IDS)


def test_shapes_paths_and_count(tiny):
    model, params = tiny
    logits = model.apply(params, IDS)
    chex.assert_shape(logits, (2, 12, 256))
    assert logits.dtype == jnp.float32
    paths = set(leaves_by_path(params))
    expected = {"params/embed_tokens/embedding", "params/norm/scale", "params/lm_head/kernel"}
    for i in range(2):
        expected |= {f"params/layers_{i}/{m}/kernel" for m in (
            "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
            "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
        expected |= {f"params/layers_{i}/{n}/scale" for n in ("input_layernorm", "post_attention_layernorm")}
    assert paths == expected
    assert sum(v.size for v in jax.tree.leaves(params)) == model.cfg.num_params()
    assert params["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)  # GQA


def test_tied_embeddings():
    model = Llama(LlamaConfig.tiny(tie_embeddings=True))
    params = model.init(jax.random.key(1), IDS)
    assert "lm_head" not in params["params"]
    chex.assert_tree_all_finite(model.apply(params, IDS))
    assert sum(v.size for v in jax.tree.leaves(params)) == model.cfg.num_params()


def test_causal(tiny):
    model, params = tiny
    changed = IDS.at[:, 8].set((IDS[:, 8] + 1) % 256)
    a, b = model.apply(params, IDS), model.apply(params, changed)
    chex.assert_trees_all_close(a[:, :8], b[:, :8], atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_gqa_equals_mha_with_repeated_kv_heads(tiny):
    model, params = tiny
    mha = Llama(LlamaConfig.tiny(num_kv_heads=4))
    p = jax.tree.map(lambda v: v, params)
    for i in range(2):
        attn = p["params"][f"layers_{i}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            k = attn[name]["kernel"].reshape(64, 2, 1, 16)
            attn[name]["kernel"] = jnp.repeat(k, 2, axis=2).reshape(64, 64)
    chex.assert_trees_all_close(mha.apply(p, IDS), model.apply(params, IDS), atol=1e-5)


def test_left_padding_with_positions(tiny):
    model, params = tiny
    ids = IDS[:1, :8]
    padded = jnp.concatenate([jnp.zeros((1, 4), ids.dtype), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 4)), jnp.ones((1, 8))], axis=1)
    positions = jnp.clip(jnp.arange(12) - 4, 0)[None]
    out = model.apply(params, padded, positions=positions, attention_mask=mask)
    chex.assert_trees_all_close(out[:, 4:], model.apply(params, ids), atol=1e-5)


def test_bf16_runs_with_f32_logits():
    model = Llama(LlamaConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    params = model.init(jax.random.key(1), IDS)
    logits = model.apply(params, IDS)
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


def test_loss_mask():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    garbage = logits.at[0, 2].set(100.0).at[1, 1:].set(-100.0)
    assert float(causal_lm_loss(logits, targets, mask)) == pytest.approx(
        float(causal_lm_loss(garbage, targets, mask)), rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=3), r"LlamaConfig.num_kv_heads must divide num_heads \(4\), got 3"),
    (dict(num_layers=0), r"LlamaConfig.num_layers must be a positive int, got 0"),
    (dict(hidden_size=66), r"LlamaConfig.hidden_size \(66\) must be divisible by num_heads"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.tiny(**kwargs)


def test_presets_count():
    assert LlamaConfig.llama_1b().num_params() == 1_235_814_400
    assert LlamaConfig.llama3_8b().num_params() == 8_030_261_248
