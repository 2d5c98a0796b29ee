"""Save a train state sharded over 8 devices; restore it onto 1 device and onto a (2, 4) mesh.

test_io_checkpoints.py calls `check_layouts` in-process when JAX already has 8 devices, and
otherwise runs this file with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag
must be set before jax is imported): python tests/_ckpt_sharding.py DIRECTORY
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.io import CheckpointManager
from lora_jax.models import Llama, LlamaConfig


def _split(mesh: Mesh, leaf, axes: tuple[str, ...]) -> NamedSharding:
    """Shards leading axes of `leaf` over `axes` where they divide, else replicates them."""
    spec = [
        a if i < leaf.ndim and leaf.shape[i] % mesh.shape[a] == 0 else None
        for i, a in enumerate(axes)
    ]
    return NamedSharding(mesh, P(*spec[: leaf.ndim]))


def _equal(a, b) -> bool:
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(jax.tree.leaves(same))


def check_layouts(directory: Path) -> None:
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, f"needs 8 devices, found {devices.size}"
    model = Llama(LlamaConfig.tiny())
    sample = jnp.zeros((1, 8), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), sample)
    cfg = lj.LoraConfig(rank=8, targets=("q_proj", "v_proj"), init="gaussian")
    params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), sample, base_params=base)
    tx = optax.adam(1e-3)
    trainable = lj.partition(params)[0]
    opt_state = tx.init(trainable)
    trainable = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(3), v.shape), trainable)
    opt_state = jax.tree.map(lambda v: v + 1, opt_state)

    mesh8 = Mesh(devices, ("d",))
    on8 = lambda tree: jax.tree.map(lambda v: jax.device_put(v, _split(mesh8, v, ("d",))), tree)
    trainable8, opt_state8 = on8(trainable), on8(opt_state)
    assert any(len(v.sharding.device_set) == 8 for v in jax.tree.leaves(trainable8))
    assert not any(v.sharding.is_fully_replicated for v in jax.tree.leaves(trainable8))
    with CheckpointManager(directory, async_save=True) as mgr:
        mgr.save(5, trainable8, opt_state8, rng=jax.random.key(7), data_state=5, config=cfg)
        mgr.wait()

        one = SingleDeviceSharding(jax.devices()[0])
        state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state, shardings=one)
        for v in jax.tree.leaves((state.trainable, state.opt_state)):
            assert v.sharding == one, v.sharding
        assert _equal(state.trainable, trainable) and _equal(state.opt_state, opt_state)

        mesh24 = Mesh(devices.reshape(2, 4), ("x", "y"))
        target = jax.tree.map(lambda v: _split(mesh24, v, ("x", "y")), trainable)
        state = mgr.restore(
            trainable_like=jax.eval_shape(lambda: trainable),
            opt_state_like=jax.eval_shape(tx.init, trainable),
            shardings={"trainable": target},
            config=cfg,
        )
        got = jax.tree.map(lambda v: v.sharding, state.trainable)
        assert got == target, got
        assert any(s.spec == P("x", "y") for s in jax.tree.leaves(target))
        mu_shardings = jax.tree.map(lambda v: v.sharding, state.opt_state[0].mu)
        assert mu_shardings == target, "Adam's moments follow their parameters"
        assert state.opt_state[0].count.sharding == NamedSharding(mesh24, P())
        assert _equal(state.trainable, trainable) and _equal(state.opt_state, opt_state)
        assert state.data_state == 5 and state.step == 5
        updates, _ = jax.jit(tx.update)(state.trainable, state.opt_state)
        assert jax.tree.map(lambda v: v.sharding, updates) == target


if __name__ == "__main__":
    check_layouts(Path(sys.argv[1]))
    print("ok")
