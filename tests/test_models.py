"""The reference Llama decoder on its own (no LoRA)."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, leaves_by_path

from lora_jax.models import (
    Llama,
    LlamaConfig,
    causal_lm_loss,
    stack_layers,
    unstack_layers,
)

IDS = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
PROJ = (
    "self_attn/q_proj",
    "self_attn/k_proj",
    "self_attn/v_proj",
    "self_attn/o_proj",
    "mlp/gate_proj",
    "mlp/up_proj",
    "mlp/down_proj",
)


def lively(params, seed=0, std=0.15):
    """Redraws every leaf (norm scales around 1), so attention is far from uniform."""
    rng = np.random.default_rng(seed)
    draw = lambda path, v: jnp.asarray(
        (path[-1].key == "scale") + std * rng.standard_normal(v.shape), v.dtype
    )
    return jax.tree_util.tree_map_with_path(draw, params)


@pytest.fixture(scope="module")
def tiny():
    model = Llama(LlamaConfig.tiny())
    params = lively(jax.jit(model.init)(jax.random.key(1), IDS))
    return model, params, jax.jit(model.apply)


def reference_logits(cfg, params, ids):
    """Hugging Face's LlamaForCausalLM forward, transcribed to float64 NumPy."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["params"])
    b, s = ids.shape
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rms = lambda x, w: w * x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.rms_norm_eps)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([np.arange(s)[:, None] * inv_freq] * 2, -1)  # (seq, head_dim)
    rotate_half = lambda x: np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    rope = lambda x: x * np.cos(emb) + rotate_half(x) * np.sin(emb)
    split = lambda x, n: x.reshape(b, s, n, d).transpose(0, 2, 1, 3)  # (batch, heads, seq, d)
    x = p["embed_tokens"]["embedding"][np.asarray(ids)]
    for i in range(cfg.num_layers):
        layer = p[f"layers_{i}"]
        attn, mlp = layer["self_attn"], layer["mlp"]
        y = rms(x, layer["input_layernorm"]["scale"])
        q = rope(split(y @ attn["q_proj"]["kernel"], h))
        k = np.repeat(rope(split(y @ attn["k_proj"]["kernel"], kv)), h // kv, axis=1)  # repeat_kv
        v = np.repeat(split(y @ attn["v_proj"]["kernel"], kv), h // kv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.triu(np.full((s, s), -np.inf), 1)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + (weights @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d) @ attn["o_proj"]["kernel"]
        y = rms(x, layer["post_attention_layernorm"]["scale"])
        gate = y @ mlp["gate_proj"]["kernel"]
        x = (
            x
            + (gate / (1 + np.exp(-gate)) * (y @ mlp["up_proj"]["kernel"]))
            @ mlp["down_proj"]["kernel"]
        )
    x = rms(x, p["norm"]["scale"])
    return x @ (p["embed_tokens"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"])


def test_logits_shape_and_dtype(tiny):
    _model, params, apply = tiny
    logits = apply(params, IDS)
    chex.assert_shape(logits, (2, 12, 256))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


def test_param_paths_follow_hugging_face(tiny):
    model, params, _ = tiny
    shapes = {k: v.shape for k, v in leaves_by_path(params["params"]).items()}
    expected = {
        "embed_tokens/embedding": (256, 64),
        "norm/scale": (64,),
        "lm_head/kernel": (64, 256),
    }
    dims = dict(
        q_proj=(64, 64),
        k_proj=(64, 32),
        v_proj=(64, 32),
        o_proj=(64, 64),
        gate_proj=(64, 128),
        up_proj=(64, 128),
        down_proj=(128, 64),
    )
    for i in range(2):
        expected |= {f"layers_{i}/{m}/kernel": dims[m.split("/")[1]] for m in PROJ}
        expected |= {
            f"layers_{i}/{n}/scale": (64,) for n in ("input_layernorm", "post_attention_layernorm")
        }
    assert shapes == expected
    fresh = leaves_by_path(jax.jit(model.init)(jax.random.key(1), IDS)["params"])
    chex.assert_trees_all_equal(fresh["layers_1/post_attention_layernorm/scale"], jnp.ones(64))
    for path in ("embed_tokens/embedding", "layers_0/mlp/up_proj/kernel", "lm_head/kernel"):
        assert 0.015 < float(jnp.std(fresh[path])) < 0.025, path


def test_matches_numpy_transcription_of_hugging_face(tiny):
    model, params, apply = tiny
    np.testing.assert_allclose(
        apply(params, IDS), reference_logits(model.cfg, params, IDS), rtol=1e-4, atol=1e-4
    )


def test_tied_embeddings():
    cfg = LlamaConfig.tiny(tie_embeddings=True, num_kv_heads=1)
    model = Llama(cfg)
    params = lively(jax.jit(model.init)(jax.random.key(1), IDS))
    assert "lm_head" not in params["params"]
    assert sum(v.size for v in jax.tree.leaves(params)) == cfg.num_params()
    logits = jax.jit(model.apply)(params, IDS)
    np.testing.assert_allclose(logits, reference_logits(cfg, params, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", {}),
        ("tiny", dict(tie_embeddings=True, head_dim=8)),
        ("small", {}),
        ("llama_1b", {}),
        ("llama3_8b", {}),
    ],
)
def test_num_params_matches_init(name, overrides):
    cfg = getattr(LlamaConfig, name)(**overrides)
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(v.size for v in jax.tree.leaves(shapes)) == cfg.num_params()
    assert {v.dtype for v in jax.tree.leaves(shapes)} == {jnp.dtype(cfg.param_dtype)}


def test_preset_counts_match_released_models():
    assert LlamaConfig.llama_1b().num_params() == 1_235_814_400  # Llama-3.2-1B
    assert LlamaConfig.llama3_8b().num_params() == 8_030_261_248  # Meta-Llama-3-8B
    assert 2_000_000 < LlamaConfig.small().num_params() < 20_000_000


def test_causal(tiny):
    _, params, apply = tiny
    changed = IDS.at[:, 8].set((IDS[:, 8] + 1) % 256)
    a, b = apply(params, IDS), apply(params, changed)
    chex.assert_trees_all_equal(a[:, :8], b[:, :8])
    assert not np.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(num_kv_heads):
    gqa = Llama(LlamaConfig.tiny(num_kv_heads=num_kv_heads))
    params = lively(gqa.init(jax.random.key(1), IDS))
    repeated = jax.tree.map(lambda v: v, params)  # a fresh copy of the nested dicts
    for i in range(2):
        attn = repeated["params"][f"layers_{i}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            kernel = attn[name]["kernel"].reshape(64, num_kv_heads, 16)
            attn[name]["kernel"] = jnp.repeat(kernel, 4 // num_kv_heads, axis=1).reshape(64, 64)
    mha = Llama(LlamaConfig.tiny(num_kv_heads=4))
    np.testing.assert_allclose(
        jax.jit(mha.apply)(repeated, IDS), jax.jit(gqa.apply)(params, IDS), atol=1e-5
    )


def test_rope_sees_only_relative_positions(tiny):
    _, params, apply = tiny
    shifted = apply(params, IDS, positions=jnp.arange(12) + 37)  # (seq,) broadcasts over batch
    np.testing.assert_allclose(shifted, apply(params, IDS), atol=2e-4)


def test_left_padding_with_positions_and_mask(tiny):
    _, params, apply = tiny
    padded = IDS.at[0, :4].set(0).at[0, 4:].set(IDS[0, :8])
    mask = jnp.ones((2, 12), jnp.int32).at[0, :4].set(0)
    positions = jnp.stack([jnp.clip(jnp.arange(12) - 4, 0), jnp.arange(12)])
    out = apply(params, padded, positions=positions, attention_mask=mask)
    np.testing.assert_allclose(out[0, 4:], apply(params, IDS[:1, :8])[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[1], apply(params, IDS)[1], atol=1e-5, rtol=1e-5)
    chex.assert_tree_all_finite(out)


def test_bf16_runs_with_f32_logits(tiny):
    _, params, apply = tiny
    cfg = LlamaConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    half = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    logits = jax.jit(Llama(cfg).apply)(half, IDS)
    assert logits.dtype == jnp.float32
    assert_close(
        logits, apply(jax.tree.map(lambda v: v.astype(jnp.float32), half), IDS), jnp.bfloat16
    )


def test_presets_take_overrides_and_are_frozen():
    cfg = LlamaConfig.tiny(vocab_size=300, hidden_size=128)
    assert (cfg.vocab_size, cfg.head_dim, cfg.num_layers) == (300, 32, 2)
    big = LlamaConfig.llama_1b()
    assert (big.head_dim, big.tie_embeddings, big.dtype) == (64, True, jnp.bfloat16)
    assert LlamaConfig.llama3_8b().head_dim == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    with pytest.raises(TypeError):
        LlamaConfig(256, 64, 128, 2, 4, 2)  # keyword-only


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_kv_heads=3), r"LlamaConfig.num_kv_heads must divide num_heads \(4\), got 3\."),
        (dict(num_layers=0), r"LlamaConfig.num_layers must be a positive int, got 0\."),
        (dict(vocab_size=2.5), r"LlamaConfig.vocab_size must be a positive int, got 2.5\."),
        (dict(max_seq_len=True), r"LlamaConfig.max_seq_len must be a positive int, got True\."),
        (
            dict(hidden_size=66),
            r"LlamaConfig.hidden_size \(66\) must be divisible by num_heads \(4\)",
        ),
        (dict(head_dim=7), r"LlamaConfig.head_dim must be even, got 7\."),
        (dict(rope_theta=0.0), r"LlamaConfig.rope_theta must be a positive number, got 0.0\."),
        (dict(rms_norm_eps=-1e-6), r"LlamaConfig.rms_norm_eps must be a positive number"),
        (dict(dtype=jnp.int8), r"LlamaConfig.dtype must be a floating dtype"),
        (dict(param_dtype="nope"), r"LlamaConfig.param_dtype must be a floating dtype, got 'nope'"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.tiny(**overrides)


def test_call_errors(tiny):
    model, params, _ = tiny
    with pytest.raises(ValueError, match=r"seq <= max_seq_len \(128\), got shape \(1, 129\)"):
        model.apply(params, jnp.zeros((1, 129), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask must be \(2, 12\), got shape \(2, 11\)"):
        model.apply(params, IDS, attention_mask=jnp.ones((2, 11)))
    with pytest.raises(ValueError, match=r"positions must be \(12,\) or \(2, 12\)"):
        model.apply(params, IDS, positions=jnp.arange(11))


def test_causal_lm_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    assert float(causal_lm_loss(logits, targets)) == pytest.approx(nll.mean(), rel=1e-6)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    garbage = logits.at[0, 2].set(100.0).at[1, 1:].set(-100.0)
    loss = causal_lm_loss(garbage.astype(jnp.bfloat16), targets, mask)
    assert loss.shape == () and loss.dtype == jnp.float32
    expected = (nll[0, 0] + nll[0, 1] + nll[1, 0]) / 3
    assert float(causal_lm_loss(garbage, targets, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(causal_lm_loss(logits, targets, jnp.zeros((2, 3)))) == 0.0
    with pytest.raises(ValueError, match="causal_lm_loss"):
        causal_lm_loss(logits[:, :2], targets)


# ------------------------------------------------------------------ scaling-out options


def _value_and_grad(model, params):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, IDS) ** 2)))(params)


@pytest.fixture(scope="module")
def tiny_grads(tiny):
    model, params, _ = tiny
    return _value_and_grad(model, params)


@pytest.mark.parametrize(
    "options",
    [
        dict(scan_layers=True, remat=True),
        dict(remat=True),
        dict(scan_layers=True, remat="dots_with_no_batch_dims_saveable"),
    ],
    ids=["scan+remat", "remat", "scan+selective-remat"],
)
def test_scan_and_remat_compute_the_same_logits_and_grads(tiny, tiny_grads, options):
    _, params, _apply = tiny
    other = Llama(LlamaConfig.tiny(**options))
    scan = options.get("scan_layers", False)
    converted = stack_layers(params) if scan else params
    chex.assert_trees_all_equal_shapes(
        converted, jax.eval_shape(other.init, jax.random.key(1), IDS)
    )
    (expected, grads), (value, other_grads) = tiny_grads, _value_and_grad(other, converted)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    back = unstack_layers(other_grads) if scan else other_grads
    chex.assert_trees_all_close(back, grads, atol=1e-6, rtol=1e-4)


def test_scan_stacks_params_on_a_leading_layer_axis(tiny):
    _, params, _ = tiny
    cfg = LlamaConfig.tiny(scan_layers=True)
    stacked = jax.jit(Llama(cfg).init)(jax.random.key(1), IDS)
    shapes = {k: v.shape for k, v in leaves_by_path(stacked["params"]).items()}
    assert shapes["layers/self_attn/q_proj/kernel"] == (2, 64, 64)
    assert shapes["layers/mlp/down_proj/kernel"] == (2, 128, 64)
    assert shapes["layers/input_layernorm/scale"] == (2, 64)
    assert not any(k.startswith("layers_") for k in shapes)
    assert sum(v.size for v in jax.tree.leaves(stacked)) == cfg.num_params()
    kernel = stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # the params rng is split per layer
    # The layouts convert both ways; the round trip is exact.
    chex.assert_trees_all_equal(unstack_layers(stack_layers(params)), params)
    chex.assert_trees_all_equal(stack_layers(unstack_layers(stacked)), stacked)
    chex.assert_trees_all_equal(stack_layers(params["params"]), stack_layers(params)["params"])
    np.testing.assert_array_equal(
        stack_layers(params)["params"]["layers"]["mlp"]["up_proj"]["kernel"][1],
        params["params"]["layers_1"]["mlp"]["up_proj"]["kernel"],
    )


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_logical_axes_annotate_every_param(scan):
    boxed = jax.eval_shape(
        Llama(LlamaConfig.tiny(logical_axes=True, scan_layers=scan)).init, jax.random.key(1), IDS
    )
    flat = leaves_by_path(boxed["params"])
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in flat.values())
    layer, stack = ("layers", ("layers",)) if scan else ("layers_0", ())
    names = {k: v.names for k, v in flat.items()}
    assert names["embed_tokens/embedding"] == ("vocab", "embed")
    assert names["lm_head/kernel"] == ("embed", "vocab")
    assert names["norm/scale"] == ("norm",)
    assert names[f"{layer}/self_attn/q_proj/kernel"] == (*stack, "embed", "heads")
    assert names[f"{layer}/self_attn/k_proj/kernel"] == (*stack, "embed", "kv_heads")
    assert names[f"{layer}/self_attn/o_proj/kernel"] == (*stack, "heads", "embed")
    assert names[f"{layer}/mlp/down_proj/kernel"] == (*stack, "mlp", "embed")
    assert names[f"{layer}/input_layernorm/scale"] == (*stack, "norm")
    plain = jax.eval_shape(Llama(LlamaConfig.tiny(scan_layers=scan)).init, jax.random.key(1), IDS)
    chex.assert_trees_all_equal_shapes_and_dtypes(nn.meta.unbox(boxed), plain)
    if not scan:  # stack_layers keeps the boxes and names the new axis; unstack removes it.
        values = jax.jit(Llama(LlamaConfig.tiny(logical_axes=True)).init)(jax.random.key(1), IDS)
        kernel = stack_layers(values)["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert kernel.names == ("layers", "embed", "heads") and kernel.value.shape == (2, 64, 64)
        back = unstack_layers(stack_layers(values))["params"]["layers_1"]["self_attn"]["q_proj"]
        assert back["kernel"].names == ("embed", "heads")


def test_stack_layers_errors(tiny):
    _, params, _ = tiny
    gap = {"params": {k: v for k, v in params["params"].items() if k != "layers_0"}}
    with pytest.raises(ValueError, match=r"expected layers_0 \.\. layers_<n-1>"):
        stack_layers(gap)
    odd = jax.tree.map(lambda v: v, params)
    del odd["params"]["layers_1"]["mlp"]
    with pytest.raises(ValueError, match="params/layers_1"):
        stack_layers(odd)
    shared = {**params, "stats": {"layers_0": {"n": jnp.ones(2)}, "layers_1": {"n": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match=r"'stats/layers_<i>/n' differs between layers"):
        stack_layers(shared)


@pytest.mark.parametrize("name", ["logical_axes", "scan_layers", "remat"])
def test_layout_options_must_be_bools(name):
    with pytest.raises(ValueError, match=rf"LlamaConfig.{name} must be a bool.*, got 1\."):
        LlamaConfig.tiny(**{name: 1})


def test_remat_takes_a_checkpoint_policy_by_name():
    with pytest.raises(
        ValueError,
        match=r"LlamaConfig.remat must be a bool or the name of a "
        r"jax.checkpoint_policies policy \(nothing_saveable, .*got 'dots'\.",
    ):
        LlamaConfig.tiny(remat="dots")

    def flops(remat):  # recomputation shows in the compiled gradient's FLOPs
        model = Llama(LlamaConfig.tiny(remat=remat))
        params = jax.eval_shape(model.init, jax.random.key(0), IDS)
        grad = jax.jit(jax.grad(lambda p: causal_lm_loss(model.apply(p, IDS), IDS)))
        return grad.lower(params).compile().cost_analysis()["flops"]

    # Saving the linear layers' outputs recomputes less than full remat, more than none.
    assert flops(False) < flops("dots_with_no_batch_dims_saveable") < flops(True)
