"""Every input that once gave a silently wrong result or lost data now gives a clear error or a
correct result (to be distributed to the per-module test files)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import leaves_by_path, randomize_adapters

import lora_jax as lj
from lora_jax import quant
from lora_jax.io import adapter_files
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
X = jax.random.normal(jax.random.key(0), (2, 6))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="query")(x)
        return nn.Dense(4, name="value")(h)


def _net(**cfg):
    base = Net().init(jax.random.key(1), X)
    cfg = lj.LoraConfig(**{"rank": 2, "targets": ("query", "value"), **cfg})
    lora_model = lj.LoRA(Net(), cfg)
    return base, cfg, lora_model, lj.init(lora_model, jax.random.key(2), X, base_params=base)


# 2 -------------------------------------------------------------------------------------------


class IntNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", lambda k: jnp.ones((6, 4), jnp.int32))
        return nn.Dense(4, name="query")(x) + (x @ w.astype(x.dtype))


def test_integer_kernels_cannot_take_adapters():
    class Counts(nn.Module):
        @nn.compact
        def __call__(self, x):
            zeros = lambda key, shape, dtype: jnp.zeros(shape, dtype)  # noqa: E731
            return nn.Embed(10, 4, param_dtype=jnp.int32, embedding_init=zeros, name="table")(x)

    ids = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"selects 'table', whose 'embedding' is int32: LoRA adapts floating"):
        lj.init(lj.LoRA(Counts(), lj.LoraConfig(rank=2, targets=("table",))), jax.random.key(0), ids)


def test_merge_refuses_an_integer_kernel():
    base, cfg, _, params = _net()
    params = jax.tree.map(lambda v: v, params)
    params["params"]["query"]["kernel"] = params["params"]["query"]["kernel"].astype(jnp.int32)
    with pytest.raises(ValueError, match=r"Parameter 'params/query/kernel' is int32: merging would truncate"):
        lj.merge(params)


# 3 -------------------------------------------------------------------------------------------


def test_adapters_the_config_does_not_target_are_an_error():
    _, _, _, params = _net()
    narrower = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query",)))
    with pytest.raises(ValueError, match=r"holds an adapter for 'value/kernel', but LoraConfig.targets=\('query',\) .* silently dropped"):
        narrower.apply(params, X)


def test_targets_edited_in_the_adapter_json_are_an_error(tmp_path):
    base, cfg, _, params = _net()
    lj.save_adapter(tmp_path, params, cfg)
    path = tmp_path / "adapter_config.json"
    desc = json.loads(path.read_text())
    desc["lora_config"]["targets"] = ["query"]
    path.write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=r"holds an adapter for 'value/kernel', which LoraConfig.targets=\('query',\)"):
        lj.load_adapter(tmp_path, base)
    desc["lora_config"]["targets"] = ["query", "value"]
    desc["lora_config"]["rank"] = 4
    path.write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=r"'query/kernel' has rank 2 in the file but LoraConfig gives 4"):
        lj.load_adapter(tmp_path, base)


# 4 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_load_adapter_refuses_the_merged_model_it_came_from(tmp_path, dtype):
    model = Llama(LlamaConfig.tiny(param_dtype=dtype, dtype=dtype))
    ids = jnp.zeros((1, 8), jnp.int32)
    base = model.init(jax.random.key(0), ids)
    cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
    params = randomize_adapters(
        lj.init(lj.LoRA(model, cfg), jax.random.key(1), ids, base_params=base), jax.random.key(2), 0.05
    )
    lj.save_adapter(tmp_path, params, cfg)
    merged = lj.merge(params)
    with pytest.raises(ValueError, match=r"would apply its ΔW twice: base_params hold the merged model"):
        lj.load_adapter(tmp_path, merged)
    loaded, _ = lj.load_adapter(tmp_path, base)  # the original base is fine
    assert leaves_by_path(loaded).keys() == leaves_by_path(params).keys()


# 5 -------------------------------------------------------------------------------------------


def test_trainable_half_of_another_rank_is_refused_by_merge_and_apply():
    _, _, lora_model, params = _net()
    _, _, _, other = _net(rank=4)
    joined = lj.combine(lj.partition(other)[0], lj.partition(params)[1])
    with pytest.raises(ValueError, match=r"Adapter leaf 'a' of 'params/query/kernel' has shape \(6, 4\) \(rank 4\) but its record says \(6, 2\) \(rank 2\)"):
        lj.merge(joined)
    with pytest.raises(ValueError, match=r"'params/query/kernel_lora_a' does not fit its adapter"):
        lora_model.apply(joined, X)


# 6 -------------------------------------------------------------------------------------------


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
    base, cfg, _, params = _net()
    lj.save_adapter(tmp_path, params, cfg)
    _rewrite_tensors(tmp_path, lambda t: {**t, "params/query/kernel": np.zeros((6, 8), np.float32)})
    with pytest.raises(ValueError, match=r"holds tensor 'params/query/kernel', which is neither an adapter leaf"):
        lj.load_adapter(tmp_path, base)


# 7 -------------------------------------------------------------------------------------------


def test_alpha_edited_in_the_json_is_the_alpha_applied(tmp_path):
    base, cfg, _, params = _net()
    params = randomize_adapters(params, jax.random.key(3))
    lj.save_adapter(tmp_path, params, cfg)
    path = tmp_path / "adapter_config.json"
    desc = json.loads(path.read_text())
    desc["lora_config"]["alpha"] = 4.0
    path.write_text(json.dumps(desc))
    loaded, loaded_cfg = lj.load_adapter(tmp_path, base)
    assert loaded_cfg.alpha == 4.0
    assert loaded["lora"]["query"]["kernel_lora"].scale == loaded_cfg.scale_for("query") == 2.0
    out = lj.LoRA(Net(), loaded_cfg).apply(loaded, X)
    expected = Net().apply(lj.merge(loaded), X)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    p = params["params"]["query"]
    w = p["kernel"] + 2.0 * p["kernel_lora_a"] @ p["kernel_lora_b"]
    np.testing.assert_allclose(lj.merge(loaded)["params"]["query"]["kernel"], w, rtol=1e-6, atol=1e-6)


# 8 -------------------------------------------------------------------------------------------


def test_non_finite_weights_are_named_and_outliers_stay_in_their_block():
    cfg = lj.QuantConfig(compute_dtype=jnp.float32)
    w = jax.random.normal(jax.random.key(0), (512, 256))
    with pytest.raises(ValueError, match=r"Cannot quantize 'layers_0/q/kernel': it holds 1 non-finite .* index \(3, 5\)"):
        quant.quantize_array(w.at[3, 5].set(jnp.nan), cfg, path="layers_0/q/kernel")
    with pytest.raises(ValueError, match="non-finite"):
        lj.quantize({"l": {"kernel": w.at[0, 0].set(jnp.inf)}}, cfg)
    plain = np.asarray(quant.dequantize(quant.quantize_array(w, cfg)))
    w = np.asarray(w)
    # The outlier's block is (rows 0..63, column 7); its group of 256 scales is rows 0..63.
    block, group = np.zeros(w.shape, bool), np.zeros(w.shape, bool)
    block[0:64, 7], group[0:64, :] = True, True
    err = lambda q, mask: np.linalg.norm((q - w)[mask]) / np.linalg.norm(w[mask])  # noqa: E731
    for outlier in (1e30, 1e4, 30.0, 1e-30):
        bad = np.asarray(quant.dequantize(quant.quantize_array(jnp.asarray(_with(w, outlier)), cfg)))
        np.testing.assert_array_equal(bad[~group], plain[~group])  # other groups: bit-identical
        others = group & ~block  # the 255 neighbours share the group's range: barely moved
        assert err(bad, others) < 1.01 * err(plain, others), outlier
        assert np.isfinite(bad).all()


def _with(w, value):
    out = w.copy()
    out[5, 7] = value
    return out


# 9 -------------------------------------------------------------------------------------------


def test_a_nan_loss_skips_the_update_and_is_counted():
    _, _, lora_model, params = _net()
    loss_fn = lambda apply, b: jnp.mean((apply(b["x"]) - b["y"]) ** 2)
    step = lj.make_train_step(lora_model, loss_fn, lj.optimizer(optax.adam(1e-2), params), donate=False)
    state = step.init(params)
    good = {"x": X, "y": jnp.ones((2, 4))}
    bad = {"x": X.at[0, 0].set(jnp.nan), "y": jnp.ones((2, 4))}
    new, new_state, loss = step(params, state, bad)
    assert not np.isfinite(loss) and step.skipped(new_state) == 1
    for path, v in leaves_by_path(lj.partition(new)[0]).items():
        np.testing.assert_array_equal(v, leaves_by_path(lj.partition(params)[0])[path])
    new, new_state, loss = step(new, new_state, good)
    assert np.isfinite(loss) and step.skipped(new_state) == 1
    assert not np.array_equal(new["params"]["query"]["kernel_lora_b"], params["params"]["query"]["kernel_lora_b"])
    raw = lj.make_train_step(lora_model, loss_fn, optax.adam(1e-2), skip_nonfinite=False, donate=False)
    broken, _, _ = raw(params, raw.init(params), bad)
    assert np.isnan(broken["params"]["query"]["kernel_lora_a"]).any()


# 10 ------------------------------------------------------------------------------------------


def test_a_crash_between_the_two_files_leaves_one_whole_adapter(tmp_path, monkeypatch):
    base, cfg, lora_model, params = _net()
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
            lora_model.apply(loaded, X), lora_model.apply(expected, X), err_msg=f"crash at rename {n}"
        )


def test_a_failing_json_write_keeps_the_old_adapter(tmp_path, monkeypatch):
    base, cfg, lora_model, params = _net()
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
    np.testing.assert_array_equal(lora_model.apply(loaded, X), lora_model.apply(old, X))


# 11, 12 --------------------------------------------------------------------------------------


def test_a_second_manager_only_reads_and_keeps_the_first_ones_save(tmp_path):
    trainable = {"params": {"q": {"kernel_lora_a": jnp.ones((256, 256))}}}
    opt_state = optax.sgd(0.1).init(trainable)
    writer = lj.CheckpointManager(tmp_path)
    writer.save(1, trainable, opt_state)
    reader = lj.CheckpointManager(tmp_path)  # opened while the save may be in flight
    assert reader.read_only and not writer.read_only
    with pytest.raises(ValueError, match="another CheckpointManager .* is writing there"):
        reader.save(2, trainable, opt_state)
    writer.close()
    assert writer.all_steps() == [1]
    assert reader.restore(trainable_like=trainable, opt_state_like=opt_state).step == 1
    reader.close()
    again = lj.CheckpointManager(tmp_path)  # the writer closed: a new manager writes again
    assert not again.read_only
    again.close()


def test_exit_without_close_commits_the_last_save(tmp_path):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import jax.numpy as jnp, optax, lora_jax as lj
        t = {{"params": {{"q": {{"kernel_lora_a": jnp.ones((512, 512))}}}}}}
        mgr = lj.CheckpointManager({str(tmp_path)!r})
        mgr.save(7, t, optax.sgd(0.1).init(t))
        print("exiting")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert lj.CheckpointManager(tmp_path).all_steps() == [7]


# 13 ------------------------------------------------------------------------------------------


def test_restore_onto_a_sharding_that_does_not_divide_says_so(tmp_path):
    trainable = {"params": {"q": {"kernel_lora_a": jnp.ones((6, 3))}}}
    opt_state = optax.sgd(0.1).init(trainable)
    with lj.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, opt_state)
        mgr.wait()
        mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        with pytest.raises(ValueError, match=r"do not divide .* Leaf 'trainable/params/q/kernel_lora_a' of shape \(6, 3\)") as e:
            mgr.restore(trainable_like=trainable, opt_state_like=opt_state, shardings=sharding)
        assert "damaged" not in str(e.value)


def test_wrong_sample_shape_is_not_blamed_on_the_weights():
    base = Net().init(jax.random.key(1), X)
    lora_model = lj.LoRA(Net(), lj.LoraConfig(rank=2, targets=("query",)))
    with pytest.raises(ValueError, match=r"only shapes differ: if the parameters are right, the sample inputs \(shapes \[\(2, 5\)\]\) are not"):
        lj.init(lora_model, jax.random.key(2), jnp.ones((2, 5)), base_params=base)


def test_extra_collections_and_lora_trees_as_base_are_explained():
    base, cfg, lora_model, params = _net()
    with pytest.raises(ValueError, match=r"base_params hold collections \['batch_stats'\] that the model does not use"):
        lj.init(lora_model, jax.random.key(2), X, base_params={**base, "batch_stats": {"n": jnp.ones(2)}})
    with pytest.raises(ValueError, match=r"base_params already hold LoRA adapters .*lora_jax.merge"):
        lj.init(lora_model, jax.random.key(2), X, base_params=params)


def test_optimizer_state_of_another_rank_names_the_leaves():
    _, _, lora_model, params = _net()
    _, _, _, other = _net(rank=4)
    tx = optax.adam(1e-2)
    step = lj.make_train_step(lora_model, lambda apply, b: jnp.mean(apply(b) ** 2), tx)
    wrong = lj.make_train_step(lora_model, lambda apply, b: 0.0, tx).init(other)
    with pytest.raises(ValueError, match=r"(?s)opt_state does not fit the trainable leaves .* Leaf '.*mu/params/query/kernel_lora_a' has shape \(6, 4\)"):
        step(params, wrong, X)


def test_loss_with_aux_without_has_aux_is_explained():
    _, _, lora_model, params = _net()
    step = lj.make_train_step(lora_model, lambda apply, b: (jnp.mean(apply(b)), {"n": 1}), optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"loss_fn returned a tuple of 2: return a scalar loss, or pass has_aux=True"):
        step(params, step.init(params), X)
    step = lj.make_train_step(lora_model, lambda apply, b: apply(b), optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"must return a floating scalar loss, got shape \(2, 4\)"):
        step(params, step.init(params), X)


def test_lora_with_a_dict_config_is_a_type_error():
    with pytest.raises(TypeError, match=r"LoRA.config must be a lora_jax.LoraConfig, got dict. Build it with"):
        lj.LoRA(Net(), {"rank": 2, "targets": ["query"]})
    with pytest.raises(TypeError, match=r"LoRA.model must be a flax.linen Module, got str"):
        lj.LoRA("model", lj.LoraConfig(targets=("q",)))


def test_a_rank_above_the_layer_size_warns():
    with pytest.warns(UserWarning, match=r"'value/kernel': rank 6 exceeds min\(fan_in, fan_out\) = min\(8, 4\) = 4"):
        _net(rank=6)


def test_requantize_report_of_a_zero_delta_is_zero():
    _, _, _, params = _net(quantize=lj.QuantConfig(block_size=2, compute_dtype=jnp.float32))
    _, report = lj.merge(params, requantize=True)  # B starts at zero: ΔW = 0
    assert report.errors and all(float(e) == 0.0 for e in report.errors.values())
