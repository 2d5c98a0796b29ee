"""Tests for several named adapters on one base (`lora_jax.ops.named`, `ops.weighted`,
`unmerge`, and the LoRA module's `active` / `adapter_ids`).

Named adapters are made together or added later, chosen at apply time, trained one at a
time (the others bit-identical), deleted, renamed, saved and loaded by name, merged one or
several; combined exactly ("cat"), truncated ("svd", its residual checked against the
singular values) or inexactly ("linear"); unmerged back to the base. Per-example adapters
(`adapter_ids`) equal running each example alone, for every layer kind, under jit and in
`generate`.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, few_examples, leaves_by_path, randomize_adapters, same_arrays
from flax import traverse_util
from hypothesis import given
from hypothesis import strategies as st
from test_rules import KINDS, Holder, _case

import lora_jax as lj
import lora_jax.hf
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss, generate

CA = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
CB = lj.LoraConfig(rank=2, alpha=3.0, targets=("q_proj", "o_proj"))


@pytest.fixture(scope="module")
def two():
    """A one-layer tiny Llama with adapters "a" (q, v; rank 4) and "b" (q, o; rank 2),
    both with random (non-zero) factors."""
    model = Llama(LlamaConfig.tiny(num_layers=1))
    x = jax.random.randint(jax.random.key(0), (3, 8), 0, 256)
    base = jax.jit(model.init)(jax.random.key(1), x)
    lora_model = lj.LoRA(model, {"a": CA, "b": CB})
    params = lj.init(lora_model, jax.random.key(2), x, base_params=base)
    return model, lora_model, base, randomize_adapters(params, jax.random.key(3), 0.2), x


def test_named_adapters_are_made_side_by_side_and_chosen_at_apply(two):
    model, lora_model, _, params, x = two
    assert lj.adapter_names(params) == ("a", "b")
    q = params["params"]["layers_0"]["self_attn"]["q_proj"]
    assert q["kernel_lora_a@a"].shape == (64, 4) and q["kernel_lora_a@b"].shape == (64, 2)
    only_a = lj.LoRA(model, {"a": CA}).apply(lj.keep_adapters(params, "a"), x)
    same_arrays(lora_model.clone(active="a").apply(params, x), only_a)
    # Both active: the outputs add up, as the merge of both does.
    assert_close(lora_model.apply(params, x), model.apply(lj.merge(params), x), jnp.float32)
    assert_close(
        lora_model.clone(active="b").apply(params, x),
        model.apply(lj.merge(params, adapters=("b",)), x),
        jnp.float32,
    )


def test_per_example_adapters_equal_each_example_alone(two):
    model, lora_model, base, params, x = two
    ids = jnp.array([1, -1, 0])
    got = jax.jit(lambda p, x, i: lora_model.apply(p, x, adapter_ids=i))(params, x, ids)
    alone = {
        0: lora_model.clone(active="a").apply(params, x),
        1: lora_model.clone(active="b").apply(params, x),
        -1: model.apply(base, x),
    }
    for row, i in enumerate(ids.tolist()):
        assert_close(got[row], alone[i][row], jnp.float32)
    # Under jit an id out of range makes its example NaN (never silently another adapter's).
    bad = jax.jit(lambda p, x, i: lora_model.apply(p, x, adapter_ids=i))(
        params, x, jnp.array([0, 2, -2])
    )
    bad = np.asarray(bad)
    assert np.isnan(bad[1:]).all() and np.isfinite(bad[0]).all()


@pytest.mark.parametrize(
    "ids, message",
    [
        (jnp.array([0, 7, 0]), r"adapter_ids \[7\] are out of range: each id indexes LoRA.active"),
        (jnp.array([0, 1]), r"adapter_ids has shape \(2,\) but '.*' gets an input of shape"),
        (jnp.array([[0, 1, 0]]), r"adapter_ids must be integers of shape \(batch,\)"),
        (jnp.array([0.0, 1.0, 0.0]), r"adapter_ids must be integers"),
    ],
)
def test_bad_adapter_ids_are_named(two, ids, message):
    _, lora_model, _, params, x = two
    with pytest.raises(ValueError, match=message):
        lora_model.apply(params, x, adapter_ids=ids)


@pytest.mark.parametrize("kind", KINDS)
def test_per_example_adapters_on_every_layer_kind(kind):
    layer, x, _, _ = _case(kind, (2, 5, 4, 3, 2), jnp.float32)
    x = jnp.concatenate([x, x[:1]])  # three examples
    model = Holder(layer)
    base = model.init(jax.random.key(1), x)
    cfgs = {
        "p": lj.LoraConfig(rank=2, targets=("layer",)),
        "q": lj.LoraConfig(rank=3, alpha=2.0, targets=("layer",)),
    }
    lora_model = lj.LoRA(model, cfgs)
    params = randomize_adapters(
        lj.init(lora_model, jax.random.key(2), x, base_params=base), jax.random.key(4)
    )
    got = lora_model.apply(params, x, adapter_ids=jnp.array([1, 0, -1]))
    want = [lora_model.clone(active=n).apply(params, x) for n in ("q", "p")] + [
        model.apply(base, x)
    ]
    for row in range(3):
        pick = lambda t, row=row: t[row]
        assert_close(jax.tree.map(pick, got), jax.tree.map(pick, want[row]), jnp.float32)


def test_generate_serves_a_batch_of_tenants(two):
    model, lora_model, base, params, _ = two
    prompts = [[1, 2, 3], [4, 5, 6, 7], [9]]
    out = generate(lora_model, params, prompts, max_new_tokens=4, adapter_ids=[0, 1, -1])
    alone = [(lora_model.clone(active="a"), params), (lora_model.clone(active="b"), params)]
    alone.append((model, base))
    for prompt, (m, variables), tokens in zip(prompts, alone, out.tokens, strict=True):
        assert generate(m, variables, [prompt], max_new_tokens=4).tokens[0] == tokens


def test_train_one_adapter_while_the_others_stay_frozen(two):
    _, lora_model, _, params, x = two
    trained = lora_model.clone(active="b")
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])
    tx = lj.optimizer(optax.adamw(1e-2), params)
    step = lj.make_train_step(trained, loss, tx, donate=False)  # the fixture is shared
    new, _, _ = step(params, step.init(params), x)
    before, after = leaves_by_path(params), leaves_by_path(new)
    for path, value in before.items():
        if path.endswith("@b") and "_lora_" in path:
            assert not np.array_equal(value, after[path]), path
        else:
            same_arrays(after[path], value)
    assert lj.labels(params, adapters="a")["params"]["layers_0"]["self_attn"]["o_proj"] == {
        "kernel": "frozen",
        "kernel_lora_a@b": "frozen",
        "kernel_lora_b@b": "frozen",
    }


def test_add_delete_rename_and_their_errors(two):
    model, _, base, params, x = two
    cc = lj.LoraConfig(rank=3, targets=("k_proj",))
    grown = lj.add_adapter(params, lj.LoRA(model, {"c": cc}), jax.random.key(9), x)
    assert lj.adapter_names(grown) == ("a", "b", "c")
    for path, value in leaves_by_path(params).items():
        same_arrays(leaves_by_path(grown)[path], value)
    # The new adapter starts at zero: with it active alone the model is the base.
    same_arrays(lj.LoRA(model, {"c": cc}).apply(grown, x), model.apply(base, x))
    with pytest.raises(ValueError, match=r"already holds adapters named \['a'\]"):
        lj.add_adapter(params, lj.LoRA(model, {"a": cc}), jax.random.key(9), x)
    assert lj.adapter_names(lj.delete_adapter(grown, "b")) == ("a", "c")
    assert lj.adapter_names(lj.rename_adapter(grown, "c", "keys")) == ("a", "b", "keys")
    with pytest.raises(ValueError, match=r"no adapter named \['z'\]; the tree holds \['a', 'b'\]"):
        lj.delete_adapter(params, "z")
    with pytest.raises(ValueError, match=r"already holds an adapter named 'a'"):
        lj.rename_adapter(params, "b", "a")
    with pytest.raises(ValueError, match=r"LoRA.active=\('z',\) must name distinct configured"):
        lj.LoRA(model, {"a": CA}, active=("z",))
    with pytest.raises(ValueError, match=r"no adapter named \['z'\]"):
        lj.merge(params, adapters=("z",))
    with pytest.raises(
        ValueError,
        match=r"tree holds no adapter record for it .*'lora/layers_0/self_attn/q_proj/kernel_lora@c'; it holds adapters \['a', 'b'\]",
    ):
        lj.LoRA(model, {"c": CA}).apply(params, x)
    with pytest.raises(ValueError, match=r"must agree"):
        lj.LoRA(model, {"a": CA, "q": lj.LoraConfig(quantize=lj.QuantConfig())})
    dora = lj.LoraConfig(rank=2, targets=("q_proj",), variant="dora")
    mixed = lj.LoRA(model, {"a": CA, "d": dora})
    p = lj.init(mixed, jax.random.key(5), x, base_params=base)
    with pytest.raises(ValueError, match=r"adapters 'd' \(dora\) are not plain LoRA"):
        mixed.apply(p, x)


def test_save_and_load_by_name(two, tmp_path):
    model, lora_model, _, params, x = two
    with pytest.raises(ValueError, match=r"holds several adapters \['a', 'b'\]: pass name="):
        lj.save_adapter(tmp_path / "x", params, CA)
    lj.save_adapter(tmp_path / "b", params, CB, name="b")
    lora_jax.hf.save_peft(tmp_path / "b_peft", params, CB, name="b")
    only_a = lj.keep_adapters(params, "a")
    for loaded, cfg in (
        lj.load_adapter(tmp_path / "b", only_a, name="b"),
        lora_jax.hf.load_peft(tmp_path / "b_peft", only_a, name="b"),
    ):
        assert lj.adapter_names(loaded) == ("a", "b")
        same_arrays(
            lj.LoRA(model, {"a": CA, "b": cfg}).apply(loaded, x), lora_model.apply(params, x)
        )


WEIGHTS = st.tuples(st.floats(-2, 2, width=32), st.floats(-2, 2, width=32))


@few_examples()
@given(weights=WEIGHTS)
def test_cat_combination_is_exact(two, weights):
    model, _, base, params, x = two
    w = dict(zip(("a", "b"), weights, strict=True))
    made = lj.add_weighted_adapter(params, w, "mix", method="cat")
    assert all(r < 1e-5 for r in made.residuals.values())
    merged = leaves_by_path(lj.merge(made.params, adapters=("mix",)))
    base_leaves = leaves_by_path(base)
    deltas = {n: leaves_by_path(lj.merge(params, adapters=(n,))) for n in w}
    for path, value in merged.items():
        want = base_leaves[path] + sum(w[n] * (deltas[n][path] - base_leaves[path]) for n in w)
        chex.assert_trees_all_close(value, want, atol=1e-5, rtol=1e-5)
    # The returned config runs it.
    y = lj.LoRA(model, {"mix": made.config}).apply(made.params, x)
    assert_close(y, model.apply(lj.merge(made.params, adapters=("mix",)), x), jnp.float32)


def test_svd_and_linear_combinations(two):
    _, _, _, params, _ = two
    full = lj.add_weighted_adapter(params, {"a": 1.0, "b": 0.5}, "s", method="svd", rank=6)
    assert max(full.residuals.values()) < 1e-5  # rank 6 holds the whole rank-6 sum
    one = lj.add_weighted_adapter(params, {"a": 1.0, "b": 0.5}, "s", method="svd", rank=1)
    q = "layers_0/self_attn/q_proj/kernel"
    cat = lj.add_weighted_adapter(params, {"a": 1.0, "b": 0.5}, "c", method="cat")
    delta = lj.merge(cat.params, adapters=("c",))["params"]["layers_0"]["self_attn"]["q_proj"][
        "kernel"
    ]
    delta = delta - two[2]["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    s = np.linalg.svd(np.asarray(delta, np.float64), compute_uv=False)
    np.testing.assert_allclose(
        one.residuals[q], np.sqrt((s[1:] ** 2).sum() / (s**2).sum()), rtol=1e-3
    )
    assert one.config.rank == 1
    with pytest.raises(ValueError, match=r"method='linear' needs adapters of the same targets"):
        lj.add_weighted_adapter(params, {"a": 1.0, "b": 1.0}, "l", method="linear")
    twin = lj.rename_adapter(lj.keep_adapters(params, "a"), "a", "a2")
    twin_leaves = lj.partition(twin)[0]  # a2's leaves
    both = lj.combine(lj.keep_adapters(params, "a"), twin_leaves, {"lora": _records(twin, "a2")})
    # One adapter: exact. Two equal ones: (√w₁ + √w₂)² = 4 where the sum is 2: residual 1.
    lin = lj.add_weighted_adapter(both, {"a": 0.7}, "l", method="linear")
    assert max(lin.residuals.values()) < 1e-5
    lin = lj.add_weighted_adapter(both, {"a": 1.0, "a2": 1.0}, "l", method="linear")
    np.testing.assert_allclose(list(lin.residuals.values()), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"method must be one of"):
        lj.add_weighted_adapter(params, {"a": 1.0}, "x", method="ties")


def test_unmerge_gives_the_base_back(two):
    model, _, base, params, x = two
    back = lj.unmerge(lj.merge(params), params)
    for path, value in leaves_by_path(params).items():
        chex.assert_trees_all_close(leaves_by_path(back)[path], value, atol=1e-6, rtol=1e-6)
    # The adapters' tree need not hold the base: its trainable half and records suffice.
    adapters_only = lj.combine(lj.partition(params)[0], {"lora": params["lora"]})
    again = lj.unmerge(lj.merge(params), adapters_only)
    chex.assert_trees_all_close(leaves_by_path(again), leaves_by_path(back), atol=0, rtol=0)
    # bfloat16 base: within one bf16 ulp (2**-7 relative) of |W| + |ΔW| per weight.
    bf = {"params": jax.tree_util.tree_map_with_path(_bf16_base, params["params"])}
    bf["lora"] = params["lora"]
    merged, back = leaves_by_path(lj.merge(bf)), None
    back = leaves_by_path(lj.unmerge(lj.merge(bf), bf))
    for path, value in leaves_by_path(bf).items():
        if "_lora_" not in path and path in merged:
            w, m = np.asarray(value, np.float32), np.asarray(merged[path], np.float32)
            bound = 2.0**-7 * (np.abs(w) + np.abs(m - w)) * 1.01
            assert (np.abs(np.asarray(back[path], np.float32) - w) <= bound).all(), path
    dora = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("q_proj",), variant="dora"))
    p = lj.init(dora, jax.random.key(5), x, base_params=base)
    with pytest.raises(ValueError, match=r"Cannot unmerge.*'dora': its merge is not invertible"):
        lj.unmerge(lj.merge(p), p)


def _records(tree, name):
    flat = traverse_util.flatten_dict(tree["lora"], sep="/")
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k.endswith("@" + name)}, sep="/"
    )


def _bf16_base(path, v):
    name = jax.tree_util.keystr(path)
    return v if "_lora_" in name else v.astype(jnp.bfloat16)


def _at(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def test_a_precomputed_bank_equals_stacking_per_call(two):
    _, lora_model, _, params, x = two
    ids = jnp.array([1, 0, -1])
    stacked = lj.adapter_bank(params, lora_model.active_names)
    got = lora_model.apply({**params, **stacked}, x, adapter_ids=ids)
    same_arrays(got, lora_model.apply(params, x, adapter_ids=ids))
    out = generate(
        lora_model,
        {**params, **stacked},
        [[1, 2], [3], [4]],
        max_new_tokens=3,
        adapter_ids=[1, 0, -1],
    )
    assert out == generate(
        lora_model, params, [[1, 2], [3], [4]], max_new_tokens=3, adapter_ids=[1, 0, -1]
    )
    with pytest.raises(
        ValueError, match=r"stacks adapters \('b', 'a'\) at .* but adapter_ids index"
    ):
        lora_model.apply({**params, **lj.adapter_bank(params, ("b", "a"))}, x, adapter_ids=ids)


def test_review_fixes_for_named_adapters(two, tmp_path):
    """init with an `active` subset still makes every adapter; add_adapter refuses an init
    that changes the shared base; unmerge takes the names that merge folded; generate checks
    ids on the host; save by name drops another adapter's trained biases."""
    model, lora_model, base, params, x = two
    made = lj.init(lora_model.clone(active="a"), jax.random.key(2), x, base_params=base)
    assert lj.adapter_names(made) == ("a", "b")
    pissa = lj.LoraConfig(rank=2, targets=("k_proj",), init="pissa")
    with pytest.raises(ValueError, match=r"adapters \['p'\] start from the base weight"):
        lj.add_adapter(params, lj.LoRA(model, {"p": pissa}), jax.random.key(9), x)
    back = lj.unmerge(lj.merge(params, adapters=("a",)), params, names=("a",))
    for path, value in leaves_by_path(lj.keep_adapters(params, "a")).items():
        chex.assert_trees_all_close(leaves_by_path(back)[path], value, atol=1e-6, rtol=1e-6)
    for ids, message in (
        ([0, 7, 0], r"adapter_ids \[7\] are out of range"),
        ([0.5, 1, 0], "integers"),
    ):
        with pytest.raises(ValueError, match=message):
            generate(lora_model, params, [[1], [2], [3]], max_new_tokens=2, adapter_ids=ids)
    biased = Llama(LlamaConfig.tiny(num_layers=1, qkv_bias=True))
    cfgs = {"fr": lj.LoraConfig(rank=2), "code": lj.LoraConfig(rank=2, bias="lora_only")}
    b_base = jax.jit(biased.init)(jax.random.key(1), x)
    p = lj.init(lj.LoRA(biased, cfgs), jax.random.key(2), x, base_params=b_base)
    lj.save_adapter(tmp_path / "fr", p, cfgs["fr"], name="fr")
    loaded, _ = lj.load_adapter(tmp_path / "fr", b_base)
    assert not any(k.endswith("/bias") for k in lj.trainable_paths(loaded))
