"""The reference Llama's key/value cache and `generate`: cached decoding against full forward
passes, left padding, LoRA (wrapped and merged), stop tokens, top-p sampling, compile counts."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_adapters

import lora_jax as lj
from lora_jax.models import (
    Generation,
    Llama,
    LlamaConfig,
    RopeScaling,
    generate,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.generate import _pick

PROMPTS = ([5, 17, 3], [9, 2, 44, 1, 7, 30, 12, 8, 100], [61], [3, 3, 3, 3, 3])
NEW = 10
FEATURES = dict(
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    qk_norm=True,
    sliding_window=5,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
)
CONFIGS = {
    "plain": LlamaConfig.tiny(),
    "features": LlamaConfig.tiny(**FEATURES, tie_embeddings=True),
}


def random_params(cfg, seed=0):
    """Lively random parameters without compiling init (norm scales around 1, std 0.15)."""
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    draw = lambda path, v: jnp.asarray(
        (path[-1].key == "scale") + 0.15 * rng.standard_normal(v.shape), v.dtype
    )
    return jax.tree_util.tree_map_with_path(draw, shapes)


def full_forward_greedy(model, variables, prompts, new):
    """Greedy decoding by full forward passes: each prompt right-padded in a fixed buffer
    (causal, so the padding after a row's last token changes nothing before it)."""
    length = max(map(len, prompts)) + new
    buf = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    apply = jax.jit(model.apply)
    ends = np.array([len(p) for p in prompts])
    for _ in range(new):
        logits = np.asarray(apply(variables, buf))
        rows = np.arange(len(prompts))
        buf[rows, ends] = logits[rows, ends - 1].argmax(-1)
        ends += 1
    return [tuple(int(t) for t in buf[i, len(p) : len(p) + new]) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    cfg = CONFIGS[request.param]
    model = Llama(cfg)
    params = random_params(cfg)
    return model, params, full_forward_greedy(model, params, PROMPTS, NEW)


def test_cached_greedy_equals_full_forward_greedy(setup):
    """A left-padded batch of prompts of different lengths, and each prompt alone."""
    model, params, expected = setup
    out = generate(model, params, PROMPTS, max_new_tokens=NEW)
    assert isinstance(out, Generation)
    assert list(out.tokens) == expected
    assert out.stop_token == (None,) * len(PROMPTS)
    alone = generate(model, params, [PROMPTS[1]], max_new_tokens=NEW)
    assert alone.tokens == (expected[1],)


def test_scan_layers_generate_like_unrolled_layers():
    cfg = CONFIGS["features"]
    params = random_params(cfg)
    expected = generate(Llama(cfg), params, PROMPTS[:2], max_new_tokens=6)
    scanned = Llama(dataclasses.replace(cfg, scan_layers=True))
    assert generate(scanned, stack_layers(params), PROMPTS[:2], max_new_tokens=6) == expected


def test_cache_calls_equal_the_full_forward():
    """Prefill (left-padded, with mask and positions), then one-token and two-token appends:
    every logit equals the full forward's at the same token."""
    cfg = CONFIGS["features"]
    model, params = Llama(cfg), random_params(cfg)
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 14), 0, cfg.vocab_size))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = jax.jit(model.apply)(params, ids, positions, mask)
    prefill = jax.jit(
        lambda p, x, pos, m, **kw: model.apply(p, x, pos, m, mutable=["cache"], **kw),
        static_argnames=("cache_size", "last_logits_only"),
    )
    decode = jax.jit(lambda v, x: model.apply(v, x, decode=True, mutable=["cache"]))
    logits, state = prefill(params, ids[:, :8], positions[:, :8], mask[:, :8], cache_size=16)
    real = mask[:, :8, None].astype(bool)  # padding's own logits are meaningless
    chex.assert_trees_all_close(logits * real, full[:, :8] * real, atol=1e-5)
    chex.assert_shape(state["cache"]["layers_1"]["self_attn"]["key"], (2, 16, 2, 16))
    np.testing.assert_array_equal(state["cache"]["position"], positions[:, 7] + 1)
    for start, stop in ((8, 9), (9, 11), (11, 12), (12, 14)):  # positions come from the cache
        logits, state = decode({**params, **state}, ids[:, start:stop])
        chex.assert_trees_all_close(logits, full[:, start:stop], atol=1e-5)
    assert int(state["cache"]["index"]) == 14
    last, _ = prefill(params, ids, positions, mask, cache_size=14, last_logits_only=True)
    chex.assert_trees_all_close(last, full[:, -1:], atol=1e-5)


def test_stack_layers_converts_a_cache_mid_decode():
    """A cache made unrolled continues under scan_layers after stack_layers, and back."""
    cfg = CONFIGS["features"]
    params, ids = random_params(cfg), jnp.asarray(PROMPTS[1])[None, :]
    unrolled, scanned = Llama(cfg), Llama(dataclasses.replace(cfg, scan_layers=True))
    full = jax.jit(unrolled.apply)(params, ids)
    prefill = jax.jit(lambda v, x: unrolled.apply(v, x, cache_size=9, mutable=["cache"]))
    decode = lambda model: jax.jit(lambda v, x: model.apply(v, x, decode=True, mutable=["cache"]))
    _, state = prefill(params, ids[:, :6])
    stacked = stack_layers({**params, **state})
    chex.assert_shape(stacked["cache"]["layers"]["self_attn"]["value"], (2, 1, 9, 2, 16))
    logits, state = decode(scanned)(stacked, ids[:, 6:8])
    chex.assert_trees_all_close(logits, full[:, 6:8], atol=1e-5)
    back = unstack_layers({**stacked, **state})
    logits, _ = decode(unrolled)(back, ids[:, 8:])
    chex.assert_trees_all_close(logits, full[:, 8:], atol=1e-5)


@pytest.fixture(scope="module")
def lora_setup():
    cfg = CONFIGS["plain"]
    model, base = Llama(cfg), random_params(cfg)
    lora_model = lj.LoRA(
        model,
        lj.LoraConfig(
            rank=4,
            alpha=8.0,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
    )
    params = lj.init(lora_model, jax.random.key(1), jnp.zeros((1, 8), jnp.int32), base_params=base)
    params = randomize_adapters(params, jax.random.key(2), scale=0.3)
    return model, base, lora_model, params


def test_lora_wrapper_and_merged_params_generate_alike(lora_setup):
    model, base, lora_model, params = lora_setup
    expected = full_forward_greedy(lora_model, params, PROMPTS, NEW)
    assert expected != full_forward_greedy(model, base, PROMPTS, NEW)  # the adapters act
    out = generate(lora_model, params, PROMPTS, max_new_tokens=NEW)
    assert list(out.tokens) == expected
    merged = generate(model, lj.merge(params), PROMPTS, max_new_tokens=NEW)
    assert merged.tokens == out.tokens


def test_stop_tokens_end_each_sequence_and_are_excluded(setup):
    model, params, expected = setup
    stop = expected[0][3]  # the fourth greedy token of prompt 0
    other = next(t for t in range(256) if all(t not in e for e in expected))
    out = generate(model, params, PROMPTS, max_new_tokens=NEW, stop_tokens=(other, stop))
    for tokens, stop_token, full in zip(out.tokens, out.stop_token, expected, strict=True):
        if stop in full:
            assert tokens == full[: full.index(stop)] and stop_token == stop
        else:
            assert tokens == full and stop_token is None
    # Every sequence stopping at its first token: nothing new, the loop ends at once.
    firsts = tuple({e[0] for e in expected})
    out = generate(model, params, PROMPTS, max_new_tokens=NEW, stop_tokens=firsts)
    assert out.tokens == ((),) * len(PROMPTS)
    assert out.stop_token == tuple(e[0] for e in expected)


def test_sampling_is_reproducible_and_stays_in_the_nucleus(setup):
    model, params, _ = setup
    kwargs = dict(max_new_tokens=NEW, temperature=0.8, top_p=0.6)
    out = generate(model, params, PROMPTS, rng=jax.random.key(7), **kwargs)
    assert generate(model, params, PROMPTS, rng=jax.random.key(7), **kwargs) == out
    assert generate(model, params, PROMPTS, rng=jax.random.key(8), **kwargs) != out
    # Replay the sequences in one forward pass (right-padded): each sampled token lies in the
    # nucleus of the softmax(logits / temperature) it was drawn from.
    seqs = [list(prompt) + list(new) for prompt, new in zip(PROMPTS, out.tokens, strict=True)]
    buf = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        buf[i, : len(seq)] = seq
    logits = np.asarray(jax.jit(model.apply)(params, buf), np.float64) / kwargs["temperature"]
    for i, (prompt, new) in enumerate(zip(PROMPTS, out.tokens, strict=True)):
        for t, token in enumerate(new):
            row = logits[i, len(prompt) - 1 + t]
            p = np.exp(row - row.max())
            p /= p.sum()
            more_likely = p[p > p[token]].sum()
            assert more_likely < kwargs["top_p"] + 1e-4


def test_pick_keeps_exactly_the_nucleus():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, 0.5 the first only
    (transformers' rule: drop a token once the more likely ones reach top_p)."""
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]] * 2000))
    one = jnp.float32(1.0)
    for top_p, allowed in ((0.7, {1, 3}), (0.5, {1}), (0.96, {0, 1, 3, 2}), (1.0, {0, 1, 2, 3})):
        picked = _pick(logits, False, one, jnp.float32(top_p), jax.random.key(0))
        assert set(np.asarray(picked).tolist()) == allowed, top_p
    greedy = _pick(logits, True, one, jnp.float32(0.1), None)
    assert set(np.asarray(greedy).tolist()) == {1}


def test_pick_nucleus_matches_transformers_top_p():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    logits = 3.0 * jax.random.normal(jax.random.key(0), (8, 64))
    warper = transformers.TopPLogitsWarper(top_p=0.8)
    kept = np.isfinite(warper(None, torch.tensor(np.array(logits))).numpy())
    picks = _pick(
        jnp.tile(logits, (400, 1)), False, jnp.float32(1.0), jnp.float32(0.8), jax.random.key(1)
    )
    seen = np.zeros_like(kept)
    seen[np.tile(np.arange(8), 400), np.asarray(picks)] = True
    assert not (seen & ~kept).any()  # nothing outside transformers' nucleus


def count_traces(fn):
    """How many times Llama.__call__ runs (only while jit traces) during fn()."""
    calls = []

    def counter(next_fun, args, kwargs, context):
        if isinstance(context.module, Llama) and context.method_name == "__call__":
            calls.append(1)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(counter):
        fn()
    return len(calls)


def test_one_compile_per_batch_bucket_and_length():
    cfg = LlamaConfig.tiny(vocab_size=128, num_layers=1)
    model, params = Llama(cfg), random_params(cfg)
    run = lambda prompts, **kw: count_traces(
        lambda: generate(model, params, prompts, max_new_tokens=4, **kw)
    )
    assert run([[1, 2], [3, 4, 5]], stop_tokens=(7,)) == 2  # prefill + the loop body
    # Other prompts in the same bucket, other stop-token values, another pad id: no trace.
    assert run([[9] * 16, [1]], stop_tokens=(9,), pad_id=3) == 0
    assert run([[1] * 17, [1]], stop_tokens=(9,)) == 2  # the next bucket (32)
    sample = dict(rng=jax.random.key(0), stop_tokens=(9,))
    assert run([[1, 2], [3]], temperature=1.0, top_p=0.9, **sample) == 2
    assert run([[4, 2], [3]], temperature=0.5, top_p=0.3, **sample) == 0  # traced values


def test_generate_errors(setup):
    model, params, _ = setup
    gen = lambda prompts=PROMPTS, **kw: generate(
        model, params, prompts, **{"max_new_tokens": 4, **kw}
    )
    with pytest.raises(TypeError, match=r"generate: model must be a lora_jax\.models\.Llama"):
        generate(nn.Dense(3), params, PROMPTS, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompts is empty"):
        gen([])
    with pytest.raises(TypeError, match="prompts must be a sequence of token-id sequences"):
        gen("hello")
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty sequence"):
        gen([[1], []])
    with pytest.raises(ValueError, match=r"prompts\[0\] holds ids outside \[0, 256\): \[256\]"):
        gen([[1, 256]])
    with pytest.raises(ValueError, match=r"stop_tokens must hold token ids in \[0, 256\)"):
        gen(stop_tokens=(-1,))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        gen(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        gen(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        gen(temperature=-1.0)
    with pytest.raises(ValueError, match=r"needs rng, a jax.random key"):
        gen(temperature=0.7)
    with pytest.raises(ValueError, match=r"exceeds the model's max_seq_len \(128\)"):
        gen([[1] * 100], max_new_tokens=30)


def test_cache_call_errors():
    cfg = LlamaConfig.tiny()
    model, params = Llama(cfg), random_params(cfg)
    ids = jnp.zeros((2, 4), jnp.int32)
    prefill = jax.jit(lambda p, x: model.apply(p, x, cache_size=6, mutable=["cache"]))
    with pytest.raises(ValueError, match=r'apply with mutable=\["cache"\]'):
        model.apply(params, ids, cache_size=8)
    with pytest.raises(ValueError, match="found no 'cache' in the variables: prefill first"):
        model.apply(params, ids, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"cache_size must be an int from seq \(4\) to "):
        model.apply(params, ids, cache_size=3, mutable=["cache"])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.apply(params, ids, cache_size=129, mutable=["cache"])
    _, state = prefill(params, ids)
    with pytest.raises(ValueError, match="already hold 'cache'"):
        model.apply({**params, **state}, ids, cache_size=8, mutable=["cache"])
    with pytest.raises(ValueError, match="not both"):
        model.apply({**params, **state}, ids, cache_size=8, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"6 slots, 4 in use; no room for 3 more tokens"):
        model.apply({**params, **state}, ids[:, :3], decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="the cache holds 2 sequences but input_ids has batch 1"):
        model.apply({**params, **state}, ids[:1, :1], decode=True, mutable=["cache"])
