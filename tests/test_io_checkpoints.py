"""Tests for `lora_jax.io.checkpoints`: `CheckpointManager` and the train state.

The train state round trips exactly while the step donates the saved buffers, boxed leaves
come back in their boxes, the latest `max_to_keep` are kept, frozen leaves are never saved,
another config or damaged and interrupted checkpoints are named, a restore lands on one device
or a (2, 4) mesh (and says so when a sharding does not divide), a second manager only reads,
an exit without `close` commits the last save, and a SIGKILL during a save resumes from the
last complete checkpoint bit for bit.
"""

import dataclasses
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flip, trees_equal, truncate
from flax import linen as nn

import lora_jax as lj
from lora_jax.io import CheckpointManager

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def test_train_state_round_trip_survives_donation(llama_run, tmp_path):
    params, opt_state, step = llama_run["params"], llama_run["opt_state"], llama_run["step"]
    params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))  # the fixture's stay intact
    trainable, _frozen = lj.partition(params)
    saved = jax.tree.map(np.array, (trainable, opt_state))
    key, cfg = jax.random.key(9), llama_run["cfg"]
    with CheckpointManager(tmp_path, max_to_keep=None) as mgr:
        assert mgr.latest_step() is None
        mgr.save(3, trainable, opt_state, rng=key, data_state={"pos": [1, 2]}, config=cfg)
        for _ in range(2):  # donates the saved buffers while the save may be in flight
            params, opt_state, _ = step(params, opt_state, llama_run["batch"])
        mgr.wait()
    with CheckpointManager(tmp_path) as mgr:  # a new manager finds it
        state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state, config=cfg)
    assert state.step == 3 and state.data_state == {"pos": [1, 2]} and state.config == cfg
    assert trees_equal((state.trainable, state.opt_state), saved)
    assert not trees_equal(state.trainable, lj.partition(params)[0])  # training moved on
    assert str(jax.random.key_impl(state.rng)) == "threefry2x32"
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(key))


def test_keeps_the_latest_and_steps_increase(llama_run, tmp_path):
    trainable, opt_state = lj.partition(llama_run["params"])[0], llama_run["opt_state"]
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        mgr.save(3, trainable, opt_state)
        mgr.save(5, trainable, opt_state, rng=jax.random.PRNGKey(1))
        mgr.save(8, trainable, opt_state)
        mgr.wait()
        assert mgr.all_steps() == [5, 8] and mgr.latest_step() == 8
        with pytest.raises(ValueError, match=r"Cannot save step 8 .* already holds step 8"):
            mgr.save(8, trainable, opt_state)
        state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state)
        assert (state.step, state.rng, state.data_state, state.config) == (8, None, None, None)
        raw = mgr.restore(5, trainable_like=trainable, opt_state_like=opt_state).rng
        assert raw.dtype == jnp.uint32 and np.array_equal(raw, jax.random.PRNGKey(1))
        mgr.delete(8)
        assert mgr.all_steps() == [5]


def test_boxed_leaves_come_back_in_their_boxes(llama_run, tmp_path):
    trainable = lj.partition(llama_run["params"])[0]
    boxed = jax.tree.map(lambda v: nn.Partitioned(v, names=(None,) * v.ndim), trainable)
    opt_state = optax.sgd(0.1, momentum=0.9).init(trainable)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, boxed, opt_state)
        mgr.wait()
        state = mgr.restore(trainable_like=boxed, opt_state_like=opt_state)
    assert jax.tree.structure(state.trainable) == jax.tree.structure(boxed)
    assert trees_equal(nn.unbox(state.trainable), trainable)


def test_frozen_leaves_are_never_saved(llama_run, tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(TypeError, match="pass the trainable half"):
            mgr.save(1, llama_run["params"], llama_run["opt_state"])
        trainable, frozen = lj.partition(llama_run["params"])
        with pytest.raises(ValueError, match="'params/norm/scale' is frozen"):
            both = lj.combine(trainable, {"params": {"norm": frozen["params"]["norm"]}})
            mgr.save(1, both, llama_run["opt_state"], config=llama_run["cfg"])
        with pytest.raises(TypeError, match="data_state must be JSON data"):
            mgr.save(1, trainable, llama_run["opt_state"], data_state=object())
        assert mgr.all_steps() == []


def test_restore_with_another_config_names_fields_and_paths(llama_run, tmp_path):
    trainable = lj.partition(llama_run["params"])[0]
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, llama_run["opt_state"], config=llama_run["cfg"])
        mgr.wait()
        cfg = dataclasses.replace(llama_run["cfg"], rank=8, targets=("q_proj", "k_proj"))
        params = lj.init(
            lj.LoRA(llama_run["model"], cfg),
            jax.random.key(1),
            llama_run["sample"],
            base_params=llama_run["base"],
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
        with pytest.raises(
            ValueError, match=r"'opt_state/.*/mu/params/.*/kernel_lora_a' is in the"
        ):
            mgr.restore(trainable_like=trainable, opt_state_like=sgd)
        with pytest.raises(ValueError, match=r"No checkpoint of step 2 .* \(steps: \[1\]\)"):
            mgr.restore(2, trainable_like=trainable, opt_state_like=llama_run["opt_state"])


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: truncate(_largest_file(d / "state")), "is damaged"),
        (lambda d: flip(_largest_file(d / "state")), "is damaged"),
        (lambda d: (d / "meta" / "metadata").write_text('{"format": '), "is damaged: its 'meta'"),
    ],
)
# When a read fails, orbax leaves its other reads' coroutines to the garbage collector, which
# reports them as unraisable exceptions: collected at the end of this test, and ignored.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_raises_and_earlier_ones_still_restore(
    llama_run, tmp_path, damage, message
):
    trainable = jax.tree.map(
        lambda v: jnp.tile(v, (1, 8)) if v.ndim == 2 else v, lj.partition(llama_run["params"])[0]
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


def test_interrupted_save_is_skipped(llama_run, tmp_path):
    trainable = lj.partition(llama_run["params"])[0]
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, llama_run["opt_state"])
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()  # what a crash during a save leaves
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1]
        mgr.save(2, trainable, llama_run["opt_state"])
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


def test_restore_onto_a_sharding_that_does_not_divide_says_so(tmp_path):
    trainable = {"params": {"q": {"kernel_lora_a": jnp.ones((6, 3))}}}
    opt_state = optax.sgd(0.1).init(trainable)
    with lj.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, opt_state)
        mgr.wait()
        mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        with pytest.raises(
            ValueError,
            match=r"do not divide .* Leaf 'trainable/params/q/kernel_lora_a' of shape \(6, 3\)",
        ) as e:
            mgr.restore(trainable_like=trainable, opt_state_like=opt_state, shardings=sharding)
        assert "damaged" not in str(e.value)


# -------------------------------------------------------------------------- one writer


def test_a_second_manager_only_reads_and_keeps_the_first_ones_save(tmp_path):
    trainable = {"params": {"q": {"kernel_lora_a": jnp.ones((256, 256))}}}
    opt_state = optax.sgd(0.1).init(trainable)
    writer = lj.CheckpointManager(tmp_path)
    writer.save(1, trainable, opt_state)
    reader = lj.CheckpointManager(tmp_path)  # opened while the save may be in flight
    assert reader.read_only and not writer.read_only
    with pytest.raises(ValueError, match=r"another CheckpointManager .* is writing there"):
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
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert lj.CheckpointManager(tmp_path).all_steps() == [7]


# ------------------------------------------------------------------------------ faults


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


def test_restore_into_the_bare_optimizer_s_state_says_to_use_step_init(llama_run, tmp_path):
    """`make_train_step` wraps the optimizer; a state made with the bare `tx.init` has another
    structure, and the error says which state to pass."""
    params, opt_state = llama_run["params"], llama_run["opt_state"]
    trainable, _frozen = lj.partition(params)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, trainable, opt_state)
    bare = lj.optimizer(optax.adamw(1e-2), params).init(trainable)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(ValueError) as e:
        mgr.restore(trainable_like=trainable, opt_state_like=jax.eval_shape(lambda: bare))
    assert "step.init(params)" in str(e.value) and "opt_state/" in str(e.value)


def test_ctrl_c_while_orbax_waits_for_a_save_is_raised_after_it(tmp_path, monkeypatch):
    """orbax's wait for a save catches every exception (KeyboardInterrupt included) and
    deletes that checkpoint; a Ctrl-C arriving there is held back and raised once the wait is
    done, and the checkpoint stays."""
    trainable = {"params": {"q": {"kernel_lora_a": jnp.ones((4, 2))}}}
    opt_state = optax.adam(1e-3).init(trainable)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with CheckpointManager(tmp_path) as mgr:
            mgr.save(1, trainable, opt_state)
            real = mgr._mgr.wait_until_finished

            def swallowing_wait():  # orbax's pattern: `except BaseException`, log, go on
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.2)
                except BaseException:
                    pass
                real()

            monkeypatch.setattr(mgr._mgr, "wait_until_finished", swallowing_wait)
            with pytest.raises(KeyboardInterrupt):
                mgr.wait()
            monkeypatch.undo()  # closing waits once more
            assert mgr.all_steps() == [1]
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
