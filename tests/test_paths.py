"""Tests for `lora_jax._paths`: the one spelling of adapter leaves, records and paths."""

import jax
import pytest

from lora_jax import _paths


def test_leaf_and_record_names_round_trip():
    assert _paths.adapter_leaf("kernel", "a") == "kernel_lora_a"
    assert _paths.adapter_leaf("embedding", "b", "fr") == "embedding_lora_b@fr"
    assert _paths.record_leaf("kernel") == "kernel_lora"
    assert _paths.parse("kernel_lora_a") == ("kernel", "a", "default")
    assert _paths.parse("w_in_lora_b@task-2") == ("w_in", "b", "task-2")
    assert _paths.parse("kernel_lora") == ("kernel", "", "default")
    for name in ("kernel", "kernel_lora_scale", "lora_a", "scale_trainable"):
        assert _paths.parse(name) is None, name
    with pytest.raises(ValueError, match="adapter name must be a non-empty string"):
        _paths.adapter_leaf("kernel", "a", "bad name")


def test_paths_between_parameters_leaves_and_records():
    param = "params/layers_0/q_proj/kernel"
    assert _paths.leaf_path(param, "a") == "params/layers_0/q_proj/kernel_lora_a"
    assert _paths.record_path(param) == "lora/layers_0/q_proj/kernel_lora"
    assert _paths.record_path("params/kernel") == "lora/kernel_lora"  # the model is the layer
    assert _paths.record_target("lora/layers_0/q_proj/kernel_lora@x") == (param, "x")
    assert _paths.adapted_param("params/layers_0/q_proj/kernel_lora_b") == (param, "b", "default")
    assert _paths.is_adapter_leaf("params/layers_0/q_proj/kernel_lora_a")
    assert not _paths.is_adapter_leaf("lora/layers_0/q_proj/kernel_lora")
    assert not _paths.is_adapter_leaf("params/layers_0/q_proj/kernel")
    assert _paths.extra_param("lora/lm_head/kernel_trainable") == "params/lm_head/kernel"
    assert _paths.quantized_param("lora/l/kernel_4bit") == "params/l/kernel"
    with pytest.raises(ValueError, match="not the path of an adapter record"):
        _paths.record_target("params/q/kernel_lora")


def test_the_params_prefix_rule():
    assert _paths.to_variables("a/kernel") == "params/a/kernel"
    assert _paths.to_param("params/a/kernel") == "a/kernel"
    with pytest.raises(ValueError, match="not in the 'params' collection"):
        _paths.to_param("lora/a/kernel_lora")
    bare = {"dense": {"kernel": 1}}
    assert _paths.as_variables(bare) == {"params": bare}
    variables = {"params": bare, "batch_stats": {}}
    assert _paths.as_variables(variables) == variables
    # A module that happens to be called "params" inside a bare tree is not a collection.
    assert not _paths.is_variables({"params": 1})
    with pytest.raises(TypeError, match="base_params must be a dict of parameters, got list"):
        _paths.as_variables([], "base_params")


def test_keystr_spells_dict_keys_attributes_and_indices():
    tree = {"a": [1, {"b": 2}]}
    paths = [_paths.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0", "a/1/b"]
