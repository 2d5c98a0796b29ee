"""LoRA on the reference Llama decoder: identity at init, merge equivalence, training."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import assert_close, leaves_by_path, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

IDS = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("tie", [False, True])
@settings(max_examples=5)  # each example compiles a whole decoder
@given(rank=st.integers(1, 8), alpha=st.floats(1.0, 32.0), rslora=st.booleans(),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_llama_identity_and_merge(tie, rank, alpha, rslora, dtype):
    model = Llama(LlamaConfig.tiny(tie_embeddings=tie, dtype=dtype, param_dtype=dtype))
    base = model.init(jax.random.key(1), IDS)
    targets = ALL_LINEAR + (("embed_tokens",) if tie else ("lm_head", "embed_tokens"))
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=rank, alpha=alpha, use_rslora=rslora, targets=targets))
    params = lj.init(lora_model, jax.random.key(2), IDS, base_params=base)
    apply_lora, apply_base = jax.jit(lora_model.apply), jax.jit(model.apply)
    chex.assert_trees_all_equal(apply_lora(params, IDS), apply_base(base, IDS))
    params = randomize_adapters(params, jax.random.key(3), scale=0.05)
    merged = lj.merge(params)
    chex.assert_trees_all_equal_structs(merged, base)
    chex.assert_trees_all_equal_dtypes(merged, base)
    assert_close(apply_lora(params, IDS), apply_base(merged, IDS), dtype)


def test_llama_adapter_paths():
    model = Llama(LlamaConfig.tiny())
    base = model.init(jax.random.key(1), IDS)
    cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"), rank_pattern={"layers_1/.*": 2})
    flat = leaves_by_path(lj.init(lj.LoRA(model, cfg), jax.random.key(2), IDS, base_params=base))
    assert flat["params/layers_0/self_attn/q_proj/kernel_lora_a"].shape == (64, 4)
    assert flat["params/layers_0/self_attn/v_proj/kernel_lora_b"].shape == (4, 32)
    assert flat["params/layers_1/self_attn/q_proj/kernel_lora_a"].shape == (64, 2)
    assert not any("k_proj/kernel_lora" in k for k in flat)


def test_llama_lora_training_lowers_loss_and_keeps_base():
    model = Llama(LlamaConfig.tiny())
    base = model.init(jax.random.key(1), IDS)
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=4, targets=ALL_LINEAR, dropout=0.1))
    params = lj.init(lora_model, jax.random.key(2), IDS, base_params=base)
    tx = lj.optimizer(optax.adamw(1e-2), params)
    step = lj.make_train_step(lora_model, lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:]), tx)
    opt_state = step.init(params)
    losses = []
    for i in range(15):
        params, opt_state, loss = step(params, opt_state, IDS, rng=jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    flat, base_flat = leaves_by_path(params), leaves_by_path(base)
    for path, value in base_flat.items():
        assert flat[path] is value, path  # frozen leaves: the very same arrays
