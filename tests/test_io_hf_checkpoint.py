"""Hugging Face checkpoints: load_pretrained / save_pretrained against transformers itself.

Tiny random-weight models of each supported architecture are built with transformers and
saved with its own save_pretrained (also sharded); the reference Llama must give the same
logits. The other way round, lora_jax models (plain, and merged from randomized adapters)
saved with save_pretrained must load in transformers with the same logits. Then every bad
input gives a ValueError naming the tensor and the file.
"""

import dataclasses
import importlib.util
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_hf_model, randomize_adapters, torch_logits
from flax.core import meta
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax.io import hf_checkpoint
from lora_jax.io.hf_checkpoint import DECODER_LINEAR, load_pretrained, save_pretrained
from lora_jax.io.hf_config import llama_config_from_hf, llama_config_to_hf
from lora_jax.models import Llama, LlamaConfig, RopeScaling, stack_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ALL_LINEAR_PATHS = [f"self_attn/{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp/{m}" for m in ("gate_proj", "up_proj", "down_proj")
]
LLAMA_PATHS = [
    "embed_tokens/embedding",
    "layers_3/input_layernorm/scale",
    "layers_3/self_attn/q_norm/scale",
    "layers_3/self_attn/q_proj/bias",
    *[f"layers_3/{m}/kernel" for m in ALL_LINEAR_PATHS],
    "norm/scale",
    "lm_head/kernel",
]
IDS = np.random.default_rng(0).integers(0, 128, (2, 16))
SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# name: (transformers config class, overrides, max_shard_size or None)
HF_CASES = {
    "llama": ("LlamaConfig", {}, None),
    "llama_tied_sharded": ("LlamaConfig", {"tie_word_embeddings": True}, "20KB"),
    "llama3_rope_scaling": ("LlamaConfig", {"rope_parameters": LLAMA3, "head_dim": 16}, None),
    "llama_biases_head_dim": (
        "LlamaConfig",
        {"attention_bias": True, "mlp_bias": True, "head_dim": 16},
        "30KB",
    ),
    "mistral_sliding": ("MistralConfig", {"sliding_window": 4}, None),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "20KB"),
    "qwen2_sliding": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0},
        None,
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "rope_parameters": {"rope_theta": 1e6}}, None),
}


def hf_model(config_class, **overrides):
    """A transformers model with every weight drawn at random (norm scales around 1)."""
    return random_hf_model(getattr(transformers, config_class)(**{**SIZES, **overrides}))


def hf_logits(model, ids=IDS):
    return torch_logits(model, ids)


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def lively(variables, seed=0):
    """Redraws every leaf of a lora_jax model (norm scales around 1)."""
    rng = np.random.default_rng(seed)
    draw = lambda path, v: jnp.asarray(
        (path[-1].key == "scale") + 0.2 * rng.standard_normal(v.shape), v.dtype
    )
    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory):
    """Every HF case saved by transformers: name -> (directory, logits)."""
    out = {}
    for name, (config_class, overrides, shard) in HF_CASES.items():
        model = hf_model(config_class, **overrides)
        path = tmp_path_factory.mktemp(name)
        kwargs = {} if shard is None else {"max_shard_size": shard}
        model.save_pretrained(path, **kwargs)
        assert (path / "model.safetensors.index.json").exists() == (shard is not None)
        out[name] = (path, hf_logits(model))
    return out


# --------------------------------------------------------------------------- load


@pytest.mark.parametrize("name", list(HF_CASES))
def test_load_gives_transformers_logits(saved_hf, name):
    path, expected = saved_hf[name]
    model, variables = load_pretrained(path)
    assert model.cfg.param_dtype == jnp.float32
    logits = jax.jit(model.apply)(variables, IDS)
    error = rel_error(logits, expected)
    print(f"{name}: logits rel. error {error:.2e}")
    assert error <= 1e-4
    if name == "llama3_rope_scaling":  # the scaling matters at these shapes
        assert model.cfg.rope_scaling == RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
        plain = Llama(dataclasses.replace(model.cfg, rope_scaling=None))
        assert rel_error(jax.jit(plain.apply)(variables, IDS), expected) > 1e-3
    if name in ("mistral_sliding", "qwen2_sliding"):  # so does the window
        assert model.cfg.sliding_window == {"mistral_sliding": 4, "qwen2_sliding": 5}[name]
    if name == "mistral_sliding":
        full = Llama(dataclasses.replace(model.cfg, sliding_window=None))
        assert rel_error(jax.jit(full.apply)(variables, IDS), expected) > 1e-3


def test_config_mapping():
    cfg = llama_config_from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            **SIZES,
            "rope_theta": 500000.0,
            "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"},
            "torch_dtype": "bfloat16",
            "attention_bias": True,
        }
    )
    assert (cfg.rope_theta, cfg.rope_scaling.factor, cfg.head_dim) == (500000.0, 8.0, 8)
    assert (cfg.dtype, cfg.param_dtype) == (jnp.bfloat16, jnp.bfloat16)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm) == (True, True, False, False)
    assert llama_config_from_hf(llama_config_to_hf(cfg)) == cfg


def test_dtype_defaults_to_checkpoint_and_can_be_overridden(saved_hf):
    path, _ = saved_hf["llama"]
    model, variables = load_pretrained(path)
    assert (model.cfg.dtype, model.cfg.param_dtype) == (jnp.float32, jnp.float32)
    model, bf16 = load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert (model.cfg.dtype, model.cfg.param_dtype) == (jnp.bfloat16, jnp.bfloat16)
    expected = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), bf16, expected))


def test_init_from_loaded_dense_and_4bit(saved_hf):
    path, expected = saved_hf["llama"]
    model, base = load_pretrained(path)
    lora = lj.LoRA(model, lj.LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    params = lj.init(lora, jax.random.key(1), IDS, base_params=base)
    assert rel_error(jax.jit(lora.apply)(params, IDS), expected) <= 1e-4

    qcfg = lj.QuantConfig(block_size=16, compute_dtype=jnp.float32, targets=("q_proj", "o_proj"))
    model4, base4 = load_pretrained(path, quantize=qcfg)
    q_kernel = base4["params"]["layers_1"]["self_attn"]["o_proj"]["kernel"]
    assert isinstance(q_kernel, lj.QuantizedTensor) and q_kernel.shape == (32, 32)
    kernel = base["params"]["layers_1"]["self_attn"]["o_proj"]["kernel"]
    assert 1e-3 < rel_error(q_kernel.dequantize(), kernel) < 0.2  # 4-bit rounding, no worse
    assert not isinstance(
        base4["params"]["layers_1"]["mlp"]["up_proj"]["kernel"], lj.QuantizedTensor
    )
    lora4 = lj.LoRA(model4, lj.LoraConfig(rank=4, targets=("q_proj", "o_proj"), quantize=qcfg))
    params4 = lj.init(lora4, jax.random.key(1), IDS, base_params=base4)
    dense = jax.jit(model4.apply)(lj.dequantize(base4), IDS)
    assert rel_error(jax.jit(lora4.apply)(params4, IDS), dense) <= 1e-5


def test_quantize_targets_default_to_the_decoder_linear_layers():
    every = lj.QuantConfig()
    chosen = [p for p in LLAMA_PATHS if hf_checkpoint._quantized(p, every)]
    assert chosen == [f"layers_3/{m}/kernel" for m in ALL_LINEAR_PATHS]
    assert not hf_checkpoint._quantized(
        "layers_3/self_attn/q_proj/kernel", lj.QuantConfig(exclude=("q_proj",))
    )
    assert hf_checkpoint._quantized("lm_head/kernel", lj.QuantConfig(targets=("lm_head",)))


def test_load_onto_a_mesh(saved_hf):
    path, expected = saved_hf["llama"]
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rules = (("embed", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"))
    model, variables = load_pretrained(path, mesh=mesh, rules=rules)
    assert model.cfg.logical_axes
    q = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, meta.Partitioned) and q.names == ("embed", "heads")
    assert q.value.sharding.spec == PartitionSpec("data", "model")
    assert rel_error(jax.jit(model.apply)(variables, IDS), expected) <= 1e-4
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=4, targets=("q_proj",)))
    params = lj.init(lora_model, jax.random.key(1), IDS, base_params=variables)
    assert params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel_lora_b"].names == (
        None,
        "heads",
    )

    qcfg = lj.QuantConfig(block_size=16, compute_dtype=jnp.float32, targets=("up_proj",))
    _, variables4 = load_pretrained(path, mesh=mesh, rules=rules, quantize=qcfg)
    up = variables4["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up.value, lj.QuantizedTensor) and up.names == ("embed", "mlp")
    assert up.value.codes.sharding.spec == PartitionSpec(None, "model")
    assert not isinstance(
        variables4["params"]["layers_0"]["mlp"]["down_proj"]["kernel"].value, lj.QuantizedTensor
    )


# --------------------------------------------------------------------------- save

SAVE_CASES = {
    "llama": LlamaConfig.tiny(vocab_size=128, num_layers=2),
    "qwen2_scan": LlamaConfig.tiny(vocab_size=128, qkv_bias=True, scan_layers=True),  # stacked
    "qwen3": LlamaConfig.tiny(vocab_size=128, qk_norm=True, head_dim=32),
    "mistral": LlamaConfig.tiny(vocab_size=128, sliding_window=5),
}


@pytest.mark.parametrize("name", list(SAVE_CASES))
def test_saved_model_loads_in_transformers(tmp_path, name):
    cfg = SAVE_CASES[name]
    unrolled = Llama(dataclasses.replace(cfg, scan_layers=False))
    variables = lively(jax.eval_shape(unrolled.init, jax.random.key(0), IDS))
    saved = stack_layers(variables) if cfg.scan_layers else variables
    save_pretrained(tmp_path, Llama(cfg), saved, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf).__name__ == llama_config_to_hf(cfg)["architectures"][0]
    error = rel_error(hf_logits(hf), jax.jit(unrolled.apply)(variables, IDS))
    print(f"save {name}: logits rel. error {error:.2e}")
    assert error <= 1e-4
    loaded, _ = load_pretrained(tmp_path)  # and back
    assert loaded.cfg == unrolled.cfg


def test_merged_lora_model_loads_in_transformers(tmp_path):
    """(Also a tied model with llama3 RoPE scaling.)"""
    scaling = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    )
    cfg = LlamaConfig.tiny(
        vocab_size=128, tie_embeddings=True, rope_theta=500000.0, rope_scaling=scaling
    )
    model = Llama(cfg)
    base = lively(jax.eval_shape(model.init, jax.random.key(0), IDS))
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=4, targets=DECODER_LINEAR))
    params = lj.init(lora_model, jax.random.key(1), IDS, base_params=base)
    params = randomize_adapters(params, jax.random.key(2))
    with pytest.raises(ValueError, match=r"adapters .*kernel_lora_a.*lora_jax.merge"):
        save_pretrained(tmp_path, model, params)
    merged = lj.merge(params)
    save_pretrained(tmp_path, model, merged)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    kernel = lambda p: p["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert rel_error(kernel(merged), kernel(base)) > 1e-2  # the adapters matter
    # (merge itself is checked against the adapted forward pass in test_ops_merge.py)
    assert rel_error(hf_logits(hf), jax.jit(model.apply)(merged, IDS)) <= 1e-4


def test_save_writes_4bit_kernels_dense(tmp_path):
    model = Llama(LlamaConfig.tiny(vocab_size=128))
    base = lively(jax.eval_shape(model.init, jax.random.key(0), IDS))
    qcfg = lj.QuantConfig(block_size=16, compute_dtype=jnp.float32)
    qbase = lj.quantize(base, qcfg, paths={"params/layers_1/self_attn/o_proj/kernel": (0, 1)})
    save_pretrained(tmp_path, model, qbase)
    written = load_file(tmp_path / "model.safetensors")
    q = qbase["params"]["layers_1"]["self_attn"]["o_proj"]["kernel"]
    np.testing.assert_array_equal(
        written["model.layers.1.self_attn.o_proj.weight"], np.asarray(q.dequantize()).T
    )


def test_save_refuses_what_no_architecture_has(tmp_path):
    model = Llama(LlamaConfig.tiny(o_bias=True))
    with pytest.raises(
        ValueError, match=r"LlamaForCausalLM.*cannot express o_bias without qkv_bias"
    ):
        save_pretrained(tmp_path, model, {})
    model = Llama(LlamaConfig.tiny())
    with pytest.raises(ValueError, match=r"'layers_1/mlp/up_proj/kernel' is missing"):
        params = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
        del params["layers_1"]["mlp"]["up_proj"]
        save_pretrained(tmp_path, model, params)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    """A small lora_jax model saved in two shards."""
    model = Llama(LlamaConfig.tiny(vocab_size=128))
    variables = lively(jax.eval_shape(model.init, jax.random.key(0), IDS))
    save_pretrained(tmp_path, model, variables, max_shard_bytes=100_000)
    return tmp_path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def shard_of(path, tensor):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][tensor]


def test_unsupported_architecture_and_rope(saved):
    edit_config(saved, architectures=["GemmaForCausalLM"])
    with pytest.raises(
        ValueError,
        match=r"GemmaForCausalLM.*supported: LlamaForCausalLM, "
        r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ):
        load_pretrained(saved)
    edit_config(saved, architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "yarn"})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        load_pretrained(saved)


def test_missing_and_unexpected_tensors_are_all_listed(saved):
    file = shard_of(saved, "model.layers.1.mlp.up_proj.weight")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"2 problems") as e:
        load_pretrained(saved)
    assert "Tensor 'model.layers.1.mlp.up_proj.weight' is missing" in str(e.value)
    assert f"Tensor 'model.layers.1.mlp.extra.weight' in '{file.name}' is not a" in str(e.value)


def test_wrong_shape_and_dtype(saved):
    file = shard_of(saved, "model.norm.weight")
    tensors = load_file(file)
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    other = next(k for k in sorted(tensors) if k != "model.norm.weight")
    tensors[other] = tensors[other].astype(np.int32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="2 problems") as e:
        load_pretrained(saved)
    message = str(e.value)
    assert (
        f"Tensor 'model.norm.weight' in '{file.name}' has shape (63,) but config.json gives (64,)"
        in message
    )
    assert f"Tensor '{other}' in '{file.name}' has dtype I32; expected a floating" in message


def test_index_naming_a_missing_shard(saved):
    file = shard_of(saved, "model.norm.weight")
    file.unlink()
    with pytest.raises(
        ValueError, match=f"names shards that .* lacks: '{file.name}' .*model.norm.weight"
    ):
        load_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header"])
def test_truncated_or_corrupt_file(saved, damage):
    file = shard_of(saved, "model.norm.weight")
    data = file.read_bytes()
    data = data[:-100] if damage == "truncated" else data[:8] + b"{nonsense" + data[17:]
    file.write_bytes(data)
    with pytest.raises(ValueError, match=f"Cannot read '.*{file.name}'.*truncated or corrupt"):
        load_pretrained(saved)


def test_reader_gives_the_stored_bits_aligned_and_names_a_file_cut_short(saved):
    """The loader reads each tensor itself (into a buffer XLA can adopt without a copy); what
    it reads is what safetensors reads, and a file that shrinks after its header was checked
    is a ValueError naming it, not a short array."""
    tensors = hf_checkpoint._headers(saved)
    for name, tensor in tensors.items():
        value = hf_checkpoint._reader(tensor, name)()
        assert value.ctypes.data % hf_checkpoint._ALIGN == 0
        expected = load_file(str(tensor.file))[name]
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        np.testing.assert_array_equal(value.view(np.uint8), expected.view(np.uint8))
    name = "model.norm.weight"
    file = tensors[name].file
    data = file.read_bytes()
    file.write_bytes(data[: tensors[name].offset + 10])
    cut = tensors[name]._replace(stamp=hf_checkpoint._data_offsets(file)[1])
    with pytest.raises(ValueError, match=f"Cannot read '.*{file.name}'.*'{name}': 10 of"):
        hf_checkpoint._reader(cut, name)()
    # Rewritten after its header was read (same tensors, a longer header: every offset moves):
    # an error naming the file, not the bytes now at the old offsets.
    save_file(load_file(str(tensors["model.embed_tokens.weight"].file)), str(file), {"x": "y" * 99})
    with pytest.raises(ValueError, match=f"Cannot read '.*{file.name}'.*changed after its header"):
        hf_checkpoint._reader(tensors[name], name)()


def test_no_weights_and_partial_sliding_window(saved, tmp_path_factory):
    with pytest.raises(ValueError, match=r"neither model\.safetensors nor"):
        empty = tmp_path_factory.mktemp("empty")
        (empty / "config.json").write_text((saved / "config.json").read_text())
        load_pretrained(empty)
    edit_config(
        saved,
        architectures=["Qwen2ForCausalLM"],
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        layer_types=None,
    )
    with pytest.raises(ValueError, match="sliding-window attention on some layers only"):
        load_pretrained(saved)


def test_gguf_goes_to_the_gguf_reader(saved, tmp_path, monkeypatch):
    model = Llama(LlamaConfig.tiny(vocab_size=128))
    params = lively(jax.eval_shape(model.init, jax.random.key(0), IDS))["params"]
    if importlib.util.find_spec("lora_jax.io.gguf") is None:
        with pytest.raises(ValueError, match=r"needs lora_jax\.io\.gguf"):
            load_pretrained(tmp_path / "model.gguf")
    calls = []

    def read_gguf(path, *, dtype=None):
        calls.append((path, dtype))
        return model.cfg, jax.tree.map(np.asarray, params), {}

    fake = types.ModuleType("lora_jax.io.gguf")
    fake.read_gguf = read_gguf
    monkeypatch.setitem(sys.modules, "lora_jax.io.gguf", fake)
    loaded, variables = load_pretrained(tmp_path / "model.gguf", param_dtype=jnp.bfloat16)
    assert calls == [(tmp_path / "model.gguf", jnp.bfloat16)]
    assert loaded.cfg.param_dtype == jnp.bfloat16
    kernel = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        kernel, params["layers_0"]["self_attn"]["q_proj"]["kernel"].astype(jnp.bfloat16)
    )
