"""Train-state checkpoints and adapter files: round trips, mismatches, damage, faults."""

import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
from flax import linen as nn
from flax import struct, traverse_util

import lora_jax as lj
from lora_jax import config as config_module
from lora_jax.io import CheckpointManager, config_from_dict, config_to_dict, load_adapter, save_adapter
from lora_jax.io.adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_FILE
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

HERE = Path(__file__).resolve().parent
QuantConfig = getattr(config_module, "QuantConfig", None)


def trees_equal(a, b) -> bool:
    """Same structure, dtypes and bits."""
    same = jax.tree.map(
        lambda x, y: x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), a, b
    )
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


@pytest.fixture(scope="module")
def run():
    """A tiny Llama with adapters and a trained extra, after two train steps."""
    model = Llama(LlamaConfig.tiny())
    sample = jnp.zeros((1, 16), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), sample)
    cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"), trainable=("lm_head/kernel",))
    lora_model = lj.LoRA(model, cfg)
    params = lj.init(lora_model, jax.random.key(1), sample, base_params=base)
    tx = lj.optimizer(optax.adamw(1e-2), params)
    step = lj.make_train_step(lora_model, lambda ap, b: causal_lm_loss(ap(b[:, :-1]), b[:, 1:]), tx)
    batch = jax.random.randint(jax.random.key(2), (2, 17), 0, 256)
    opt_state = step.init(params)
    for _ in range(2):
        params, opt_state, _ = step(params, opt_state, batch)
    return dict(
        model=model, base=base, cfg=cfg, lora_model=lora_model, params=params, step=step,
        opt_state=opt_state, batch=batch, sample=sample,
    )  # fmt: skip


# --------------------------------------------------------------------------- config JSON


CONFIGS = [
    lj.LoraConfig(),
    lj.LoraConfig(
        rank=3,
        alpha=7,
        dropout=0.25,
        targets=r".*/(q|v)_proj",
        exclude=("layers_0/self_attn/q_proj",),
        rank_pattern={"v_proj": 5, "layers_1/.*": 2},
        alpha_pattern={"q_proj": 1.5},
        use_rslora=True,
        init="gaussian",
        param_dtype=jnp.bfloat16,
        trainable=("lm_head/kernel", ".*norm/scale"),
    ),  # fmt: skip
]
if QuantConfig is not None:
    CONFIGS.append(
        lj.LoraConfig(
            quantize=QuantConfig(fmt="int4", block_size=32, compute_dtype=jnp.float16, targets="x")
        )
    )


@pytest.mark.parametrize("cfg", CONFIGS)
def test_config_round_trips_exactly_through_json(cfg):
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["param_dtype"] == jnp.dtype(cfg.param_dtype).name
    back = config_from_dict(data)
    assert back == cfg
    for f in dataclasses.fields(cfg):
        assert type(getattr(back, f.name)) is type(getattr(cfg, f.name)), f.name


def test_config_from_dict_names_unknown_field():
    with pytest.raises(ValueError, match="LoraConfig has no field 'ranks'"):
        config_from_dict({"ranks": 4})


# --------------------------------------------------------------------------- adapter files


def test_adapter_round_trip(run, tmp_path):
    save_adapter(tmp_path / "ad", run["params"], run["cfg"])
    params, cfg = load_adapter(tmp_path / "ad", run["base"])
    assert cfg == run["cfg"]
    assert trees_equal(params, run["params"])
    x = run["batch"][:, :-1]
    np.testing.assert_array_equal(
        lj.LoRA(run["model"], cfg).apply(params, x), run["lora_model"].apply(run["params"], x)
    )
    params2, _ = load_adapter(tmp_path / "ad", run["base"]["params"])  # bare params work too
    assert trees_equal(params2, params)


def test_adapter_files_hold_only_trainable_leaves_and_a_fingerprint(run, tmp_path):
    save_adapter(tmp_path, run["params"], run["cfg"])
    tensors = dict(safetensors.deserialize((tmp_path / ADAPTER_FILE).read_bytes()))
    flat = traverse_util.flatten_dict(run["params"], sep="/")
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


def test_adapter_fingerprint_uses_logical_shape_of_quantized_leaves(run, tmp_path):
    flat = traverse_util.flatten_dict(run["params"], sep="/")
    path = "params/layers_0/mlp/up_proj/kernel"
    flat[path] = FakeQuantized(jnp.zeros((32, 128), jnp.uint8), (64, 128), jnp.dtype("bfloat16"))
    save_adapter(tmp_path, traverse_util.unflatten_dict(flat, sep="/"), run["cfg"])
    desc = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert desc["base_model"]["leaves"][path] == {"shape": [64, 128], "dtype": "bfloat16"}
    params, _ = load_adapter(tmp_path, run["base"])  # the dense base fits: same shapes
    assert trees_equal(params, run["params"])


def test_load_adapter_onto_another_base_names_the_paths(run, tmp_path):
    save_adapter(tmp_path, run["params"], run["cfg"])
    flat = traverse_util.flatten_dict(run["base"], sep="/")
    flat["params/layers_1/self_attn/q_proj/kernel"] = jnp.zeros((64, 32))
    del flat["params/norm/scale"]
    other = traverse_util.unflatten_dict(flat, sep="/")
    with pytest.raises(ValueError, match="another base model") as e:
        load_adapter(tmp_path, other)
    assert "'params/layers_1/self_attn/q_proj/kernel' has shape (64, 32)" in str(e.value)
    assert "'params/norm/scale' is missing" in str(e.value)
    bigger = jax.eval_shape(
        Llama(LlamaConfig.tiny(hidden_size=128)).init, jax.random.key(0), run["sample"]
    )
    with pytest.raises(ValueError, match=r"'params/embed_tokens/embedding' has shape \(256, 128\)"):
        load_adapter(tmp_path, bigger)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (_truncate, ADAPTER_FILE, "corrupted or truncated"),
        (_flip, ADAPTER_FILE, "corrupted or truncated"),
        (os.remove, ADAPTER_FILE, "missing"),
        (_truncate, ADAPTER_CONFIG_FILE, "not valid JSON"),
        (lambda p: p.write_text("[]"), ADAPTER_CONFIG_FILE, "not a lora_jax adapter"),
    ],
)
def test_damaged_adapter_files_raise_naming_the_file(run, tmp_path, damage, file, message):
    save_adapter(tmp_path, run["params"], run["cfg"])
    damage(tmp_path / file)
    with pytest.raises(ValueError, match=message) as e:
        load_adapter(tmp_path, run["base"])
    assert str(tmp_path / file) in str(e.value)


def test_save_adapter_checks_its_inputs(run, tmp_path):
    with pytest.raises(ValueError, match="'lora' collection"):
        save_adapter(tmp_path, run["params"]["params"], run["cfg"])
    other = dataclasses.replace(run["cfg"], rank=8)
    with pytest.raises(
        ValueError, match="'params/layers_0/self_attn/q_proj/kernel_lora_a' has rank 4"
    ):
        save_adapter(tmp_path, run["params"], other)
    with pytest.raises(ValueError, match="'params/lm_head/kernel' is frozen"):
        save_adapter(tmp_path, run["params"], dataclasses.replace(run["cfg"], trainable=()))


# --------------------------------------------------------------------------- train state


def test_train_state_round_trip_survives_donation(run, tmp_path):
    params, opt_state, step = run["params"], run["opt_state"], run["step"]
    params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))  # the fixture's stay intact
    trainable, frozen = lj.partition(params)
    saved = jax.tree.map(np.array, (trainable, opt_state))
    key, cfg = jax.random.key(9), run["cfg"]
    with CheckpointManager(tmp_path, max_to_keep=None) as mgr:
        assert mgr.latest_step() is None
        mgr.save(3, trainable, opt_state, rng=key, data_state={"pos": [1, 2]}, config=cfg)
        for _ in range(2):  # donates the saved buffers while the save may be in flight
            params, opt_state, _ = step(params, opt_state, run["batch"])
        mgr.wait()
    with CheckpointManager(tmp_path) as mgr:  # a new manager finds it
        state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state, config=cfg)
    assert state.step == 3 and state.data_state == {"pos": [1, 2]} and state.config == cfg
    assert trees_equal((state.trainable, state.opt_state), saved)
    assert not trees_equal(state.trainable, lj.partition(params)[0])  # training moved on
    assert str(jax.random.key_impl(state.rng)) == "threefry2x32"
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(key))


def test_keeps_the_latest_and_steps_increase(run, tmp_path):
    trainable, opt_state = lj.partition(run["params"])[0], run["opt_state"]
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        mgr.save(3, trainable, opt_state)
        mgr.save(5, trainable, opt_state, rng=jax.random.PRNGKey(1))
        mgr.save(8, trainable, opt_state)
        mgr.wait()
        assert mgr.all_steps() == [5, 8] and mgr.latest_step() == 8
        with pytest.raises(ValueError, match="Cannot save step 8 .* already holds step 8"):
            mgr.save(8, trainable, opt_state)
        state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state)
        assert (state.step, state.rng, state.data_state, state.config) == (8, None, None, None)
        raw = mgr.restore(5, trainable_like=trainable, opt_state_like=opt_state).rng
        assert raw.dtype == jnp.uint32 and np.array_equal(raw, jax.random.PRNGKey(1))
        mgr.delete(8)
        assert mgr.all_steps() == [5]


def test_boxed_leaves_come_back_in_their_boxes(run, tmp_path):
    trainable = lj.partition(run["params"])[0]
    boxed = jax.tree.map(lambda v: nn.Partitioned(v, names=(None,) * v.ndim), trainable)
    opt_state = optax.sgd(0.1, momentum=0.9).init(trainable)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, boxed, opt_state)
        mgr.wait()
        state = mgr.restore(trainable_like=boxed, opt_state_like=opt_state)
    assert jax.tree.structure(state.trainable) == jax.tree.structure(boxed)
    assert trees_equal(nn.unbox(state.trainable), trainable)


def test_frozen_leaves_are_never_saved(run, tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match="pass the trainable half"):
            mgr.save(1, run["params"], run["opt_state"])
        trainable, frozen = lj.partition(run["params"])
        with pytest.raises(ValueError, match="'params/norm/scale' is frozen"):
            both = lj.combine(trainable, {"params": {"norm": frozen["params"]["norm"]}})
            mgr.save(1, both, run["opt_state"], config=run["cfg"])
        with pytest.raises(TypeError, match="data_state must be JSON data"):
            mgr.save(1, trainable, run["opt_state"], data_state=object())
        assert mgr.all_steps() == []


def test_restore_with_another_config_names_fields_and_paths(run, tmp_path):
    trainable = lj.partition(run["params"])[0]
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, run["opt_state"], config=run["cfg"])
        mgr.wait()
        cfg = dataclasses.replace(run["cfg"], rank=8, targets=("q_proj", "k_proj"))
        params = lj.init(
            lj.LoRA(run["model"], cfg), jax.random.key(1), run["sample"], base_params=run["base"]
        )
        other = lj.partition(params)[0]
        opt_state = lj.optimizer(optax.adamw(1e-2), params).init(other)
        with pytest.raises(ValueError) as e:
            mgr.restore(trainable_like=other, opt_state_like=opt_state, config=cfg)
        msg = str(e.value)
        assert "LoraConfig.rank is 4 in the checkpoint but 8 here" in msg
        assert "LoraConfig.targets is ('q_proj', 'v_proj') in the checkpoint" in msg
        with pytest.raises(ValueError) as e:
            mgr.restore(trainable_like=other, opt_state_like=opt_state)
        msg = str(e.value)
        assert "(made with LoraConfig(rank=4" in msg
        assert "'trainable/params/layers_0/self_attn/q_proj/kernel_lora_a' has shape (64, 4)" in msg
        assert "'trainable/params/layers_0/self_attn/k_proj/kernel_lora_a' is missing" in msg
        assert (
            "'trainable/params/layers_0/self_attn/v_proj/kernel_lora_b' is in the checkpoint" in msg
        )
        sgd = optax.sgd(0.1).init(trainable)
        with pytest.raises(ValueError, match="'opt_state/.*/mu/params/.*/kernel_lora_a' is in the"):
            mgr.restore(trainable_like=trainable, opt_state_like=sgd)
        with pytest.raises(ValueError, match=r"No checkpoint of step 2 .* \(steps: \[1\]\)"):
            mgr.restore(2, trainable_like=trainable, opt_state_like=run["opt_state"])


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _truncate(_largest_file(d / "state")), "is damaged"),
        (lambda d: _flip(_largest_file(d / "state")), "is damaged"),
        (lambda d: (d / "meta" / "metadata").write_text('{"format": '), "is damaged: its 'meta'"),
    ],
)
# When a read fails, orbax leaves its other reads' coroutines to the garbage collector, which
# reports them as unraisable exceptions: collected at the end of this test, and ignored.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_raises_and_earlier_ones_still_restore(run, tmp_path, damage, message):
    trainable = jax.tree.map(
        lambda v: jnp.tile(v, (1, 8)) if v.ndim == 2 else v, lj.partition(run["params"])[0]
    )
    opt_state = optax.sgd(0.1).init(trainable)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, opt_state)
        mgr.save(2, jax.tree.map(lambda v: v + 1, trainable), opt_state)
        mgr.wait()
        damage(tmp_path / "2")
        with pytest.raises(ValueError, match=f"'{tmp_path / '2'}' {message}") as e:
            mgr.restore(trainable_like=trainable, opt_state_like=opt_state)
        assert "restore(step=1)" in str(e.value)
        state = mgr.restore(1, trainable_like=trainable, opt_state_like=opt_state)
        assert trees_equal(state.trainable, trainable)
    gc.collect()


def test_interrupted_save_is_skipped(run, tmp_path):
    trainable = lj.partition(run["params"])[0]
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, run["opt_state"])
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()  # what a crash during a save leaves
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1]
        mgr.save(2, trainable, run["opt_state"])
        mgr.wait()
        assert mgr.all_steps() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # removed before the save


def test_restore_onto_one_device_and_onto_a_2x4_mesh(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        if jax.device_count() >= 8:
            import _ckpt_sharding

            _ckpt_sharding.check_layouts(tmp_path)
            return
    finally:
        sys.path.remove(str(HERE))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(HERE / "_ckpt_sharding.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- faults


def _worker(cache: Path, *args: str) -> subprocess.Popen:
    """Starts tests/_ckpt_worker.py on one device, sharing a compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    cmd = [sys.executable, str(HERE / "_ckpt_worker.py"), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    return out


def _losses(path: Path) -> dict[int, str]:
    return {int(i): v for i, v in (line.split() for line in path.read_text().splitlines())}


def test_kill_during_save_resumes_from_last_complete_checkpoint_bitwise(tmp_path):
    """SIGKILL while the save of step 8 is written but not committed: the restart resumes
    from step 4 and its losses equal those of an uninterrupted run, bit for bit."""
    cache, marker, ckpt = tmp_path / "jax_cache", tmp_path / "saving", tmp_path / "ckpt"
    run = ["--steps", "16", "--every", "4"]
    _finish(_worker(cache, str(tmp_path / "ref_ckpt"), str(tmp_path / "ref.log"), *run))
    victim = _worker(cache, str(ckpt), str(tmp_path / "a.log"), *run, "--kill-at", "8", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    out = victim.communicate()[0]
    assert marker.exists(), f"the save of step 8 never reached its commit: {out}"
    tmp_dir = Path(marker.read_text())
    assert (tmp_dir / "state").is_dir() and not (ckpt / "8").exists()  # written, not committed
    out = _finish(_worker(cache, str(ckpt), str(tmp_path / "b.log"), *run))
    assert "resumed from step 4" in out, out
    ref, before, after = (_losses(tmp_path / f"{n}.log") for n in ("ref", "a", "b"))
    assert sorted(ref) == list(range(16)) and sorted(after) == list(range(4, 16))
    assert len(before) >= 8
    assert {i: ref[i] for i in before} == before  # the killed run, up to the kill
    assert {i: ref[i] for i in after} == after  # the resumed run: bit for bit
    assert sorted(p.name for p in ckpt.iterdir()) == ["12", "16"]  # tmp dir removed


def test_qlora_adapter_loads_onto_dense_and_quantized_bases(tmp_path):
    """The returned config describes the base it was loaded onto, so the pair works."""
    model = Llama(LlamaConfig.tiny(num_layers=1))
    tokens = jnp.zeros((1, 8), jnp.int32)
    base = model.init(jax.random.key(0), tokens)
    cfg = lj.LoraConfig(rank=2, targets=("q_proj",), quantize=lj.QuantConfig(compute_dtype=jnp.float32))
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), tokens, base_params=base)
    save_adapter(tmp_path, params, cfg)
    dense, dense_cfg = load_adapter(tmp_path, base)
    assert dense_cfg.quantize is None
    lj.LoRA(model, dense_cfg).apply(dense, tokens)
    quantized_base = lj.merge(lj.init(lj.LoRA(model, cfg), jax.random.key(1), tokens, base_params=base),
                              requantize=True)[0]
    loaded, loaded_cfg = load_adapter(tmp_path, quantized_base)
    assert loaded_cfg.quantize.targets == ("layers_0/self_attn/q_proj",)
    out = lj.LoRA(model, loaded_cfg).apply(loaded, tokens)
    np.testing.assert_allclose(out, lj.LoRA(model, cfg).apply(params, tokens), atol=1e-5)
