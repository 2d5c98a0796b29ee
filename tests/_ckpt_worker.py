"""A small LoRA training run with checkpoints, for the fault tests in test_io_checkpoints.py.

python tests/_ckpt_worker.py CKPT_DIR LOSS_LOG [--steps N] [--every K] [--kill-at S MARKER]

Trains the tiny reference Llama with dropout, checkpointing every K steps (async saves), and
resumes from the latest checkpoint if there is one. Each step's loss is appended to LOSS_LOG
as "step float.hex()". Batches depend only on (seed, data position) and the dropout key is
split from a carried key, so the position and the key in a checkpoint fully determine what
follows. With --kill-at S, the commit of the save of step S blocks after its data is written
(orbax's atomic rename of the temporary directory never happens) and MARKER is created: the
parent then SIGKILLs this process in the middle of that save.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.io import CheckpointManager
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

BATCH, SEQ, SEED = 4, 32, 0


def batch_at(position: int) -> jax.Array:
    rng = np.random.default_rng((SEED, position))
    return jnp.asarray(rng.integers(0, 256, size=(BATCH, SEQ + 1), dtype=np.int32))


def block_commit_of(step: int, marker: Path) -> None:
    """Makes the commit of `step`'s save hang after signalling `marker` (fault injection)."""
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def blocking_finalize(self):
        if self.get_final().name == str(step):
            marker.write_text(str(self.get()))
            await asyncio.sleep(3600)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = blocking_finalize


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt_dir", type=Path)
    p.add_argument("log", type=Path)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--kill-at", nargs=2, metavar=("STEP", "MARKER"))
    args = p.parse_args(argv)
    if args.kill_at:
        block_commit_of(int(args.kill_at[0]), Path(args.kill_at[1]))

    model = Llama(LlamaConfig.tiny(num_layers=1))
    sample = jnp.zeros((1, SEQ), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), sample)
    cfg = lj.LoraConfig(rank=4, dropout=0.1, targets=("q_proj", "v_proj"))
    lora_model = lj.LoRA(model, cfg)
    params = lj.init(lora_model, jax.random.key(1), sample, base_params=base)
    tx = lj.optimizer(optax.adamw(1e-2), params)
    step = lj.make_train_step(lora_model, lambda ap, b: causal_lm_loss(ap(b[:, :-1]), b[:, 1:]), tx)
    opt_state, rng, position, start = step.init(params), jax.random.key(2), 0, 0

    mgr = CheckpointManager(args.ckpt_dir, max_to_keep=2, async_save=True)
    if mgr.latest_step() is not None:
        trainable, frozen = lj.partition(params)
        state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state, config=cfg)
        params, opt_state = lj.combine(state.trainable, frozen), state.opt_state
        rng, position, start = state.rng, state.data_state["position"], state.step
        print(f"resumed from step {start}", flush=True)

    with open(args.log, "a") as log:
        for i in range(start, args.steps):
            rng, dropout = jax.random.split(rng)
            params, opt_state, loss = step(params, opt_state, batch_at(position), rng=dropout)
            position += 1
            log.write(f"{i} {float(loss).hex()}\n")
            log.flush()
            if (i + 1) % args.every == 0:
                mgr.save(
                    i + 1,
                    lj.partition(params)[0],
                    opt_state,
                    rng=rng,
                    data_state={"position": position},
                    config=cfg,
                )
    mgr.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
