"""QLoRA (NF4, block 64, double quantization) vs bf16 LoRA on the reference model.

One bfloat16 model, LoRA on every linear layer of the blocks, the same batch:
  lora    bf16 base weights, lj.make_train_step
  qlora   LoraConfig.quantize = QuantConfig() (NF4, block 64, double quant, bf16 compute),
          the dequantizing matmul (XLA's dequantize-then-dot)
Reported: bytes of the frozen parameters (the targeted kernels in 4.127 bits, the embeddings,
norms and head as they were), the compiled step's peak memory, the step time; ratios to lora.
Theory: the targeted kernels shrink to 4.127/16 = 0.258 of their bf16 bytes; the step does
the same matmuls plus a dequantization of each kernel in the forward and the backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases import finetune

TITLE = "QLoRA vs bf16 LoRA"
BITS_THEORY = 4 + 8 / 64 + 32 / (64 * 256)


def bf16(sz: c.Size) -> c.Size:
    """The size with a bfloat16 model (compute and storage); `Size` sets its
    `LlamaConfig.attention` again for bf16 (cuDNN's fused kernel with `--attention cudnn`)."""
    model = dataclasses.replace(
        sz.model, dtype=jnp.dtype(jnp.bfloat16), param_dtype=jnp.dtype(jnp.bfloat16)
    )
    return dataclasses.replace(sz, model=model)


QCFG = lj.QuantConfig(fmt="nf4", block_size=64, double_quant=True, compute_dtype=jnp.bfloat16)


def run(ctx: c.Context) -> dict:
    sz = bf16(ctx.size)
    steps, rows = {}, {}
    for name, quantize in (("lora", None), ("qlora", QCFG)):
        got = finetune.lora(ctx, c.ALL_LINEAR, quantize, size=sz)
        steps[name], rows[name] = got["step"], dict(got["figures"])
        frozen = lj.partition(got["params"])[1]["params"]
        qts = [
            v
            for v in jax.tree.leaves(frozen, is_leaf=lj.quant.is_quantized)
            if lj.quant.is_quantized(v)
        ]
        rows[name]["frozen_bytes"] = got["frozen_bytes"]
        rows[name]["bits_per_quantized_weight"] = (
            8 * sum(q.nbytes for q in qts) / sum(q.size for q in qts) if qts else 16.0
        )
        # the targeted kernels: 4-bit bytes for qlora, their bf16 bytes (2 per weight) for lora
        rows[name]["targeted_bytes"] = sum(q.nbytes for q in qts) if qts else None
        if qts:
            rows["lora"]["targeted_bytes"] = 2 * sum(q.size for q in qts)
    ctx.log("  timing")
    times = c.time_steps(steps, ctx.runs)
    for name, r in rows.items():
        r.update(times[name])
        r["tokens_per_s"] = sz.tokens / (r["ms"] / 1e3)
    for r in rows.values():
        r["frozen_ratio"] = c.ratio(r["frozen_bytes"], rows["lora"]["frozen_bytes"])
        r["targeted_ratio"] = c.ratio(r["targeted_bytes"], rows["lora"]["targeted_bytes"])
        r["memory_ratio"] = c.ratio(r["peak_bytes"], rows["lora"]["peak_bytes"])
        r["time_ratio"] = c.ratio(r["ms"], rows["lora"]["ms"])
    kernel = "XLA dequantize-then-dot"
    return {"title": TITLE, "size": sz.describe(), "rows": rows, "dequant_kernel": kernel}


def markdown(result: dict) -> str:
    out = [
        f"**{TITLE}** — {result['size']}, all linear layers"
        + (f", 4-bit matmul: {result['dequant_kernel']}" if "dequant_kernel" in result else ""),
        "",
        "| step | frozen MB | frozen / lora | targeted kernels / lora (theory 0.258) | bits per quantized weight "
        "| peak MB | peak / lora | ms | time / lora |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("lora", "bf16 LoRA"), ("qlora", "QLoRA NF4 + double quant")):
        r = result["rows"][name]
        out.append(
            f"| {label} | {c.fmt(c.mb(r['frozen_bytes']))} | {c.fmt(r['frozen_ratio'], 3)} "
            f"| {c.fmt(r['targeted_ratio'], 3)} | {c.fmt(r['bits_per_quantized_weight'], 3)} "
            f"| {c.fmt(c.mb(r['peak_bytes']), 1)} | {c.fmt(r['memory_ratio'])} | {c.fmt(r['ms'])} "
            f"| {c.fmt(r['time_ratio'])} |"
        )
    return "\n".join(out)


def bars(result: dict):
    q = result["rows"]["qlora"]
    return [
        ("frozen bytes", q["frozen_ratio"], None),
        ("targeted kernels", q["targeted_ratio"], BITS_THEORY / 16),
        ("peak memory", q["memory_ratio"], None),
        ("step time", q["time_ratio"], None),
    ]
