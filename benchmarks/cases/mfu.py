"""Model FLOPs utilization of the LoRA step, and tokens/s against PEFT at the same config.

The LoRA step (all linear layers of the blocks, rank 16, bf16 model, AdamW) on the size's
model and batch (on GPU: Llama-3-8B shapes, 1 x 4096 tokens, chunked cross-entropy).
Model FLOPs per token, with no rematerialization counted:
  frozen matmuls   4 N     (2N forward + 2N activation gradient; no weight gradient), N = the
                           kernels of the blocks and the output head
  adapters         6 r (K + N) per adapted K x N kernel (forward, input and weight gradients)
  attention        6 s d   per layer (QK^T and AV: 4 s d forward, twice that backward, halved
                           by the causal mask), d = heads x head_dim, s = sequence length
MFU = model FLOPs per token x tokens/s / the chip's dense bf16 peak (nominal, and the
measured ~800 TFLOP/s of a bf16 matmul on the lent H100s). Attention is the size's
`LlamaConfig.attention`: cuDNN's fused kernel on GPU unless `--attention xla`.
"""

from __future__ import annotations

import dataclasses

from benchmarks import common as c
from benchmarks.cases import finetune, peers
from lora_jax.models import Llama

TITLE = "MFU of the LoRA step and tokens/s vs PEFT"
MEASURED_PEAK = 800e12  # bf16 matmul measured on the lent H100s
MFU_GOAL, MFU_STRETCH, PEFT_GOAL = 0.40, 0.50, 1.3
# The PyTorch peers: result key, label, `peers.peft_row` options, goal for lora_jax's speedup
# (against the peers a PyTorch user picks for speed: compiled, or Liger's kernels).
PEERS = (
    ("peft", "PEFT", {}, None),
    ("peft_compiled", "PEFT + torch.compile", {"compile": True}, PEFT_GOAL),
    ("peft_liger", "PEFT + Liger", {"liger": True}, PEFT_GOAL),
)


def run(ctx: c.Context, *, peft: bool | None = None, remat: bool | str = False) -> dict:
    import jax

    sz = ctx.size
    if remat:
        if "remat" not in {f.name for f in dataclasses.fields(sz.model)}:
            raise ValueError("This LlamaConfig has no `remat` option.")
        sz = dataclasses.replace(sz, model=dataclasses.replace(sz.model, remat=remat))
    # PEFT first, in its child process, while this process holds no large GPU buffers (JAX's
    # allocator keeps what it once took, so the other order could starve the child).
    peft = jax.default_backend() == "gpu" if peft is None else peft
    rows = {}
    for key, label, options, _ in PEERS:
        if peft:
            ctx.log(f"  {label} at the same config (child process)")
            rows[key] = peers.peft_row(dataclasses.replace(ctx, size=sz), None, **options)
        else:
            rows[key] = {"skipped": "PEFT runs on GPU (or with --peft)"}
    model = Llama(sz.model)
    batch = c.tokens(sz)
    ctx.log("  initializing the base")
    base = c.init_base(model, batch)
    ctx.log("  compiling the LoRA step")
    lora_model, params = finetune.lora_setup(model, base, batch, c.ALL_LINEAR, sz.rank)
    del base
    step, figures = finetune.lora_step(lora_model, params, batch, c.loss_for(sz))
    del params
    ctx.log("  timing")
    times = c.time_steps({"lora": step}, ctx.runs)["lora"]
    del step
    tokens_per_s = sz.tokens / (times["ms"] / 1e3)
    flops = c.model_flops_per_token(sz)
    device = jax.devices()[0].device_kind
    peak = c.peak_flops(device)
    row = {
        **figures,
        **times,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "model_tflops_per_s": flops["total"] * tokens_per_s / 1e12,
        "xla_tflops_per_s": figures["flops"] / (times["ms"] / 1e3) / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else flops["total"] * tokens_per_s / peak,
        "mfu_measured_peak": (
            flops["total"] * tokens_per_s / MEASURED_PEAK
            if jax.default_backend() == "gpu"
            else None
        ),
        "remat": remat,
        "chunked_loss": sz.chunked_loss,
    }
    for peer in rows.values():
        if "skipped" not in peer:
            peer["time_vs_lora_jax"] = c.ratio(peer["ms"], times["ms"])
            peer["lora_jax_speedup"] = c.ratio(tokens_per_s, peer["tokens_per_s"])
    return {
        "title": TITLE,
        "size": sz.describe(),
        "device": device,
        "lora": row,
        **rows,
    }


def markdown(result: dict) -> str:
    r = result["lora"]
    f = r["flops_per_token"]
    mfu = r["mfu"]
    pct = lambda v: "–" if v is None else f"{v:.1%}"
    verdict = (
        "–"
        if mfu is None
        else (
            f"{'met' if mfu >= MFU_GOAL else 'missed'} (goal {MFU_GOAL:.0%}, stretch {MFU_STRETCH:.0%})"
        )
    )
    out = [
        f"**{TITLE}** — {result['size']}, on {result['device']}"
        + ({True: ", block remat", False: ""}.get(r["remat"], f", remat policy {r['remat']}"))
        + (f", cross-entropy in chunks of {r['chunked_loss']} tokens" if r["chunked_loss"] else ""),
        "",
        "| | value |",
        "|---|---|",
        f"| step ms | {c.fmt(r['ms'])} |",
        f"| tokens/s | {c.fmt(r['tokens_per_s'], 0)} |",
        f"| model GFLOP per token (frozen 4N + adapters + attention) | {c.fmt(f['total'] / 1e9)} "
        f"({c.fmt(f['frozen'] / 1e9)} + {c.fmt(f['adapters'] / 1e9)} + {c.fmt(f['attention'] / 1e9)}) |",
        f"| model TFLOP/s | {c.fmt(r['model_tflops_per_s'], 1)} |",
        f"| XLA-counted TFLOP/s (cost_analysis) | {c.fmt(r['xla_tflops_per_s'], 1)} |",
        f"| MFU vs nominal peak ({c.fmt(r['peak_tflops'], 0)} TFLOP/s) | {pct(mfu)} {verdict} |",
        f"| MFU vs measured ~800 TFLOP/s | {pct(r['mfu_measured_peak'])} |",
        f"| compiled peak memory GB | {c.fmt(r['peak_bytes'] / 1e9)} |",
    ]
    for key, label, _, target in PEERS:
        peer = result.get(key)
        if peer is None:
            continue  # a result from before this peer
        if "skipped" in peer:
            out.append(f"| {label} tokens/s | {peer['skipped']} |")
            continue
        speedup = peer["lora_jax_speedup"]
        goal = (
            ""
            if target is None
            else f" ({'met' if speedup and speedup >= target else 'missed'}, goal {target})"
        )
        out += [
            f"| {label} {peer['peft']} (torch {peer['torch']}) tokens/s | "
            f"{c.fmt(peer['tokens_per_s'], 0)} |",
            f"| lora_jax / {label} tokens/s | {c.fmt(speedup)}{goal} |",
        ]
    return "\n".join(out)


def bars(result: dict):
    return [("MFU (nominal peak)", result["lora"]["mfu"], MFU_GOAL)] + [
        (f"lora_jax / {label} tokens/s", result.get(key, {}).get("lora_jax_speedup"), target)
        for key, label, _, target in PEERS
    ]
