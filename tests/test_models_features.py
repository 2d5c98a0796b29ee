"""The reference Llama's architecture options against transformers' own models.

Each case builds a tiny random-weight transformers model from a config (Llama with biases,
llama3 RoPE scaling and a free head_dim; Mistral with a sliding window; Qwen2 with q/k/v
biases; Qwen3 with q/k norms; tied and untied heads), copies its weights into the lora_jax
tree and compares float32 logits.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from lora_jax.io.hf_names import LLAMA
from lora_jax.models import Llama, LlamaConfig, RopeScaling, rope_frequencies, stack_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4  # of the logits' largest magnitude
VOCAB, SEQ = 128, 12
LLAMA3_ROPE = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
)
COMMON = dict(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    attn_implementation="eager",
)

# name -> (transformers class, its config kwargs, the LlamaConfig feature kwargs)
CASES = {
    "llama_bias_rope_head_dim": (
        "LlamaForCausalLM",
        dict(
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=10000.0,
            rope_scaling=dict(rope_type="llama3", **LLAMA3_ROPE),
        ),
        dict(qkv_bias=True, o_bias=True, mlp_bias=True, rope_scaling=RopeScaling(**LLAMA3_ROPE)),
    ),
    "mistral_sliding_window": (
        "MistralForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,
            rope_theta=10000.0,
        ),
        dict(sliding_window=4),
    ),
    "qwen2_qkv_bias": (
        "Qwen2ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
        ),
        dict(qkv_bias=True),
    ),
    "qwen2_sliding_every_layer": (
        "Qwen2ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=0,
        ),
        dict(qkv_bias=True, sliding_window=5),
    ),
    "qwen3_qk_norm": (
        "Qwen3ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=1000000.0,
        ),
        dict(qk_norm=True),
    ),
}


def hf_model(name, tie, seed=0):
    """A transformers model with lively random weights (norm scales around 1, biases drawn)."""
    cls_name, kwargs, _ = CASES[name]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**COMMON, **kwargs, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_norm = pname.endswith("norm.weight")
            p.copy_(is_norm + (0.3 if is_norm else 0.15) * torch.randn_like(p))
    return model


def lj_config(model, **features):
    """The LlamaConfig of a transformers model (what a checkpoint loader derives)."""
    c = model.config
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None),
        rope_theta=float(c.rope_parameters["rope_theta"]),
        rms_norm_eps=c.rms_norm_eps,
        tie_embeddings=c.tie_word_embeddings,
        max_seq_len=c.max_position_embeddings,
        **features,
    )


def lj_params(model, cfg):
    """The transformers weights as the lora_jax tree: linear weights (out, in) transposed to
    kernels (in, out); norm weights -> scale; embed_tokens -> embedding; no lm_head if tied."""
    flat = {}
    for name, w in model.state_dict().items():
        module, param = name.rsplit(".", 1)
        if module == "lm_head" and cfg.tie_embeddings:
            continue
        path, w = LLAMA.from_hf(module), w.detach().numpy()
        last = path.rsplit("/", 1)[-1]
        if param == "bias":
            leaf = "bias"
        elif last == "embed_tokens":
            leaf = "embedding"
        elif last.endswith("norm"):
            leaf = "scale"
        else:
            leaf, w = "kernel", w.T
        flat[f"{path}/{leaf}"] = jnp.asarray(w)
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def hf_logits(model, ids, positions=None, mask=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.array(ids), dtype=torch.long),
            position_ids=None if positions is None else torch.tensor(np.array(positions)),
            attention_mask=None if mask is None else torch.tensor(np.array(mask)),
        )
    return out.logits.numpy()


def agreement(actual, expected):
    """(max abs difference, max abs difference / the expected logits' largest magnitude)."""
    diff = float(np.max(np.abs(np.asarray(actual) - expected)))
    return diff, diff / float(np.max(np.abs(expected)))


def random_params(cfg, seed=0):
    """Lively random parameters for Llama(cfg) without compiling its init (norm scales around
    1, every other leaf, biases included, normal with std 0.15)."""
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    draw = lambda path, v: jnp.asarray(
        (path[-1].key == "scale") + 0.15 * rng.standard_normal(v.shape), v.dtype
    )
    return jax.tree_util.tree_map_with_path(draw, shapes)


def ids_for(seed, shape=(2, SEQ)):
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


@pytest.fixture(
    scope="module",
    params=[(n, t) for n in CASES for t in (False, True)],
    ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}",
)
def case(request):
    name, tie = request.param
    model = hf_model(name, tie)
    cfg = lj_config(model, **CASES[name][2])
    return name, model, cfg, lj_params(model, cfg)


def test_tree_is_what_transformers_holds(case):
    """Every transformers weight has its leaf and the other way round, shapes included."""
    _, _, cfg, params = case
    expected = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, expected)


def test_logits_match_transformers(case):
    name, model, cfg, params = case
    ids = ids_for(1)
    # Positions far beyond the sequence, so that the slow (scaled) RoPE frequencies turn.
    positions = np.broadcast_to(np.arange(SEQ) + 700, ids.shape)
    expected = hf_logits(model, ids, positions)
    logits = jax.jit(Llama(cfg).apply)(params, ids, positions)
    _, rel = agreement(logits, expected)
    assert rel <= REL_TOL, name


def test_left_padded_batch_matches_transformers(case):
    """Padding on the left, positions from 0 at each first real token, as transformers'
    generate sets them: the real tokens' logits agree (sliding windows included)."""
    name, model, cfg, params = case
    ids = ids_for(2)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = hf_logits(model, ids, positions, mask)
    logits = np.asarray(jax.jit(Llama(cfg).apply)(params, ids, positions, mask))
    real = mask.astype(bool)
    _, rel = agreement(logits[real], expected[real])
    assert rel <= REL_TOL, name


@pytest.mark.parametrize(
    "name, option",
    [
        ("llama_bias_rope_head_dim", "rope_scaling"),
        ("mistral_sliding_window", "sliding_window"),
        ("qwen2_qkv_bias", "qkv_bias"),
        ("qwen3_qk_norm", "qk_norm"),
    ],
)
def test_each_option_matters(name, option):
    """Without the option the logits move far beyond the tolerance (the cases test it)."""
    model = hf_model(name, tie=False)
    features = dict(CASES[name][2])
    cfg = lj_config(model, **features)
    params = lj_params(model, cfg)
    if option in ("qkv_bias", "qk_norm"):  # drop the leaves along with the option
        flat = traverse_util.flatten_dict(params, sep="/")
        gone = "bias" if option == "qkv_bias" else "_norm/scale"
        params = traverse_util.unflatten_dict(
            {k: v for k, v in flat.items() if not k.endswith(gone)}, sep="/"
        )
    features[option] = None if option in ("rope_scaling", "sliding_window") else False
    ids = ids_for(3)
    positions = np.broadcast_to(np.arange(SEQ) + 700, ids.shape)
    expected = hf_logits(model, ids, positions)
    logits = jax.jit(Llama(lj_config(model, **features)).apply)(params, ids, positions)
    _, rel = agreement(logits, expected)
    assert rel > 100 * REL_TOL


def test_rope_frequencies_match_transformers():
    model = hf_model("llama_bias_rope_head_dim", tie=False)
    expected = model.model.rotary_emb.inv_freq.numpy()
    found = rope_frequencies(16, 10000.0, RopeScaling(**LLAMA3_ROPE))
    np.testing.assert_allclose(found, expected, rtol=1e-6)
    plain = rope_frequencies(16, 10000.0)
    assert (found == plain).sum() == 3 and (found < plain).sum() == 5  # all three bands


def test_llama32_1b_rope_scaling_frequencies():
    """Llama 3.2 1B's rope_scaling against transformers' `_compute_llama3_parameters`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    config = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", **scaling),
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    found = rope_frequencies(64, 500000.0, RopeScaling(**scaling))
    np.testing.assert_allclose(found, expected.numpy(), rtol=1e-6)
    assert (found != rope_frequencies(64, 500000.0)).sum() == 17


def sliding_reference(window, s):
    """transformers' sliding-window causal mask: query i sees keys i - window < j <= i."""
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    return (j <= i) & (j > i - window)


@pytest.mark.parametrize("window", [1, 3, SEQ + 5])
def test_sliding_window_sees_exactly_the_window(window):
    """Changing token j changes the output at i exactly when transformers' mask lets i see j
    (one layer, so that influence equals direct attention)."""
    cfg = LlamaConfig.tiny(num_layers=1, sliding_window=window)
    model = Llama(cfg)
    ids = jnp.asarray(ids_for(4, (1, SEQ)))
    params = random_params(cfg)
    # Row j + 1 changes token j; row 0 is the original.
    variants = jnp.concatenate([ids, jnp.tile(ids, (SEQ, 1))])
    variants = variants.at[jnp.arange(1, SEQ + 1), jnp.arange(SEQ)].add(1) % VOCAB
    logits = jax.jit(model.apply)(params, variants)
    seen = np.asarray(jnp.any(logits[1:] != logits[:1], axis=-1)).T  # (query, changed key)
    np.testing.assert_array_equal(seen, sliding_reference(window, SEQ))


def test_defaults_keep_the_plain_tree():
    cfg = LlamaConfig.tiny()
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm) == (False,) * 4
    assert cfg.rope_scaling is None and cfg.sliding_window is None
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    assert not [k for k in flat if k.endswith("bias") or "q_norm" in k or "k_norm" in k]


FEATURES = dict(
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    qk_norm=True,
    head_dim=24,
    sliding_window=5,
    rope_scaling=RopeScaling(**LLAMA3_ROPE),
)


@pytest.mark.parametrize(
    "features",
    [
        dict(qkv_bias=True),
        dict(o_bias=True),
        dict(mlp_bias=True),
        dict(qk_norm=True),
        FEATURES,
    ],
)
def test_num_params_counts_the_new_leaves(features):
    cfg = LlamaConfig.tiny(**features)
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(v.size for v in jax.tree.leaves(shapes)) == cfg.num_params()


def test_logical_axes_annotate_the_new_leaves():
    cfg = LlamaConfig.tiny(**FEATURES, logical_axes=True)
    params = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    flat = traverse_util.flatten_dict(params["params"], sep="/")
    boxes = {k: v for k, v in flat.items() if isinstance(v, nn_partitioned())}
    assert set(boxes) == set(flat)
    assert boxes["layers_0/self_attn/q_proj/bias"].names == ("heads",)
    assert boxes["layers_0/mlp/down_proj/bias"].names == ("embed",)
    assert boxes["layers_0/self_attn/k_norm/scale"].names == ("norm",)


def nn_partitioned():
    import flax.linen as nn

    return nn.LogicallyPartitioned


def test_scan_layers_with_the_new_options():
    cfg = LlamaConfig.tiny(**FEATURES)
    ids = jnp.asarray(ids_for(5))
    params = random_params(cfg)
    unrolled = jax.jit(Llama(cfg).apply)(params, ids)
    scanned_model = Llama(dataclasses.replace(cfg, scan_layers=True))
    scanned = jax.jit(scanned_model.apply)(stack_layers(params), ids)
    chex.assert_trees_all_close(scanned, unrolled, atol=1e-5 * float(jnp.max(jnp.abs(unrolled))))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(qkv_bias=1), "LlamaConfig.qkv_bias must be a bool"),
        (dict(o_bias="yes"), "LlamaConfig.o_bias must be a bool"),
        (dict(mlp_bias=None), "LlamaConfig.mlp_bias must be a bool"),
        (dict(qk_norm=0), "LlamaConfig.qk_norm must be a bool"),
        (dict(sliding_window=0), "LlamaConfig.sliding_window must be a positive int"),
        (dict(sliding_window=4.0), "LlamaConfig.sliding_window must be a positive int"),
        (
            dict(rope_scaling=dict(LLAMA3_ROPE)),
            r"rope_scaling must be None or a RopeScaling.*RopeScaling\(\*\*that_dict\)",
        ),
        (dict(rope_scaling=8.0), "LlamaConfig.rope_scaling must be None or a RopeScaling"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.tiny(**overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(factor=0.0), "RopeScaling.factor must be a positive number"),
        (dict(low_freq_factor=-1.0), "RopeScaling.low_freq_factor must be a positive number"),
        (
            dict(high_freq_factor=1.0),
            r"RopeScaling.high_freq_factor must be greater than low_freq_factor \(1.0\), got 1.0",
        ),
        (
            dict(original_max_position_embeddings=256.0),
            "RopeScaling.original_max_position_embeddings must be a positive int",
        ),
    ],
)
def test_rope_scaling_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**{**LLAMA3_ROPE, **overrides})


def test_rope_scaling_is_frozen_and_hashable():
    s = RopeScaling(**LLAMA3_ROPE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.factor = 2.0
    assert hash(LlamaConfig.tiny(rope_scaling=s)) == hash(LlamaConfig.tiny(rope_scaling=s))
    assert meta.unbox(s) is s
