"""Per-example adapters (multi-tenant serving): a batch of 64 through 16 or 64 distinct
adapters against the same batch through one adapter.

The model is `LlamaConfig.small` (4 layers, hidden 256) with `--hidden` / `--layers`
overrides, float32, adapters of rank 8 on the attention's q and v (or `--targets all`: every
linear layer of the blocks). Compared, as jitted forward passes (logits of the whole batch):

  base               the model without adapters
  one adapter        LoRA with one adapter: every example through it
  N adapters (ids)   LoRA with N named adapters, ``adapter_ids = arange(64) % N``: each
                     example through its own adapter (gathered factors, batched matmuls);
                     the adapters are stacked in each call
  N adapters (bank)  the same, with the adapters stacked once (`lj.adapter_bank`) and passed
                     beside the params: what a server does

at two shapes: prefill (64 x `--seq` tokens) and one token per example (64 x 1, the shape of a
decode step; the KV cache is left out, the adapter work is the same). The figure is the time
ratio against "one adapter" at the same shape, timed round-robin in one run (the target for
16 and 64 adapters: <= 1.2 on CPU).

Run: python -m benchmarks.multi_adapter [--seq 128] [--runs 10] [--out runs/benchmarks]
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import lora_jax as lj
from benchmarks import common as c
from lora_jax.models import Llama, LlamaConfig

BATCH = 64


def _adapters(model, n, targets, rank, x):
    """A LoRA model with `n` named adapters (non-zero B) and its params."""
    cfg = lj.LoraConfig(rank=rank, targets=targets)
    lora_model = lj.LoRA(model, {f"t{i}": cfg for i in range(n)})
    base = jax.jit(model.init)(jax.random.key(0), x[:1])
    params = lj.init(lora_model, jax.random.key(1), x[:1], base_params=base)
    params = lj.combine(*_nonzero(params))
    return lora_model, params, base


def _nonzero(params):
    trainable, frozen = lj.partition(params)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda v: 0.05 * jax.random.normal(next(keys), v.shape), trainable)
    return trainable, frozen


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", choices=("qv", "all"), default="qv")
    p.add_argument("--adapters", default="16,64")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=os.path.join("runs", "benchmarks"))
    args = p.parse_args(argv)
    cfg = LlamaConfig.small(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_layers=args.layers,
        max_seq_len=max(256, args.seq),
    )
    model = Llama(cfg)
    targets = c.QV if args.targets == "qv" else c.ALL_LINEAR
    counts = [int(n) for n in args.adapters.split(",")]
    report = {
        "machine": c.machine(),
        "model": f"Llama hidden {cfg.hidden_size}, {cfg.num_layers} layers, float32",
        "rank": args.rank,
        "targets": list(targets),
        "batch": BATCH,
        "shapes": {},
    }
    for seq in (args.seq, 1):
        x = jax.random.randint(jax.random.key(3), (BATCH, seq), 0, cfg.vocab_size)
        fns, inputs = {}, {}
        one_model, one_params, base = _adapters(model, 1, targets, args.rank, x)
        fns["base"] = jax.jit(model.apply)
        inputs["base"] = (base, x)
        fns["one adapter"] = jax.jit(one_model.apply)
        inputs["one adapter"] = (one_params, x)
        for n in counts:
            lora_model, params, _ = _adapters(model, n, targets, args.rank, x)
            ids = jnp.arange(BATCH, dtype=jnp.int32) % n
            fn = jax.jit(lambda p, x, i, m=lora_model: m.apply(p, x, adapter_ids=i))
            fns[f"{n} adapters (ids)"] = fn
            inputs[f"{n} adapters (ids)"] = (params, x, ids)
            fns[f"{n} adapters (bank)"] = fn
            stacked = lj.adapter_bank(params, lora_model.active_names)
            inputs[f"{n} adapters (bank)"] = ({**params, **stacked}, x, ids)
        steps = {}
        for name, fn in fns.items():
            steps[name], _ = c.compile_step(fn, inputs[name])
        times = c.time_steps(steps, args.runs)
        ref = times["one adapter"]["ms"]
        rows = {name: {"ms": t["ms"], "vs_one_adapter": t["ms"] / ref} for name, t in times.items()}
        report["shapes"][f"{BATCH}x{seq}"] = rows
        for name, row in rows.items():
            print(f"{BATCH}x{seq:<4} {name:<20} {row['ms']:9.2f} ms  {row['vs_one_adapter']:.2f}x")
    path = c.write_json(args.out, f"multi_adapter-{args.targets}-h{args.hidden}.json", report)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
