"""PEFT adapters: save_peft / load_peft against PEFT itself.

Tiny random-weight Llamas are built with transformers, saved with its save_pretrained and
loaded with load_pretrained. An adapter made in lora_jax and written by save_peft must give
PEFT (``PeftModel.from_pretrained``) lora_jax's logits; an adapter made and saved by PEFT must
give lora_jax PEFT's logits and merged weights; save_peft -> load_peft gives the tree back.
Then every unsupported feature or damaged file is an error naming the field or the tensor.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    QC,
    leaves_by_path,
    random_hf_model,
    randomize_adapters,
    records_by_path,
    same_arrays,
    torch_logits,
)
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax.io import peft as peft_io
from lora_jax.io.hf_checkpoint import load_pretrained
from lora_jax.io.hf_names import LLAMA, NameMap
from lora_jax.io.peft import load_peft, save_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# What transformers and PEFT say on their own account while PEFT wraps a model.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
IDS = np.random.default_rng(0).integers(0, 128, (2, 12))
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR_PATHS = [f"self_attn/{m}" for m in ALL_LINEAR[:4]] + [f"mlp/{m}" for m in ALL_LINEAR[4:]]
PREFIX = "base_model.model."


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def hf_model(tied):
    """A transformers Llama with every weight drawn at random (norm scales around 1)."""
    return random_hf_model(transformers.LlamaConfig(**SIZES, tie_word_embeddings=tied))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """An untied and a tied base saved by transformers: name -> directory."""
    out = {}
    for name, tied in (("untied", False), ("tied", True)):
        out[name] = tmp_path_factory.mktemp(name)
        hf_model(tied).save_pretrained(out[name])
    return out


def fresh(bases, name):
    """The base as transformers loads it (a new module each time: PEFT edits it in place)."""
    return transformers.AutoModelForCausalLM.from_pretrained(bases[name]).eval()


# name: (base, LoraConfig fields)
CASES = {
    "rslora_patterns": (
        "untied",
        dict(
            rank=4,
            alpha=8.0,
            targets="all-linear",
            rank_pattern={"q_proj": 2, "layers_1/mlp/down_proj": 6},
            alpha_pattern={"v_proj": 3.0, "layers_0/.*": 5},
            use_rslora=True,
        ),
    ),
    "lm_head_extra": (
        "untied",
        dict(rank=4, alpha=16.0, targets=("q_proj", "v_proj"), trainable=("lm_head/kernel",)),
    ),
    "regex_exclude_embedding": (
        "untied",
        dict(
            rank=2,
            alpha=4.0,
            targets=r"embed_tokens|layers_\d+/(self_attn|mlp)/\w+_proj",
            exclude=("layers_0/mlp/up_proj",),
        ),
    ),
    "tied_embedding": ("tied", dict(rank=4, alpha=8.0, targets=("embed_tokens", "o_proj"))),
}


@pytest.fixture(scope="module")
def made(bases):
    """Each case made in lora_jax: name -> (model, base variables, config, params, logits),
    adapters (and extras) randomized."""
    out = {}
    for name, (base_name, fields) in CASES.items():
        model, base = load_pretrained(bases[base_name])
        cfg = lj.LoraConfig(**fields)
        lora_model = lj.LoRA(model, cfg)
        params = lj.init(lora_model, jax.random.key(1), IDS, base_params=base)
        params = randomize_adapters(params, jax.random.key(2), scale=0.1)
        if cfg.trainable:
            head = params["params"]["lm_head"]
            head["kernel"] = head["kernel"] + 0.1 * jax.random.normal(
                jax.random.key(3), head["kernel"].shape
            )
        out[name] = (model, base, cfg, params, lora_model.apply(params, IDS))
    return out


# --------------------------------------------------------------------------- lora_jax -> PEFT


@pytest.mark.parametrize("name", list(CASES))
def test_save_peft_gives_peft_lora_jax_logits(bases, made, tmp_path, name):
    model, base, cfg, params, logits = made[name]
    save_peft(tmp_path, params, cfg, base_model_name_or_path=str(bases[CASES[name][0]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) >= set(peft.LoraConfig().to_dict()) - {"target_modules"}
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    peft_model = peft.PeftModel.from_pretrained(fresh(bases, CASES[name][0]), tmp_path).eval()
    expected = torch_logits(peft_model, IDS)
    assert rel_error(logits, expected) <= 1e-4
    assert rel_error(model.apply(base, IDS), expected) > 1e-2  # the adapters matter
    # PEFT computes the very scales lora_jax has
    for hf, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and hf.startswith(PREFIX):
            path = LLAMA.from_hf(hf.removeprefix(PREFIX))
            assert module.scaling["default"] == cfg.scale_for(path), path


def test_save_peft_file_layout(made, tmp_path):
    _, _, cfg, params, _ = made["rslora_patterns"]
    save_peft(tmp_path, params, cfg)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == "all-linear"
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (4, 8.0, True)
    assert written["rank_pattern"] == {"model.layers.1.mlp.down_proj": 6, "q_proj": 2}
    assert written["alpha_pattern"] == {
        **{f"model.layers.0.{m}": 5 for m in ("self_attn.q_proj", "self_attn.k_proj")},
        **{f"model.layers.0.{m}": 5 for m in ("self_attn.o_proj", "mlp.gate_proj")},
        **{f"model.layers.0.mlp.{m}": 5 for m in ("up_proj", "down_proj")},
        "v_proj": 3.0,  # sorted after the layer-0 keys, which leave v_proj out
    }
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2
    a = tensors[PREFIX + "model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors[PREFIX + "model.layers.1.mlp.down_proj.lora_B.weight"]
    assert (a.shape, b.shape, a.dtype) == ((6, 64), (32, 6), np.float32)
    down = params["params"]["layers_1"]["mlp"]["down_proj"]
    same_arrays(a, down["kernel_lora_a"].T)
    same_arrays(b, down["kernel_lora_b"].T)


def test_save_peft_writes_modules_to_save_and_embeddings_as_peft_does(made, tmp_path):
    _, _, cfg, params, _ = made["lm_head_extra"]
    save_peft(tmp_path / "head", params, cfg)
    written = json.loads((tmp_path / "head" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["lm_head"]
    assert written["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(tmp_path / "head" / "adapter_model.safetensors")
    same_arrays(tensors[PREFIX + "lm_head.weight"], params["params"]["lm_head"]["kernel"].T)
    _, _, cfg, params, _ = made["regex_exclude_embedding"]
    save_peft(tmp_path / "regex", params, cfg)
    written = json.loads((tmp_path / "regex" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.up_proj" not in written["target_modules"]
    assert "model.layers.1.mlp.up_proj" in written["target_modules"]
    tensors = load_file(tmp_path / "regex" / "adapter_model.safetensors")
    embed = params["params"]["embed_tokens"]
    same_arrays(
        tensors[PREFIX + "model.embed_tokens.lora_embedding_A"], embed["embedding_lora_a"].T
    )
    same_arrays(
        tensors[PREFIX + "model.embed_tokens.lora_embedding_B"], embed["embedding_lora_b"].T
    )
    _, _, cfg, params, _ = made["tied_embedding"]
    save_peft(tmp_path / "tied", params, cfg)
    written = json.loads((tmp_path / "tied" / "adapter_config.json").read_text())
    assert written["ensure_weight_tying"] is True


@pytest.mark.parametrize("name", list(CASES))
def test_save_peft_then_load_peft_gives_the_tree_back(made, tmp_path, name):
    model, base, cfg, params, logits = made[name]
    save_peft(tmp_path, params, cfg)
    loaded, loaded_cfg = load_peft(tmp_path, base)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(same_arrays, loaded["params"], params["params"])
    assert records_by_path(loaded) == records_by_path(params)
    assert loaded_cfg.trainable == cfg.trainable and loaded_cfg.use_rslora == cfg.use_rslora
    if name == "lm_head_extra":
        assert loaded_cfg == cfg
    same_arrays(lj.LoRA(model, loaded_cfg).apply(loaded, IDS), logits)


# --------------------------------------------------------------------------- PEFT -> lora_jax


def peft_made(base, path, **fields):
    """A PEFT adapter with random A and B (and a retrained lm_head copy when saved), saved."""
    torch.manual_seed(4)
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **fields)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def peft_adapter(bases, tmp_path_factory):
    """PEFT's adapter: all linear layers, rsLoRA, rank and alpha patterns, lm_head saved."""
    path = tmp_path_factory.mktemp("peft_adapter")
    model = peft_made(
        fresh(bases, "untied"),
        path,
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_rslora=True,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3},
        modules_to_save=["lm_head"],
    )
    return path, model


def test_load_peft_gives_peft_logits_and_merge(bases, peft_adapter):
    path, peft_model = peft_adapter
    model, base = load_pretrained(bases["untied"])
    params, cfg = load_peft(path, base)
    assert cfg.targets == "all-linear" and cfg.trainable == ("lm_head/kernel",)
    assert cfg.rank_pattern == (("layers_1/mlp/down_proj", 6), ("q_proj", 2))
    assert cfg.alpha_pattern == (("v_proj", 3),) and cfg.use_rslora
    assert rel_error(lj.LoRA(model, cfg).apply(params, IDS), torch_logits(peft_model, IDS)) <= 1e-4
    merged = lj.merge(params)
    hf = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    for path_, value in jax.tree_util.tree_flatten_with_path(merged["params"])[0]:
        param = "/".join(k.key for k in path_)
        expected = hf[LLAMA.param_to_hf(param)]
        expected = expected.T if param.endswith("kernel") else expected
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=param)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_load_peft_regex_targets_exclude_and_an_adapted_head(bases, tmp_path):
    peft_model = peft_made(
        fresh(bases, "untied"),
        tmp_path,
        r=2,
        lora_alpha=4,
        lora_dropout=0.05,
        target_modules=r".*\.(q_proj|down_proj)|lm_head",
        exclude_modules=["model.layers.0.mlp.down_proj"],
    )
    assert PREFIX + "lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    model, base = load_pretrained(bases["untied"])
    params, cfg = load_peft(tmp_path, base)
    assert cfg.targets == (
        "layers_0/self_attn/q_proj",
        "layers_1/mlp/down_proj",
        "layers_1/self_attn/q_proj",
        "lm_head",
    )
    assert cfg.dropout == 0.05
    assert rel_error(lj.LoRA(model, cfg).apply(params, IDS), torch_logits(peft_model, IDS)) <= 1e-4
    edit_tensors(
        tmp_path,
        lambda t: t.update({PREFIX + "lm_head.base_layer.weight": np.zeros((128, 32), np.float32)}),
    )
    with pytest.raises(
        ValueError,
        match=r"'base_model.model.lm_head.base_layer.weight' holds other weights than base_params' 'lm_head/kernel'",
    ):
        load_peft(tmp_path, base)


def test_load_peft_builds_the_tree_init_builds_on_a_mesh(bases, peft_adapter):
    """Boxed (logically partitioned) bases: the same boxes, records and leaves as init."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rules = (("embed", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"))
    model, base = load_pretrained(bases["untied"], mesh=mesh, rules=rules)
    params, cfg = load_peft(peft_adapter[0], base)
    made = lj.init(lj.LoRA(model, cfg), jax.random.key(0), IDS, base_params=base)
    assert jax.tree.structure(params) == jax.tree.structure(made)
    assert records_by_path(params) == records_by_path(made)
    b = params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel_lora_b"]
    assert b.names == (None, "heads") and b.value.shape == (2, 32)


def test_load_peft_onto_a_4bit_base(bases, peft_adapter):
    path, _ = peft_adapter
    model, base = load_pretrained(bases["untied"])
    dense, dense_cfg = load_peft(path, base)
    model4, base4 = load_pretrained(bases["untied"], quantize=QC(block_size=32))
    params, cfg = load_peft(path, base4)
    assert cfg.quantize is not None and cfg.quantize.targets == tuple(
        sorted(f"layers_{i}/{m}" for i in (0, 1) for m in ALL_LINEAR_PATHS)
    )
    assert dataclasses.replace(cfg, quantize=None) == dense_cfg
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]
    assert isinstance(q["kernel"], lj.QuantizedTensor) and q["kernel_lora_a"].shape == (32, 2)
    flat, flat_dense = leaves_by_path(params), leaves_by_path(dense)
    for k, v in flat.items():
        if "_lora_" in k or k.endswith("lm_head/kernel"):
            same_arrays(v, flat_dense[k])
    logits = jax.jit(lj.LoRA(model4, cfg).apply)(params, IDS)
    assert rel_error(logits, model.apply(jax.jit(lj.merge)(params), IDS)) <= 1e-4


def test_load_peft_tied_embedding_adapter(bases, tmp_path):
    peft_model = peft_made(
        fresh(bases, "tied"),
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj"],
        ensure_weight_tying=True,
    )
    model, base = load_pretrained(bases["tied"])
    params, cfg = load_peft(tmp_path, base)
    assert cfg.targets == ("embed_tokens", "q_proj")
    assert rel_error(lj.LoRA(model, cfg).apply(params, IDS), torch_logits(peft_model, IDS)) <= 1e-4


# --------------------------------------------------------------------------- errors


@pytest.fixture
def saved(made, tmp_path):
    """A valid adapter (lm_head_extra) written by save_peft: (directory, base)."""
    _, base, cfg, params, _ = made["lm_head_extra"]
    save_peft(tmp_path / "adapter", params, cfg)
    return tmp_path / "adapter", base


def edit_config(path, **fields):
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **fields}))


def edit_tensors(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"peft_type": "IA3"}, r"peft_type 'IA3'"),
        (
            {"use_dora": True},
            r"'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector' is missing",
        ),
        ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\]"),
        ({"layers_pattern": "layers"}, r"layers_pattern='layers'"),
        ({"fan_in_fan_out": True}, r"fan_in_fan_out=True"),
        ({"bias": "some"}, r"bias='some': PEFT's bias is one of"),
        ({"lora_bias": True}, r"lora_bias=True"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'.*base weights"),
        ({"loftq_config": {"loftq_bits": 4}}, r"loftq_config=.*LoftQ"),
        ({"megatron_config": {"tp": 2}}, r"megatron_config="),
        ({"target_parameters": ["mlp.experts"]}, r"target_parameters="),
        ({"new_feature_config": {"x": 1}}, r"new_feature_config=.*does not know"),
        ({"layers_pattern": "layers", "lora_bias": True}, r"\(2 problems\)"),
        ({"target_modules": ["q_proj"]}, r"'model.layers.0.self_attn.v_proj'.*does not select"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, r"selects '.*k_proj' but tensor"),
        ({"modules_to_save": ["score"]}, r"modules_to_save names 'score'"),
        ({"modules_to_save": None}, r"'base_model.model.lm_head.weight' is neither"),
        (
            {"rank_pattern": {"(q_proj": 2}},
            r"rank_pattern holds '\(q_proj', which is not a regular",
        ),
        ({"r": 8}, r"lora_A.weight' has shape \(4, 32\) but .* r=8 calls for \(8, 32\)"),
    ],
)
def test_load_peft_names_what_it_cannot_load(saved, fields, message):
    path, base = saved
    edit_config(path, **fields)
    with pytest.raises(ValueError, match=message):
        load_peft(path, base)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop(PREFIX + "model.layers.1.self_attn.v_proj.lora_B.weight"),
            r"'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' is missing",
        ),
        (
            lambda t: t.pop(PREFIX + "lm_head.weight"),
            r"'base_model.model.lm_head.weight' of a module to save is missing",
        ),
        (
            lambda t: t.update({PREFIX + "model.norm.weight": np.ones(32, np.float32)}),
            r"'base_model.model.model.norm.weight' is neither a LoRA A/B tensor",
        ),
        (
            lambda t: t.update(
                {PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 31))}
            ),
            r"q_proj.lora_A.weight' has shape \(4, 31\) but 'layers_0/self_attn/q_proj/kernel'",
        ),
    ],
)
def test_load_peft_names_bad_tensors(saved, edit, message):
    path, base = saved
    edit_tensors(path, edit)
    with pytest.raises(ValueError, match=message):
        load_peft(path, base)


def test_load_peft_reads_no_pickle_and_no_hub(saved):
    path, base = saved
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin' is a pickle, which lora_jax never"):
        load_peft(path, base)
    (path / "adapter_model.bin").unlink()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors' is missing .*local files"):
        load_peft(path, base)
    with pytest.raises(ValueError, match=r"adapter_config.json' is missing"):
        load_peft(path / "nowhere", base)


def test_load_peft_names_damaged_files_and_bad_bases(saved, made):
    path, base = saved
    with pytest.raises(ValueError, match=r"base_params already hold LoRA leaves"):
        load_peft(path, made["lm_head_extra"][3])
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors' is not a valid safetensors"):
        load_peft(path, base)
    (path / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"adapter_config.json' is corrupted or truncated"):
        load_peft(path, base)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_load_peft_refuses_an_untied_adapter_on_a_tied_embedding(bases, tmp_path):
    peft_made(fresh(bases, "tied"), tmp_path, r=2, lora_alpha=4, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match=r"tied embedding 'model.embed_tokens' without ensure"):
        load_peft(tmp_path, load_pretrained(bases["tied"])[1])


class Heads(nn.Module):
    """Multi-axis kernels: a split output, a joined input, and per-head (batch-axis) kernels."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 8), name="split")(x)  # kernel (16, 2, 8)
        h = nn.Einsum((2, 8, 8), "bhk,hkj->bhj", name="per_head")(h)  # batch axis h
        return nn.DenseGeneral(16, axis=(-2, -1), name="join")(h)  # kernel (2, 8, 16)


IDENTITY = NameMap(pairs=(("{rest}", "{rest}"),))


def test_multi_axis_kernels_flatten_and_batch_axes_have_no_peft_form(tmp_path):
    x = jnp.ones((2, 16))
    base = Heads().init(jax.random.key(0), x)
    cfg = lj.LoraConfig(rank=2, targets=("join", "split"), param_dtype=jnp.bfloat16)
    lora_model = lj.LoRA(Heads(), cfg)
    params = randomize_adapters(
        lj.init(lora_model, jax.random.key(1), x, base_params=base), jax.random.key(2)
    )
    save_peft(tmp_path / "ok", params, cfg, names=IDENTITY)
    tensors = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    assert tensors[PREFIX + "split.lora_B.weight"].shape == (16, 2)
    assert tensors[PREFIX + "join.lora_A.weight"].shape == (2, 16)
    assert tensors[PREFIX + "join.lora_A.weight"].dtype == jnp.bfloat16
    loaded, loaded_cfg = load_peft(tmp_path / "ok", base, names=IDENTITY)
    assert loaded_cfg == cfg
    jax.tree.map(same_arrays, loaded["params"], params["params"])
    assert records_by_path(loaded) == records_by_path(params)
    cfg = lj.LoraConfig(rank=2, targets=("per_head", "join"))
    params = lj.init(lj.LoRA(Heads(), cfg), jax.random.key(1), x, base_params=base)
    with pytest.raises(
        ValueError, match=r"'per_head/kernel' has no PEFT form: .*batch axes \(2,\)"
    ):
        save_peft(tmp_path / "bad", params, cfg, names=IDENTITY)


def test_save_peft_checks_its_inputs(made, tmp_path):
    _, _, cfg, params, _ = made["lm_head_extra"]
    with pytest.raises(TypeError, match=r"config must be a lora_jax\.LoraConfig"):
        save_peft(tmp_path, params, {"rank": 4})
    with pytest.raises(ValueError, match=r"whole tree from lora_jax\.init"):
        save_peft(tmp_path, params["params"], cfg)
    with pytest.raises(ValueError, match="the config gives 'layers_0/self_attn/q_proj' rank 8"):
        save_peft(tmp_path, params, lj.LoraConfig(rank=8, targets=("q_proj", "v_proj")))
    (tmp_path / "full" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds directories \['checkpoint-1'\]"):
        save_peft(tmp_path / "full", params, cfg)


def test_save_peft_replaces_the_adapter_atomically(made, tmp_path, monkeypatch):
    _, _, cfg, params, _ = made["lm_head_extra"]
    path = tmp_path / "adapter"
    save_peft(path, params, cfg)
    (path / "README.md").write_text("notes")
    (path / "adapter_model.bin").write_bytes(b"stale")
    first = (path / "adapter_model.safetensors").read_bytes()
    _, _, cfg2, params2, _ = made["rslora_patterns"]

    def crash(*args):
        raise OSError("crash before the swap")

    monkeypatch.setattr(peft_io, "_exchange", crash)
    with pytest.raises(OSError, match="crash"):
        save_peft(path, params2, cfg2)
    assert (path / "adapter_model.safetensors").read_bytes() == first  # the old adapter, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left over
    monkeypatch.undo()
    save_peft(path, params2, cfg2)
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (path / "README.md").read_text() == "notes"
    assert json.loads((path / "adapter_config.json").read_text())["use_rslora"] is True
    monkeypatch.setattr(peft_io, "_exchange", lambda a, b: False)  # no renameat2: two renames
    save_peft(path, params, cfg)
    assert (path / "adapter_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --------------------------------------------------------------------------- DoRA


def test_dora_files_go_both_ways_with_peft(bases, tmp_path):
    """lora_jax's DoRA computes what PEFT's `use_dora=True` computes (eval mode, so dropout
    plays no part): PEFT's file loads with PEFT's logits, and save_peft writes it back (the
    magnitude as PEFT's lora_magnitude_vector) for PEFT to load with the same logits."""
    torch.manual_seed(5)
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        use_dora=True,
    )
    peft_model = peft.get_peft_model(fresh(bases, "untied"), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # A, B and the magnitude, moved off their initial values
                p.copy_(
                    p * (1 + 0.2 * torch.randn_like(p))
                    if "magnitude" in name
                    else 0.3 * torch.randn_like(p)
                )
    peft_model.save_pretrained(tmp_path / "theirs")
    model, base = load_pretrained(bases["untied"])
    params, cfg = load_peft(tmp_path / "theirs", base)
    assert cfg.variant == "dora"
    expected = torch_logits(peft_model, IDS)
    logits = lj.LoRA(model, cfg).apply(params, IDS)
    assert rel_error(logits, expected) <= 1e-4
    assert rel_error(model.apply(base, IDS), expected) > 1e-2  # the adapters matter
    assert rel_error(model.apply(lj.merge(params), IDS), expected) <= 1e-4
    save_peft(tmp_path / "ours", params, cfg)
    loaded = peft.PeftModel.from_pretrained(fresh(bases, "untied"), tmp_path / "ours").eval()
    assert rel_error(torch_logits(loaded, IDS), expected) <= 1e-4


# --------------------------------------------------------------------------- PiSSA, OLoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_inits_match_peft_and_export_for_the_original_base(bases, tmp_path, init):
    """init="pissa" / "olora" give PEFT's residual base and ΔW (singular vectors' signs aside:
    compared as W_res and s·A@B); trained, `to_original_base` writes a rank-2r PEFT file that
    PEFT applies to the untouched pretrained model with the trained model's logits."""
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
        init_lora_weights=init,
    )  # fmt: skip
    peft_model = peft.get_peft_model(fresh(bases, "untied"), config).eval()
    model, base = load_pretrained(bases["untied"])
    cfg = lj.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"), init=init)
    lora_model = lj.LoRA(model, cfg)
    params = lj.init(lora_model, jax.random.key(1), IDS, base_params=base)
    for hf, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        here = params["params"]
        for key in LLAMA.from_hf(hf.removeprefix(PREFIX)).split("/"):
            here = here[key]
        w_res = module.base_layer.weight.detach().numpy().T
        b_a = (module.lora_B["default"].weight @ module.lora_A["default"].weight).detach().numpy()
        delta = here["kernel_lora_a"] @ here["kernel_lora_b"] * 2.0
        np.testing.assert_allclose(here["kernel"], w_res, atol=2e-5)
        np.testing.assert_allclose(delta, 2.0 * b_a.T, atol=2e-5)
    assert rel_error(lora_model.apply(params, IDS), torch_logits(peft_model, IDS)) <= 1e-4
    initial = jax.tree.map(jnp.copy, lj.partition(params)[0])
    trained = randomize_adapters(params, jax.random.key(4), 0.3)
    converted, converted_cfg = lj.to_original_base(trained, initial, cfg)
    assert converted_cfg.rank == 4
    save_peft(tmp_path, converted, converted_cfg)
    loaded = peft.PeftModel.from_pretrained(fresh(bases, "untied"), tmp_path).eval()
    assert rel_error(lora_model.apply(trained, IDS), torch_logits(loaded, IDS)) <= 1e-4


# --------------------------------------------------------------------------- bias


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_round_trip_with_peft(tmp_path, bias):
    """PEFT's bias="all" / "lora_only" (trained biases saved beside the adapters) loads as
    LoraConfig.bias with PEFT's logits, and save_peft writes it back for PEFT."""
    hf = random_hf_model(transformers.LlamaConfig(**SIZES, attention_bias=True))
    hf.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj"], bias=bias
    )
    peft_model = peft.get_peft_model(hf, config).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            trains = name.endswith(".bias") and (bias == "all" or "q_proj" in name)
            if "lora_" in name or trains:  # what PEFT trains, and so saves
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "theirs")
    model, base = load_pretrained(tmp_path / "base")
    params, cfg = load_peft(tmp_path / "theirs", base)
    assert cfg.bias == bias and cfg.trainable == ()
    trained = {p for p in lj.trainable_paths(params) if p.endswith("/bias")}
    assert len(trained) == (8 if bias == "all" else 2)  # q, k, v, o; or q alone (2 layers)
    expected = torch_logits(peft_model, IDS)
    assert rel_error(lj.LoRA(model, cfg).apply(params, IDS), expected) <= 1e-4
    save_peft(tmp_path / "ours", params, cfg)
    fresh_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(fresh_base, tmp_path / "ours").eval()
    assert rel_error(torch_logits(loaded, IDS), expected) <= 1e-4
