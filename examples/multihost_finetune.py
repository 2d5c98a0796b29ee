"""LoRA fine-tuning across hosts: one SPMD program over every device of every process.

Each host (process) runs this same script. `jax.distributed.initialize` connects them; the mesh
spans all devices; `lj.make_train_step(..., mesh=mesh, rules=RULES)` compiles one program with
the batch split over the "data" axis (data parallel), optionally the embedding axis too
(`--fsdp`) and the heads / MLP axes over a "model" axis (`--model-axis N`, tensor parallel).
Each process feeds only its own rows of the global batch.

On a real cluster, start one copy per host with the coordinator's address, the number of
processes and this process's index (flags, or the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID):

    python examples/multihost_finetune.py --coordinator 10.0.0.1:8476 --num-processes 4 \\
        --process-id $RANK --model small --steps 200 --out adapters.npz

On Cloud TPU, SLURM, Open MPI and Kubernetes (JobSet) JAX finds all three itself: pass
`--distributed` and no addresses. Try it on one machine with two CPU processes of two devices
each (gloo collectives):

    python examples/multihost_finetune.py --launch-local 2 --cpu-devices 2 --model tiny --steps 20

The base model here is the reference decoder at its random initialization (the same in every
process, from --seed); load your checkpoint in its place. Text is read byte by byte from
--data (default: this file).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import traverse_util
from flax.core import meta
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--coordinator",
        default=env("JAX_COORDINATOR_ADDRESS"),
        help="host:port of process 0's coordinator service",
    )
    p.add_argument("--num-processes", type=int, default=env("JAX_NUM_PROCESSES"))
    p.add_argument("--process-id", type=int, default=env("JAX_PROCESS_ID"))
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() even without the three above",
    )
    p.add_argument("--cpu-devices", type=int, help="CPU only: devices per process (gloo)")
    p.add_argument(
        "--launch-local",
        type=int,
        metavar="N",
        help="start N processes of this script on this machine and wait",
    )
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="global batch (all processes)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--model-axis", type=int, default=1, help="tensor-parallel devices")
    p.add_argument("--fsdp", action="store_true", help="also shard 'embed' over 'data'")
    p.add_argument("--data", type=Path, default=Path(__file__), help="text to fine-tune on")
    p.add_argument("--out", type=Path, help="write losses and adapters here (.npz)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def rules(fsdp: bool) -> tuple:
    """Logical axis rules for the reference decoder's annotations (LlamaConfig.logical_axes)."""
    tp = tuple((name, "model") for name in ("heads", "kv_heads", "mlp", "vocab"))
    return (("batch", "data"),) + ((("embed", "data"),) if fsdp else ()) + tp


def setup(args):
    """The LoRA model, its parameters (the same in every process) and the loss."""
    model = Llama(getattr(LlamaConfig, args.model)(logical_axes=True))
    sample = np.zeros((1, args.seq), np.int32)
    base = jax.jit(model.init)(jax.random.key(args.seed), sample)  # your checkpoint goes here
    lora_model = lj.LoRA(
        model, lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    )
    params = lj.init(lora_model, jax.random.key(args.seed + 1), sample, base_params=base)
    loss_fn = lambda apply, batch: causal_lm_loss(apply(batch[:, :-1]), batch[:, 1:])
    return lora_model, params, loss_fn


def global_batch(tokens: np.ndarray, step: int, args) -> np.ndarray:
    """The step's whole batch, (batch, seq + 1) token ids: the same in every process."""
    rng = np.random.default_rng((args.seed, step))
    starts = rng.integers(0, len(tokens) - args.seq - 1, args.batch)
    return np.stack([tokens[s : s + args.seq + 1] for s in starts]).astype(np.int32)


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a global batch that this process's devices hold."""
    rows = {
        idx[0].indices(shape[0])[:2]
        for idx in sharding.addressable_devices_indices_map(shape).values()
    }
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"This process's rows {sorted(rows)} are not contiguous.")
    return slice(start, stop)


def run(args, mesh=None) -> dict:
    """Fine-tunes; `mesh` None runs on one device. Returns losses and the adapters (host
    copies, by path)."""
    lora_model, params, loss_fn = setup(args)
    tokens = np.frombuffer(args.data.read_bytes(), np.uint8)
    tx = lj.optimizer(optax.adamw(args.lr), params)
    if mesh is None:
        step, rows = lj.make_train_step(lora_model, loss_fn, tx), slice(None)
    else:
        step = lj.make_train_step(lora_model, loss_fn, tx, mesh=mesh, rules=rules(args.fsdp))
        params = step.shard(params)
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        rows = process_rows(batch_sharding, (args.batch, args.seq + 1))
    opt_state, losses = step.init(params), []
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, global_batch(tokens, i, args)[rows])
        losses.append(float(loss))
        if jax.process_index() == 0 and (i % 10 == 0 or i == args.steps - 1):
            print(f"step {i:4d}  loss {losses[-1]:.4f}", flush=True)
    trainable = meta.unbox(lj.partition(params)[0])  # outside jit: no sharding constraint
    gathered = multihost_utils.process_allgather(trainable, tiled=True)
    flat = traverse_util.flatten_dict(gathered, sep="/")
    return {"losses": np.asarray(losses), **{k: np.asarray(v) for k, v in flat.items()}}


def launch_local(args, argv) -> int:
    """Starts `--launch-local` copies of this script on 127.0.0.1 and waits for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rest, skip = [], False
    for a in argv:  # drop "--launch-local N" / "--launch-local=N"
        if not skip and not a.startswith("--launch-local"):
            rest.append(a)
        skip = a == "--launch-local"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                *rest,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(args.launch_local),
                "--process-id",
                str(i),
            ]
        )
        for i in range(args.launch_local)
    ]
    return max(p.wait() for p in procs)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.launch_local:
        return launch_local(args, argv)
    if args.cpu_devices:  # before anything touches a device
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.distributed or args.coordinator or args.num_processes:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    n = jax.device_count()
    if n % args.model_axis:
        raise SystemExit(f"--model-axis {args.model_axis} does not divide the {n} devices.")
    mesh = jax.make_mesh((n // args.model_axis, args.model_axis), ("data", "model"))
    if jax.process_index() == 0:
        print(f"{jax.process_count()} processes, {n} devices, mesh {dict(mesh.shape)}")
    result = run(args, mesh)
    if args.out and jax.process_index() == 0:
        np.savez(args.out, **result)
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
