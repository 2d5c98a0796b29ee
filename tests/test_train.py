"""Tests for `lora_jax.make_train_step`.

The jitted step lowers the loss, trains every adapter (and `LoraConfig.trainable` extras)
while frozen leaves stay bit-identical and are returned as the very same arrays, never
deletes the caller's pretrained arrays when it donates buffers, traces once, applies LoRA
dropout only when given an rng, returns aux, rejects a whole-tree optimizer state and
non-LoRA modules, and gives the same result with a plain optax optimizer as with
`lora_jax.optimizer`. A non-finite loss skips its update (and is counted); an optimizer
state of another rank and a loss that returns aux without `has_aux` are explained; a QLoRA
model (4-bit base, dropout) trains with its frozen half unchanged.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import QC, X6, leaves_by_path, query_value, randomize_adapters

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

X = jax.random.normal(jax.random.key(0), (8, 6))
Y = jax.random.normal(jax.random.key(1), (8, 4))
BATCH = (X, Y)


class Net(nn.Module):
    """Two Dense layers around a LayerNorm."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="query")(x))
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(4, name="value")(h)


class Counters(Net):
    """Net plus integer and boolean leaves in the "params" collection."""

    @nn.compact
    def __call__(self, x):
        count = self.variable("params", "step_count", lambda: jnp.int32(3))
        flag = self.param("flag", lambda key: jnp.array([True, False]))
        return super().__call__(x) + 0.01 * (count.value + flag.sum()).astype(x.dtype)


def mse(apply, batch):
    x, y = batch
    return jnp.mean((apply(x) - y) ** 2)


BASE = Net().init(jax.random.key(2), X)


def _setup(model=None, base=None, seed=3, **cfg):
    model = Net() if model is None else model
    base = BASE if base is None else base
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=2, targets=("query", "value"), **cfg))
    return lora_model, lj.init(lora_model, jax.random.key(seed), X, base_params=base)


def _snapshot(tree):
    """Host copies of every leaf, by path (real copies: donated buffers get reused)."""
    return {k: np.array(v, copy=True) for k, v in leaves_by_path(tree).items()}


def _train(step, params, opt_state, n, batch=BATCH, **kw):
    losses = []
    for _ in range(n):
        params, opt_state, loss = step(params, opt_state, batch, **kw)
        losses.append(float(loss))
    return params, opt_state, losses


def test_steps_lower_the_loss():
    lora_model, params = _setup()
    step = lj.make_train_step(lora_model, mse, lj.optimizer(optax.adam(1e-2), params))
    _, _, losses = _train(step, params, step.init(params), 15)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(np.isfinite(losses))


def test_frozen_leaves_stay_bit_identical_and_every_adapter_changes():
    lora_model, params = _setup()
    before, before_objects = _snapshot(params), leaves_by_path(params)
    step = lj.make_train_step(lora_model, mse, lj.optimizer(optax.adam(1e-2), params))
    params, _, _ = _train(step, params, step.init(params), 5)
    trainable = lj.trainable_paths(params)
    assert len(trainable) == 4
    base_flat = leaves_by_path(BASE)
    after = leaves_by_path(params)
    assert set(after) == set(before)
    for path, value in after.items():
        if path in trainable:
            assert not np.array_equal(value, before[path]), path
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=path)
            assert value is before_objects[path], path  # the very same arrays, not copies
            if path in base_flat:
                assert value is base_flat[path], path


def test_donation_never_deletes_pretrained_arrays_and_extras_train():
    base = Net().init(jax.random.key(4), X)  # not shared: this test checks deletion
    base_copy = _snapshot(base)
    lora_model, params = _setup(base=base, trainable=("norm/scale",))
    scale_path = "params/norm/scale"
    assert scale_path in lj.trainable_paths(params)
    # init copies the extra, so that donating it cannot delete the caller's array
    assert params["params"]["norm"]["scale"] is not base["params"]["norm"]["scale"]
    np.testing.assert_array_equal(
        params["params"]["norm"]["scale"], base["params"]["norm"]["scale"]
    )
    step = lj.make_train_step(lora_model, mse, lj.optimizer(optax.adam(1e-2), params))
    first_adapter = params["params"]["query"]["kernel_lora_a"]
    first_extra = params["params"]["norm"]["scale"]
    params, _, _ = _train(step, params, step.init(params), 3)
    # Donation is really on: the trainable arrays handed to the first step are gone ...
    assert first_adapter.is_deleted() and first_extra.is_deleted()
    # ... while every pretrained array is alive and unchanged.
    for path, value in leaves_by_path(base).items():
        assert not value.is_deleted(), path
        np.testing.assert_array_equal(np.asarray(value), base_copy[path], err_msg=path)
    # The extra was trained.
    assert not np.array_equal(params["params"]["norm"]["scale"], base_copy[scale_path])


def test_jitted_step_traces_once():
    lora_model, params = _setup(dropout=0.1)
    chex.clear_trace_counter()
    counted = chex.assert_max_traces(mse, n=1)
    step = lj.make_train_step(lora_model, counted, lj.optimizer(optax.adam(1e-2), params))
    params, opt_state, _ = _train(step, params, step.init(params), 4)
    # A new shape must retrace: the counter catches it (so it was counting).
    with pytest.raises(AssertionError, match=r"retrac|trace"):
        step(params, opt_state, (X[:4], Y[:4]))
    # With a dropout rng (new keys every step) it also traces once.
    chex.clear_trace_counter()
    lora_model, params = _setup(dropout=0.1)
    counted = chex.assert_max_traces(mse, n=1)
    step = lj.make_train_step(lora_model, counted, optax.adam(1e-2))
    opt_state = step.init(params)
    for i in range(4):
        params, opt_state, _ = step(params, opt_state, BATCH, rng=jax.random.key(i))
    chex.clear_trace_counter()


def test_dropout_rng_changes_the_loss():
    lora_model, params = _setup(dropout=0.5)
    step = lj.make_train_step(lora_model, mse, optax.sgd(0.1), donate=False)
    opt_state = step.init(params)
    loss = lambda p, **kw: float(step(p, opt_state, BATCH, **kw)[2])
    # With B == 0 at init the adapter adds nothing, dropped or not.
    assert loss(params, rng=jax.random.key(5)) == loss(params)
    params = randomize_adapters(params, jax.random.key(6))
    plain = loss(params)
    assert loss(params) == plain
    dropped = loss(params, rng=jax.random.key(5))
    assert dropped != plain
    assert loss(params, rng=jax.random.key(5)) == dropped  # deterministic per key
    assert loss(params, rng={"dropout": jax.random.key(5)}) == dropped  # dict of rngs
    assert loss(params, rng=jax.random.key(7)) != dropped


def test_has_aux_returns_aux():
    lora_model, params = _setup()
    params = randomize_adapters(params, jax.random.key(8))

    def loss_fn(apply, batch):
        out = apply(batch[0])
        return jnp.mean((out - batch[1]) ** 2), {"out": out, "n": batch[0].shape[0]}

    expected_out = lora_model.apply(params, X)
    step = lj.make_train_step(lora_model, loss_fn, optax.sgd(0.1), has_aux=True)
    result = step(params, step.init(params), BATCH)
    assert len(result) == 4
    new_params, _, loss, aux = result
    assert aux["n"] == 8
    chex.assert_trees_all_close(aux["out"], expected_out, atol=1e-6)  # pre-update params
    np.testing.assert_allclose(loss, jnp.mean((expected_out - Y) ** 2), rtol=1e-6)
    chex.assert_trees_all_equal_structs(new_params, params)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "lj.optimizer"])
def test_whole_tree_opt_state_raises(wrapped):
    lora_model, params = _setup()
    tx = lj.optimizer(optax.adam(1e-2), params) if wrapped else optax.adam(1e-2)
    step = lj.make_train_step(lora_model, mse, tx)
    with pytest.raises(ValueError, match=r"step\.init"):
        step(params, tx.init(params), BATCH)
    # Nothing was donated by the failed call: the params still train.
    step(params, step.init(params), BATCH)


def test_model_without_apply_or_bad_loss_raises_type_error():
    with pytest.raises(TypeError, match=r"a model with an \.apply method .* got int"):
        lj.make_train_step(3, mse, optax.sgd(0.1))
    lora_model, _ = _setup()
    with pytest.raises(TypeError, match="loss_fn"):
        lj.make_train_step(lora_model, "mse", optax.sgd(0.1))


def test_plain_optax_matches_lora_optimizer():
    runs = []
    for wrap in (False, True):
        lora_model, params = _setup(seed=9)  # same seed: identical starting adapters
        tx = optax.adamw(1e-2)
        step = lj.make_train_step(lora_model, mse, lj.optimizer(tx, params) if wrap else tx)
        params, _, losses = _train(step, params, step.init(params), 4)
        runs.append((params, losses))
    (plain, plain_losses), (wrapped, wrapped_losses) = runs
    assert plain_losses == wrapped_losses
    chex.assert_trees_all_equal(plain, wrapped)


def test_non_float_leaves_pass_through_the_step():
    model = Counters()
    base = model.init(jax.random.key(10), X)
    lora_model, params = _setup(model=model, base=base)
    step = lj.make_train_step(lora_model, mse, lj.optimizer(optax.adam(1e-2), params))
    params, _, losses = _train(step, params, step.init(params), 3)
    assert losses[-1] < losses[0]
    for name in ("step_count", "flag"):
        assert params["params"][name] is base["params"][name]
        assert params["params"][name].dtype == base["params"][name].dtype


def test_llama_lora_lowers_causal_lm_loss():
    model = Llama(LlamaConfig.tiny())
    ids = jax.random.randint(jax.random.key(11), (2, 17), 0, 256)
    base = jax.jit(model.init)(jax.random.key(12), ids[:, :-1])
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    params = lj.init(lora_model, jax.random.key(13), ids[:, :-1], base_params=base)
    step = lj.make_train_step(
        lora_model,
        lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:]),
        lj.optimizer(optax.adamw(1e-2), params),
    )
    params, _, losses = _train(step, params, step.init(params), 20, batch=ids)
    assert losses[-1] < losses[0] - 0.1, losses
    flat = leaves_by_path(params)
    for path, value in leaves_by_path(base).items():
        assert flat[path] is value, path


def test_boxed_params_keep_their_boxes_and_lower_works():
    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(4, name="query", kernel_init=init)(x)

    base = Boxed().init(jax.random.key(14), X)
    lora_model = lj.LoRA(Boxed(), lj.LoraConfig(rank=2, targets=("query",)))
    params = lj.init(lora_model, jax.random.key(15), X, base_params=base)
    step = lj.make_train_step(lora_model, mse, optax.adam(1e-2))
    opt_state = step.init(params)
    assert not any(
        isinstance(v, nn.LogicallyPartitioned)
        for v in jax.tree.leaves(opt_state, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    )
    memory = step.lower(params, opt_state, BATCH).compile().memory_analysis()
    assert memory.argument_size_in_bytes > 0
    new, _, _ = step(params, opt_state, BATCH)
    query = new["params"]["query"]
    assert query["kernel"] is params["params"]["query"]["kernel"]  # the very same box
    assert query["kernel_lora_a"].names == ("embed", None)
    assert query["kernel_lora_b"].names == (None, "mlp")
    assert not np.array_equal(query["kernel_lora_a"].value, 0.0)


def test_a_nan_loss_skips_the_update_and_is_counted():
    _, _, lora_model, params = query_value()
    loss_fn = lambda apply, b: jnp.mean((apply(b["x"]) - b["y"]) ** 2)
    step = lj.make_train_step(
        lora_model, loss_fn, lj.optimizer(optax.adam(1e-2), params), donate=False
    )
    state = step.init(params)
    good = {"x": X6, "y": jnp.ones((2, 4))}
    bad = {"x": X6.at[0, 0].set(jnp.nan), "y": jnp.ones((2, 4))}
    new, new_state, loss = step(params, state, bad)
    assert not np.isfinite(loss) and step.skipped(new_state) == 1
    for path, v in leaves_by_path(lj.partition(new)[0]).items():
        np.testing.assert_array_equal(v, leaves_by_path(lj.partition(params)[0])[path])
    new, new_state, loss = step(new, new_state, good)
    assert np.isfinite(loss) and step.skipped(new_state) == 1
    assert not np.array_equal(
        new["params"]["query"]["kernel_lora_b"], params["params"]["query"]["kernel_lora_b"]
    )
    raw = lj.make_train_step(
        lora_model, loss_fn, optax.adam(1e-2), skip_nonfinite=False, donate=False
    )
    broken, _, _ = raw(params, raw.init(params), bad)
    assert np.isnan(broken["params"]["query"]["kernel_lora_a"]).any()


def test_optimizer_state_of_another_rank_names_the_leaves():
    _, _, lora_model, params = query_value()
    _, _, _, other = query_value(rank=4)
    tx = optax.adam(1e-2)
    step = lj.make_train_step(lora_model, lambda apply, b: jnp.mean(apply(b) ** 2), tx)
    wrong = lj.make_train_step(lora_model, lambda apply, b: 0.0, tx).init(other)
    with pytest.raises(
        ValueError,
        match=r"(?s)opt_state does not fit the trainable leaves .* Leaf '.*mu/params/query/kernel_lora_a' has shape \(6, 4\)",
    ):
        step(params, wrong, X6)


def test_loss_with_aux_without_has_aux_is_explained():
    _, _, lora_model, params = query_value()
    step = lj.make_train_step(
        lora_model, lambda apply, b: (jnp.mean(apply(b)), {"n": 1}), optax.sgd(0.1)
    )
    with pytest.raises(
        TypeError,
        match=r"loss_fn returned a tuple of 2: return a scalar loss, or pass has_aux=True",
    ):
        step(params, step.init(params), X6)
    step = lj.make_train_step(lora_model, lambda apply, b: apply(b), optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"must return a floating scalar loss, got shape \(2, 4\)"):
        step(params, step.init(params), X6)


def test_qlora_train_step_with_dropout(tiny_llama):
    model, tokens, base = tiny_llama
    cfg = lj.LoraConfig(
        targets=("q_proj", "v_proj", "down_proj"), dropout=0.1, quantize=QC(targets=".*_proj")
    )
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(25), tokens, base_params=base)
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])
    step = lj.make_train_step(lora, loss, lj.optimizer(optax.adam(1e-2), params))
    state, frozen = step.init(params), lj.partition(params)[1]
    losses = []
    for i in range(4):
        params, state, value = step(params, state, tokens, rng=jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(lj.partition(params)[1], frozen)
