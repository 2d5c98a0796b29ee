"""Tests for `lora_jax.io.adapter_files`: `save_adapter` and `load_adapter`.

Adapters round trip exactly; the files hold only the trainable leaves, the records and a
fingerprint of the base (logical shapes for 4-bit leaves); loading checks the base (another
base, the merged model), the config (targets, rank and alpha edited in the JSON, tensors it
does not make trainable) and the files (damage, with the file named); saving checks its
inputs and is atomic (a crash between the two files or a failing JSON write leaves one whole
adapter); a QLoRA adapter loads onto a dense and onto a 4-bit base.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from conftest import (
    X6,
    QueryValue,
    flip,
    leaves_by_path,
    query_value,
    randomize_adapters,
    trees_equal,
    truncate,
)
from flax import struct, traverse_util

import lora_jax as lj
from lora_jax.io import adapter_files, load_adapter, save_adapter
from lora_jax.io.adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_FILE
from lora_jax.models import Llama, LlamaConfig


def test_adapter_round_trip(llama_run, tmp_path):
    save_adapter(tmp_path / "ad", llama_run["params"], llama_run["cfg"])
    params, cfg = load_adapter(tmp_path / "ad", llama_run["base"])
    assert cfg == llama_run["cfg"]
    assert trees_equal(params, llama_run["params"])
    x = llama_run["batch"][:, :-1]
    np.testing.assert_array_equal(
        lj.LoRA(llama_run["model"], cfg).apply(params, x),
        llama_run["lora_model"].apply(llama_run["params"], x),
    )
    params2, _ = load_adapter(tmp_path / "ad", llama_run["base"]["params"])  # bare params work too
    assert trees_equal(params2, params)


def test_adapter_files_hold_only_trainable_leaves_and_a_fingerprint(llama_run, tmp_path):
    save_adapter(tmp_path, llama_run["params"], llama_run["cfg"])
    tensors = dict(safetensors.deserialize((tmp_path / ADAPTER_FILE).read_bytes()))
    flat = traverse_util.flatten_dict(llama_run["params"], sep="/")
    expected = {k for k in flat if k.endswith(("_lora_a", "_lora_b"))}
    assert set(tensors) == expected | {"params/lm_head/kernel"}  # the records go to the JSON
    assert "params/layers_0/self_attn/q_proj/kernel" not in tensors
    desc = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert desc["format"] == "lora_jax.adapter" and desc["lora_config"]["rank"] == 4
    assert {a["param"] for a in desc["adapters"]} == {
        f"layers_{i}/self_attn/{m}/kernel" for i in (0, 1) for m in ("q_proj", "v_proj")
    }
    assert {a["rank"] for a in desc["adapters"]} == {4} and desc["extras"] == ["lm_head/kernel"]
    assert desc["lora_config"]["targets"] == ["q_proj", "v_proj"]
    assert desc["tensors"]["bytes"] == (tmp_path / ADAPTER_FILE).stat().st_size
    leaves = desc["base_model"]["leaves"]
    frozen = {k for k in flat if k.startswith("params/") and k not in tensors}
    assert set(desc["base_model"]["probes"]) <= {a["param"] for a in desc["adapters"]}
    assert set(leaves) == frozen
    assert leaves["params/embed_tokens/embedding"] == {"shape": [256, 64], "dtype": "float32"}
    assert len(desc["base_model"]["sha256"]) == 64


@struct.dataclass
class FakeQuantized:
    """Stands in for lora_jax.quant.QuantizedTensor: a pytree node with a logical shape/dtype."""

    codes: jax.Array
    shape: tuple = struct.field(pytree_node=False)
    dtype: object = struct.field(pytree_node=False)


def test_adapter_fingerprint_uses_logical_shape_of_quantized_leaves(llama_run, tmp_path):
    flat = traverse_util.flatten_dict(llama_run["params"], sep="/")
    path = "params/layers_0/mlp/up_proj/kernel"
    flat[path] = FakeQuantized(jnp.zeros((32, 128), jnp.uint8), (64, 128), jnp.dtype("bfloat16"))
    save_adapter(tmp_path, traverse_util.unflatten_dict(flat, sep="/"), llama_run["cfg"])
    desc = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert desc["base_model"]["leaves"][path] == {"shape": [64, 128], "dtype": "bfloat16"}
    params, _ = load_adapter(tmp_path, llama_run["base"])  # the dense base fits: same shapes
    assert trees_equal(params, llama_run["params"])


def test_qlora_adapter_loads_onto_dense_and_quantized_bases(tmp_path):
    """The returned config describes the base it was loaded onto, so the pair works."""
    model = Llama(LlamaConfig.tiny(num_layers=1))
    tokens = jnp.zeros((1, 8), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), tokens)
    cfg = lj.LoraConfig(
        rank=2, targets=("q_proj",), quantize=lj.QuantConfig(compute_dtype=jnp.float32)
    )
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), tokens, base_params=base)
    save_adapter(tmp_path, params, cfg)
    dense, dense_cfg = load_adapter(tmp_path, base)
    assert dense_cfg.quantize is None
    lj.LoRA(model, dense_cfg).apply(dense, tokens)
    quantized_base = lj.merge(
        lj.init(lj.LoRA(model, cfg), jax.random.key(1), tokens, base_params=base), requantize=True
    )[0]
    loaded, loaded_cfg = load_adapter(tmp_path, quantized_base)
    assert loaded_cfg.quantize.targets == ("layers_0/self_attn/q_proj",)
    out = lj.LoRA(model, loaded_cfg).apply(loaded, tokens)
    np.testing.assert_allclose(out, lj.LoRA(model, cfg).apply(params, tokens), atol=1e-5)


# -------------------------------------------------------------- the base it loads onto


def test_load_adapter_onto_another_base_names_the_paths(llama_run, tmp_path):
    save_adapter(tmp_path, llama_run["params"], llama_run["cfg"])
    flat = traverse_util.flatten_dict(llama_run["base"], sep="/")
    flat["params/layers_1/self_attn/q_proj/kernel"] = jnp.zeros((64, 32))
    del flat["params/norm/scale"]
    other = traverse_util.unflatten_dict(flat, sep="/")
    with pytest.raises(ValueError, match="another base model") as e:
        load_adapter(tmp_path, other)
    assert "'params/layers_1/self_attn/q_proj/kernel' has shape (64, 32)" in str(e.value)
    assert "'params/norm/scale' is missing" in str(e.value)
    bigger = jax.eval_shape(
        Llama(LlamaConfig.tiny(hidden_size=128)).init, jax.random.key(0), llama_run["sample"]
    )
    with pytest.raises(ValueError, match=r"'params/embed_tokens/embedding' has shape \(256, 128\)"):
        load_adapter(tmp_path, bigger)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_load_adapter_refuses_the_merged_model_it_came_from(tmp_path, dtype):
    model = Llama(LlamaConfig.tiny(param_dtype=dtype, dtype=dtype))
    ids = jnp.zeros((1, 8), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), ids)
    cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    params = randomize_adapters(
        lj.init(lj.LoRA(model, cfg), jax.random.key(1), ids, base_params=base),
        jax.random.key(2),
        0.05,
    )
    lj.save_adapter(tmp_path, params, cfg)
    merged = lj.merge(params)
    with pytest.raises(
        ValueError, match=r"would apply its ΔW twice: base_params hold the merged model"
    ):
        lj.load_adapter(tmp_path, merged)
    loaded, _ = lj.load_adapter(tmp_path, base)  # the original base is fine
    assert leaves_by_path(loaded).keys() == leaves_by_path(params).keys()


# ------------------------------------------------------------ the config it loads with


def test_targets_edited_in_the_adapter_json_are_an_error(tmp_path):
    base, cfg, _, params = query_value()
    lj.save_adapter(tmp_path, params, cfg)
    path = tmp_path / "adapter_config.json"
    desc = json.loads(path.read_text())
    desc["lora_config"]["targets"] = ["query"]
    path.write_text(json.dumps(desc))
    with pytest.raises(
        ValueError,
        match=r"holds an adapter for 'value/kernel', which LoraConfig.targets=\('query',\)",
    ):
        lj.load_adapter(tmp_path, base)
    desc["lora_config"]["targets"] = ["query", "value"]
    desc["lora_config"]["rank"] = 4
    path.write_text(json.dumps(desc))
    with pytest.raises(
        ValueError, match=r"'query/kernel' has rank 2 in the file but LoraConfig gives 4"
    ):
        lj.load_adapter(tmp_path, base)


def test_alpha_edited_in_the_json_is_the_alpha_applied(tmp_path):
    base, cfg, _, params = query_value()
    params = randomize_adapters(params, jax.random.key(3))
    lj.save_adapter(tmp_path, params, cfg)
    path = tmp_path / "adapter_config.json"
    desc = json.loads(path.read_text())
    desc["lora_config"]["alpha"] = 4.0
    path.write_text(json.dumps(desc))
    loaded, loaded_cfg = lj.load_adapter(tmp_path, base)
    assert loaded_cfg.alpha == 4.0
    assert loaded["lora"]["query"]["kernel_lora"].scale == loaded_cfg.scale_for("query") == 2.0
    out = lj.LoRA(QueryValue(), loaded_cfg).apply(loaded, X6)
    expected = QueryValue().apply(lj.merge(loaded), X6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    p = params["params"]["query"]
    w = p["kernel"] + 2.0 * p["kernel_lora_a"] @ p["kernel_lora_b"]
    np.testing.assert_allclose(
        lj.merge(loaded)["params"]["query"]["kernel"], w, rtol=1e-6, atol=1e-6
    )


def _rewrite_tensors(directory, edit):
    """Edits the tensors of a saved adapter and fixes the config's hash (a consistent file)."""
    import safetensors.numpy

    path = directory / adapter_files.ADAPTER_FILE
    tensors = edit(dict(safetensors.numpy.load(path.read_bytes())))
    data = safetensors.numpy.save(tensors)
    path.write_bytes(data)
    desc_path = directory / adapter_files.ADAPTER_CONFIG_FILE
    desc = json.loads(desc_path.read_text())
    import hashlib

    desc["tensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    desc_path.write_text(json.dumps(desc))


def test_load_adapter_loads_only_what_the_config_makes_trainable(tmp_path):
    base, cfg, _, params = query_value()
    lj.save_adapter(tmp_path, params, cfg)
    _rewrite_tensors(tmp_path, lambda t: {**t, "params/query/kernel": np.zeros((6, 8), np.float32)})
    with pytest.raises(
        ValueError, match=r"holds tensor 'params/query/kernel', which is neither an adapter leaf"
    ):
        lj.load_adapter(tmp_path, base)


# ------------------------------------------------------------------- damage and faults


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (truncate, ADAPTER_FILE, "corrupted or truncated"),
        (flip, ADAPTER_FILE, "corrupted or truncated"),
        (os.remove, ADAPTER_FILE, "missing"),
        (truncate, ADAPTER_CONFIG_FILE, "not valid JSON"),
        (lambda p: p.write_text("[]"), ADAPTER_CONFIG_FILE, "not a lora_jax adapter"),
    ],
)
def test_damaged_adapter_files_raise_naming_the_file(llama_run, tmp_path, damage, file, message):
    save_adapter(tmp_path, llama_run["params"], llama_run["cfg"])
    damage(tmp_path / file)
    with pytest.raises(ValueError, match=message) as e:
        load_adapter(tmp_path, llama_run["base"])
    assert str(tmp_path / file) in str(e.value)


def test_save_adapter_checks_its_inputs(llama_run, tmp_path):
    with pytest.raises(ValueError, match="'lora' collection"):
        save_adapter(tmp_path, llama_run["params"]["params"], llama_run["cfg"])
    other = dataclasses.replace(llama_run["cfg"], rank=8)
    with pytest.raises(
        ValueError, match="'params/layers_0/self_attn/q_proj/kernel_lora_a' has rank 4"
    ):
        save_adapter(tmp_path, llama_run["params"], other)
    with pytest.raises(ValueError, match="'params/lm_head/kernel' is frozen"):
        save_adapter(
            tmp_path, llama_run["params"], dataclasses.replace(llama_run["cfg"], trainable=())
        )


def test_a_crash_between_the_two_files_leaves_one_whole_adapter(tmp_path, monkeypatch):
    base, cfg, lora_model, params = query_value()
    old = randomize_adapters(params, jax.random.key(4))
    new = randomize_adapters(params, jax.random.key(5))
    lj.save_adapter(tmp_path, old, cfg)
    real_replace = os.replace

    def crash_at(n):
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == n:
                raise OSError("killed")
            return real_replace(src, dst)

        return replace

    # The renames of a save: staged tensors, the JSON (the commit), the tensors' final name.
    for n, expected in ((2, old), (3, new), (4, new)):
        lj.save_adapter(tmp_path, old, cfg)
        monkeypatch.setattr(os, "replace", crash_at(n))
        try:
            lj.save_adapter(tmp_path, new, cfg)
        except OSError:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        loaded, _ = lj.load_adapter(tmp_path, base)
        np.testing.assert_array_equal(
            lora_model.apply(loaded, X6),
            lora_model.apply(expected, X6),
            err_msg=f"crash at rename {n}",
        )


def test_a_failing_json_write_keeps_the_old_adapter(tmp_path, monkeypatch):
    base, cfg, lora_model, params = query_value()
    old = randomize_adapters(params, jax.random.key(4))
    lj.save_adapter(tmp_path, old, cfg)
    real = adapter_files._write

    def fail_on_json(path, data):
        if path.name == adapter_files.ADAPTER_CONFIG_FILE:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(adapter_files, "_write", fail_on_json)
    with pytest.raises(OSError, match="disk full"):
        lj.save_adapter(tmp_path, randomize_adapters(params, jax.random.key(6)), cfg)
    monkeypatch.setattr(adapter_files, "_write", real)
    loaded, _ = lj.load_adapter(tmp_path, base)
    np.testing.assert_array_equal(lora_model.apply(loaded, X6), lora_model.apply(old, X6))
