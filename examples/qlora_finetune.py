"""QLoRA: the main example's fine-tune with the frozen base kept in 4 bits (NF4).

1. Pretrain the reference decoder briefly on Python source code, as examples/finetune_lm.py.
2. Quantize its linear kernels to NF4 with double quantization (`LoraConfig.quantize`), and
   report the bytes of the frozen weights and what 4 bits cost in held-out loss.
3. LoRA-fine-tune on the English docstrings (or `--data FILE`) through the dequantizing matmul.
4. Report held-out loss before and after, save the adapter (safetensors + JSON), merge into a
   dense model and check it against the adapted model, and show what requantizing the merged
   model would lose (`merge(..., requantize=True)`).

Run: python examples/qlora_finetune.py            (defaults: about two minutes on CPU)
     python examples/qlora_finetune.py --help
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_lm as flow  # noqa: E402  (the main example: corpora, batches, loop, pretraining)

import lora_jax as lj  # noqa: E402
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss  # noqa: E402

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="small", choices=["tiny", "small"])
    p.add_argument("--data", type=Path, help="fine-tune on this text file (bytes as tokens)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default=ALL_LINEAR, help="comma-separated module names (LoRA)")
    p.add_argument("--fmt", default="nf4", choices=["nf4", "fp4", "int4"])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument(
        "--compute-dtype",
        default="float32",
        help="dtype the 4-bit kernels dequantize to (bfloat16 on GPU/TPU)",
    )
    p.add_argument("--base-steps", type=int, default=100, help="pretraining steps on source code")
    p.add_argument("--steps", type=int, default=200, help="QLoRA fine-tuning steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=Path("runs/qlora_finetune"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def mib(tree) -> float:
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree)) / 2**20


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))")
    files = flow.stdlib_files()
    base_train, _ = flow.split(flow.code_corpus(files))
    tune_text = args.data.read_bytes() if args.data else flow.docstring_corpus(files)
    if len(tune_text) < 4 * (args.seq + 1):
        sys.exit(f"--data: {len(tune_text)} bytes; need at least {4 * (args.seq + 1)}.")
    tune_train, tune_held = flow.split(tune_text)

    model_cfg = getattr(LlamaConfig, args.model)(vocab_size=256, max_seq_len=max(args.seq, 128))
    model = Llama(model_cfg)
    key = jax.random.key(args.seed)
    sample = jnp.zeros((1, args.seq), jnp.int32)
    base = model.init(jax.random.fold_in(key, 0), sample)
    base, _ = flow.pretrain(model, base, args, flow.batches(base_train, args.batch, args.seq, args.seed))

    quantize = lj.QuantConfig(
        fmt=args.fmt,
        block_size=args.block_size,
        double_quant=not args.no_double_quant,
        compute_dtype=args.compute_dtype,
        targets=".*_proj",  # every linear layer of the decoder, adapted or not
    )
    cfg = lj.LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        quantize=quantize,
    )
    lora_model = lj.LoRA(model, cfg)
    params = lj.init(lora_model, jax.random.fold_in(key, 1), sample, base_params=base)
    frozen = lj.partition(params)[1]
    quantized = [
        v for v in jax.tree.leaves(frozen, is_leaf=lj.quant.is_quantized) if lj.quant.is_quantized(v)
    ]
    bits = 8 * sum(q.nbytes for q in quantized) / sum(q.size for q in quantized)
    print(lj.summary(params))
    print(
        f"frozen weights: {mib(frozen):.2f} MiB with {len(quantized)} kernels in {args.fmt} "
        f"({bits:.3f} bits per weight) vs {mib(base):.2f} MiB in float32, "
        f"{mib(jax.tree.map(lambda v: v.astype(jnp.bfloat16), base)):.2f} MiB in bfloat16"
    )

    held = flow.eval_batches(tune_held, args.batch, args.seq)
    dense_before = flow.eval_loss(model.apply, base, held)
    before = flow.eval_loss(lora_model.apply, params, held)  # 4-bit base, adapters at zero
    print(
        f"held-out loss before fine-tuning: {dense_before:.4f} dense, {before:.4f} with the "
        f"4-bit base (quantization cost {before - dense_before:+.4f})"
    )
    tx = lj.optimizer(
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 10, max(args.steps, 11))),
        params,
    )
    step = lj.make_train_step(
        lora_model, lambda apply, b: causal_lm_loss(apply(b["inputs"]), b["targets"]), tx
    )
    dropout_key = jax.random.fold_in(key, 2) if args.dropout > 0 else None
    (params, opt_state), _ = flow.run(
        args.steps,
        "QLoRA fine-tune",
        lambda p, s, b, r: step(p, s, b, rng=r),
        (params, step.init(params)),
        flow.batches(tune_train, args.batch, args.seq, args.seed + 1),
        args.batch * args.seq,
        dropout_key,
    )
    after = flow.eval_loss(lora_model.apply, params, held)
    print(f"held-out loss after QLoRA: {after:.4f} ({100 * (before - after) / before:.1f}% lower)")
    print(f"updates skipped for a non-finite loss or gradient: {step.skipped(opt_state)}")

    adapter_dir = args.out / "adapter"
    lj.save_adapter(adapter_dir, params, cfg)
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    print(f"adapter saved: {adapter_dir} ({size:,} bytes)")

    merged = lj.merge(params)  # dense kernels in the compute dtype: dequantize(W) + scale*A@B
    x = held[0]["inputs"]
    diff = float(jnp.max(jnp.abs(model.apply(merged, x) - lora_model.apply(params, x))))
    print(f"merged (dense) model vs adapted model: max |logit difference| = {diff:.2e}")
    if diff > 1e-3:
        sys.exit("merged model does not match the adapted model")
    requantized, report = lj.merge(params, requantize=True)
    errors = np.array([float(e) for e in report.errors.values()])
    requant_loss = flow.eval_loss(_dequantized_apply(model), requantized, held)
    print(
        f"requantizing the merged model to 4 bits loses {100 * np.median(errors):.0f}% of the "
        f"adapters' delta (median over {len(errors)} kernels, worst {100 * errors.max():.0f}%); "
        f"held-out loss {requant_loss:.4f} vs {after:.4f} unmerged. Keep the adapter separate, "
        "or merge into a dense model."
    )
    return {
        "dense_before": dense_before,
        "before": before,
        "after": after,
        "merge_diff": diff,
        "requant_loss": requant_loss,
        "requant_error_median": float(np.median(errors)),
        "bits_per_weight": bits,
        "skipped": step.skipped(opt_state),
        "adapter_bytes": size,
        "frozen_mib": mib(frozen),
        "adapter_dir": os.fspath(adapter_dir),
    }


def _dequantized_apply(model):
    """Runs the original model on a tree with 4-bit kernels by dequantizing them."""
    return lambda params, tokens: model.apply(lj.dequantize(params), tokens)


if __name__ == "__main__":
    main()
