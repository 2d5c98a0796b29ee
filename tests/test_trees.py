"""Tests for `lora_jax._trees`: boxes, the bad-leaf error, the optimizer-state mirror rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from lora_jax import _paths, _trees


def test_box_helpers_never_lose_the_box():
    box = nn.Partitioned(jnp.ones((2, 3)), names=("x", None))
    assert _trees.unbox(box) is box.value and _trees.box_names(box) == ("x", None)
    assert _trees.rebox(box, box.value) is box  # unchanged value: the same object
    new = _trees.rebox(box, jnp.zeros((2, 3)))
    assert isinstance(new, nn.Partitioned) and new.names == ("x", None)
    tree = {"a": box, "b": jnp.ones(2)}
    assert _trees.rebox_tree(tree, _trees.unbox_tree(tree))["a"] is box


def test_raise_problems_lists_every_leaf_up_to_the_limit():
    _trees.raise_problems("Nothing wrong", [])
    with pytest.raises(ValueError, match=r"^Tree: Leaf 'a' is bad\.$"):
        _trees.raise_problems("Tree", ["Leaf 'a' is bad."])
    problems = [f"Leaf '{i}' is bad." for i in range(13)]
    with pytest.raises(
        ValueError, match=r"\(13 problems\):\n  Leaf '0' is bad\.(.|\n)*\.\.\. and 3 more\."
    ) as e:
        _trees.raise_problems("Tree", problems)
    assert "Leaf '10'" not in str(e.value)
    with pytest.raises(TypeError):
        _trees.raise_problems("Tree", ["x"], TypeError)
    with pytest.raises(TypeError, match="params must be a dict of variables, got int"):
        _trees.flat(3)


def test_mirrored_matches_optimizer_moments_to_their_parameters():
    params = {
        "params": {"q": {"kernel_lora_a": jnp.ones((4, 2)), "kernel_lora_b": jnp.ones((2, 4))}}
    }
    state = optax.adam(1e-3).init(params)
    flat = _trees.flat(params)
    found = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        found[_paths.keystr(keypath)] = _trees.mirrored(_paths.keystr(keypath), leaf.shape, flat)
    assert found["0/mu/params/q/kernel_lora_a"] == "params/q/kernel_lora_a"
    assert found["0/nu/params/q/kernel_lora_b"] == "params/q/kernel_lora_b"
    assert found["0/count"] is None
    assert _trees.mirrored("0/mu/params/q/kernel_lora_a", (3, 3), flat) is None  # factored shape
