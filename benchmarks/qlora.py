"""QLoRA (4-bit NF4 base, double quantization) against bf16 LoRA, on the reference decoder.

For one bf16 model, LoRA on every linear layer, and one batch, this compiles the train step of
  lora      bf16 base weights, lj.make_train_step
  qlora     the same with LoraConfig.quantize = QuantConfig() (NF4, block 64, double quant)
  qwix      qwix's QLoRA (LoraRule with weight_qtype="nf4", tile 64), when qwix is installed
and reports: bytes of the frozen parameters and bits per quantized weight; the compiled step's
memory (memory_analysis: arguments, temporaries, outputs); the median step time over 5 runs
after a warm-up. Ratios are to `lora`, taken in one run.

Run: python benchmarks/qlora.py [--hidden 512] [--layers 4] [--batch 4] [--seq 128] [--dtype bfloat16]
                                [--scan] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import optax

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nbytes(tree) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def time_compiled(compiled, args, advance, runs=5):
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
        args = advance(args, out)
    return 1e3 * statistics.median(times[1:])


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    mb = lambda n: n / 2**20  # noqa: E731
    return {
        "argument_mb": mb(mem.argument_size_in_bytes),
        "temp_mb": mb(mem.temp_size_in_bytes),
        "output_mb": mb(mem.output_size_in_bytes),
    }


def lora_jax_case(model, base, batch, rank, quantize, runs):
    cfg = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=ALL_LINEAR, quantize=quantize)
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(1), batch[:, :-1], base_params=base)
    loss = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])  # noqa: E731
    step = lj.make_train_step(lora, loss, optax.adamw(1e-4))
    trainable, frozen = lj.partition(params)
    state = step.init(params)
    args = (trainable, frozen, state, batch, None)
    compiled = step.jitted.lower(*args).compile()
    advance = lambda a, out: (out[0], a[1], out[1], a[3], a[4])  # noqa: E731
    quantized = [
        v
        for v in jax.tree.leaves(frozen, is_leaf=lj.quant.is_quantized)
        if lj.quant.is_quantized(v)
    ]
    row = {
        "frozen_mb": nbytes(frozen) / 2**20,
        "bits_per_quantized_weight": (
            8 * sum(q.nbytes for q in quantized) / sum(q.size for q in quantized)
            if quantized
            else None
        ),
        **memory(compiled),
        "step_ms": time_compiled(compiled, args, advance, runs),
    }
    return row


def qwix_case(model, batch, rank, runs):
    try:
        import qwix
    except ImportError:
        return {"skipped": "qwix is not installed (pip install -e '.[peers]')"}
    rules = [
        qwix.LoraRule(
            module_path=".*(" + "|".join(ALL_LINEAR) + ")",
            rank=rank,
            alpha=2.0 * rank,
            weight_qtype="nf4",
            tile_size=64,
        )
    ]
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(rules))
    # Random weights: memory and time do not depend on the values.
    params = jax.jit(qmodel.init)(jax.random.key(0), batch[:, :-1])["params"]
    is_adapter = lambda path: str(path[-1]).strip("[]'").endswith(("lora_a", "lora_b"))  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    trainable = {jax.tree_util.keystr(p): v for p, v in flat if is_adapter(p)}
    tx = optax.adamw(1e-4)

    def step(trainable, params, state, batch):
        def objective(trainable):
            merged = jax.tree_util.tree_map_with_path(
                lambda p, v: trainable.get(jax.tree_util.keystr(p), v), params
            )
            logits = qmodel.apply({"params": merged}, batch[:, :-1])
            return causal_lm_loss(logits, batch[:, 1:])

        loss, grads = jax.value_and_grad(objective)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    jitted = jax.jit(step, donate_argnums=(0, 2))
    args = (trainable, params, tx.init(trainable), batch)
    compiled = jitted.lower(*args).compile()
    frozen = [v for p, v in flat if not is_adapter(p)]
    advance = lambda a, out: (out[0], a[1], out[1], a[3])  # noqa: E731
    return {
        "frozen_mb": nbytes(frozen) / 2**20,
        "bits_per_quantized_weight": None,
        **memory(compiled),
        "step_ms": time_compiled(compiled, args, advance, runs),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", help="model compute and storage dtype")
    p.add_argument("--scan", action="store_true", help="layers under nn.scan (scan_layers=True)")
    p.add_argument("--no-qwix", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    cfg = LlamaConfig.small(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75) // 64 * 64,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        vocab_size=1024,
        dtype=args.dtype,
        param_dtype=args.dtype,
        scan_layers=args.scan,
    )
    model = Llama(cfg)
    batch = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, cfg.vocab_size)
    base = jax.jit(model.init)(jax.random.key(0), batch[:, :-1])
    results = {
        "lora": lora_jax_case(model, base, batch, args.rank, None, args.runs),
        "qlora": lora_jax_case(
            model, base, batch, args.rank, lj.QuantConfig(compute_dtype=args.dtype), args.runs
        ),
    }
    if not args.no_qwix:
        try:
            results["qwix"] = qwix_case(model, batch, args.rank, args.runs)
        except Exception as e:  # noqa: BLE001 - a peer failing is a row, not a crash
            results["qwix"] = {"skipped": f"qwix failed: {type(e).__name__}: {e}"[:300]}
    report = {
        "machine": platform.node(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"}
        | {"params": cfg.num_params(), "base_model_mb": nbytes(base) / 2**20},
        "results": results,
    }
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return report


def markdown(report) -> str:
    base = report["results"]["lora"]
    cfg = report["config"]
    lines = [
        f"QLoRA vs LoRA — {cfg['params']:,} params, {cfg['layers']} layers, hidden {cfg['hidden']}, "
        f"batch {cfg['batch']}x{cfg['seq']}, rank {cfg['rank']}, all linear layers, {cfg['dtype']}{', nn.scan' if cfg['scan'] else ''}; "
        f"backend {report['backend']}, jax {report['jax']}",
        "",
        "| case | frozen MB | bits/quantized weight | args MB | temp MB | step ms | frozen / lora | temp / lora | time / lora |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} |  |  |  |  |  |  |  |")
            continue
        bits = (
            "-"
            if r["bits_per_quantized_weight"] is None
            else f"{r['bits_per_quantized_weight']:.3f}"
        )
        lines.append(
            f"| {name} | {r['frozen_mb']:.2f} | {bits} | {r['argument_mb']:.2f} | {r['temp_mb']:.2f} | "
            f"{r['step_ms']:.1f} | {r['frozen_mb'] / base['frozen_mb']:.3f} | "
            f"{r['temp_mb'] / base['temp_mb']:.3f} | {r['step_ms'] / base['step_ms']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
