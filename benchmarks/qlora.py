"""QLoRA (4-bit NF4 base, double quantization) against bf16 LoRA, on the reference decoder.

For one bf16 model, LoRA on every linear layer, and one batch, this compiles the train step of
  lora      bf16 base weights, lj.make_train_step
  qlora     the same with LoraConfig.quantize = QuantConfig() (NF4, block 64, double quant)
  qwix      qwix's QLoRA (LoraRule with weight_qtype="nf4", tile 64), when qwix is installed
and reports: bytes of the frozen parameters and bits per quantized weight; the compiled step's
memory (memory_analysis: arguments, temporaries, outputs); the median step time over 5 runs
after a warm-up. Ratios are to `lora`, taken in one run.

Run: python -m benchmarks.qlora [--hidden 512] [--layers 4] [--batch 4] [--seq 128] [--dtype bfloat16]
                                 [--scan] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import optax

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases import peers
from lora_jax.models import Llama, LlamaConfig


def measured(step: c.Step, figures: dict, runs: int) -> dict:
    """The compiled step's memory (MB) and its median time over `runs` steps after a warm-up."""
    return {
        **{f"{k}_mb": c.mb(figures[f"{k}_bytes"]) for k in ("argument", "temp", "output")},
        "step_ms": c.time_steps({"step": step}, runs)["step"]["ms"],
    }


def lora_jax_case(model, base, batch, rank, quantize, runs):
    cfg = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=c.ALL_LINEAR, quantize=quantize)
    lora = lj.LoRA(model, cfg)
    params = lj.init(lora, jax.random.key(1), batch[:, :-1], base_params=base)
    step = lj.make_train_step(lora, c.lm_loss, optax.adamw(1e-4))
    trainable, frozen = lj.partition(params)
    args = (trainable, frozen, step.init(params), batch, None)
    advance = lambda a, out: (out[0], a[1], out[1], a[3], a[4])
    compiled, figures = c.compile_step(step.jitted, args, advance)
    quantized = [
        v
        for v in jax.tree.leaves(frozen, is_leaf=lj.quant.is_quantized)
        if lj.quant.is_quantized(v)
    ]
    return {
        "frozen_mb": c.mb(c.nbytes(frozen)),
        "bits_per_quantized_weight": (
            8 * sum(q.nbytes for q in quantized) / sum(q.size for q in quantized)
            if quantized
            else None
        ),
        **measured(compiled, figures, runs),
    }


def qwix_case(model, batch, rank, runs):
    try:
        import qwix  # noqa: F401 - only probes that the optional peer is installed
    except ImportError:
        return {"skipped": "qwix is not installed (pip install -e '.[peers]')"}
    step, figures = peers.qwix_step(model, batch, rank, "nf4", c.lm_loss)
    return {
        "frozen_mb": c.mb(figures["frozen_bytes"]),
        "bits_per_quantized_weight": None,
        **measured(step, figures, runs),
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
        except Exception as e:  # a peer failing is a row, not a crash
            results["qwix"] = {"skipped": f"qwix failed: {type(e).__name__}: {e}"[:300]}
    report = {
        "machine": platform.node(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"}
        | {"params": cfg.num_params(), "base_model_mb": c.mb(c.nbytes(base))},
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
