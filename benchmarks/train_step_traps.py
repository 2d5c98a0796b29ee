"""Why `make_train_step` differentiates only the trainable half: the three traps, measured.

Compiles, on the reference decoder (4 layers, the example's `small` config), these steps:
  full        full fine-tuning with AdamW (the baseline)
  lora        lj.make_train_step: grads of the trainable half only, donated
  whole       grads of the whole tree + lj.optimizer (set_to_zero for frozen), no donation
  whole+clip  the same with clip_by_global_norm over the whole tree
  masked      grads of the whole tree + optax.masked(adamw, trainable mask): frozen leaves move
and prints FLOPs and bytes accessed (cost_analysis), compiled output/temp bytes
(memory_analysis), median step time over 5 runs, and whether frozen leaves moved.
All figures are ratios to `full` taken in one run.

Run: python -m benchmarks.train_step_traps [--layers 4] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from benchmarks import common as c
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss


def measure(jitted, args, advance, runs=5):
    """Compiles once, then times `runs` steps (after one warm-up), feeding each step's
    outputs to the next through `advance(args, outputs)` (donated buffers are not reused)."""
    step, f = c.compile_step(jitted, args, advance)
    return {
        "flops": f["flops"],
        "bytes": f["bytes_accessed"],
        "out_mb": c.mb(f["output_bytes"]),
        "temp_mb": c.mb(f["temp_bytes"]),
        "ms": c.time_steps({"step": step}, runs)["step"]["ms"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)

    model = Llama(LlamaConfig.small(vocab_size=256, num_layers=args.layers))
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, 256)
    base = model.init(jax.random.key(1), ids[:, :-1])
    lora_model = lj.LoRA(model, lj.LoraConfig(rank=8, targets=c.ALL_LINEAR))
    params = lj.init(lora_model, jax.random.key(2), ids[:, :-1], base_params=base)
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])
    adamw = optax.adamw(1e-3)

    def whole_tree_step(tx):
        @jax.jit
        def step(params, opt_state, batch):
            grads = jax.grad(lambda p: loss(lambda x: lora_model.apply(p, x), batch))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return step, tx.init(params)

    @jax.jit
    def full(p, s, batch):
        grads = jax.grad(lambda p: loss(lambda x: model.apply(p, x), batch))(p)
        updates, s = adamw.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    lora_step = lj.make_train_step(lora_model, loss, lj.optimizer(adamw, params))
    trainable, frozen = lj.partition(params)
    trainable = jax.tree.map(jnp.copy, trainable)  # the lora step donates these buffers
    mask = jax.tree.map(lambda label: label == "trainable", lj.labels(params))
    plain = lambda args, out: (*out, *args[2:])
    cases = {
        "full": (full, (base, adamw.init(base), ids), plain),
        "lora": (
            lora_step.jitted,
            (trainable, frozen, lora_step.init(params), ids, None),
            lambda args, out: (out[0], args[1], out[1], *args[3:]),
        ),
    }
    for name, tx in {
        "whole": lj.optimizer(adamw, params),
        "whole+clip": optax.chain(optax.clip_by_global_norm(1.0), lj.optimizer(adamw, params)),
        "masked": optax.masked(adamw, mask),
    }.items():
        step, state = whole_tree_step(tx)
        cases[name] = (step, (params, state, ids), plain)

    print(
        f"JAX {jax.__version__} on {jax.default_backend()}; Llama small, {args.layers} layers, "
        f"batch {args.batch} x seq {args.seq}; LoRA rank 8 on all linear layers"
    )
    print(
        f"{'case':<11} {'GFLOP':>8} {'xfull':>6} {'GB acc':>7} {'xfull':>6} {'out MB':>7} {'temp MB':>8} "
        f"{'ms':>7} {'xfull':>6}  frozen moved?"
    )
    results = {name: measure(*case) for name, case in cases.items()}
    ref = results["full"]
    for name, r in results.items():
        moved = "-"
        if name in ("whole", "whole+clip", "masked"):
            fn, a, _ = cases[name]
            new_params, _ = fn(*a)
            moved = str(
                any(
                    not np.array_equal(new_params_leaf, old)
                    for (path, old), new_params_leaf in zip(
                        jax.tree_util.tree_leaves_with_path(params),
                        jax.tree.leaves(new_params),
                        strict=True,
                    )
                    if "lora" not in jax.tree_util.keystr(path)
                )
            )
        elif name == "lora":
            moved = "False (frozen leaves are inputs only)"
        print(
            f"{name:<11} {r['flops'] / 1e9:8.2f} {r['flops'] / ref['flops']:6.2f} {r['bytes'] / 1e9:7.2f} "
            f"{r['bytes'] / ref['bytes']:6.2f} {r['out_mb']:7.1f} {r['temp_mb']:8.1f} {r['ms']:7.1f} "
            f"{r['ms'] / ref['ms']:6.2f}  {moved}"
        )
    return results


if __name__ == "__main__":
    main()
