"""`lora_jax.memory.estimate_memory` against XLA's compiled memory analysis, on CPU-sized models.

For each configuration, the real train step is compiled (`lj.make_train_step` for LoRA and
QLoRA; for full fine-tuning a jitted value_and_grad + optax update with the parameters and the
optimizer state donated, as benchmarks/cases/finetune.py does) and its `memory_analysis()`
is read; the estimate is made from shapes alone. Compared, in MiB:

  state        arguments + outputs - aliased (XLA)   vs  persistent (weights, optimizer state,
                                                         token ids) of the estimate
  temporaries  temp_size_in_bytes (XLA)              vs  max(activations, gradients) +
                                                         workspace (activations + gradients
                                                         + workspace under nn.scan)
  peak         arguments + outputs + temp - aliased  vs  the estimate's peak

`peak` is the figure the rest of the suite calls peak (benchmarks/common.py:
compiled_figures): everything the step holds while it runs, donated buffers counted once. The
CPU backend's own `peak_memory_in_bytes` reports the arguments only, so it is not used.

The target is |peak ratio - 1| <= 0.15 for the configurations marked "held"; the others are
measured to show where XLA on CPU departs from what the step asks for (float32 upcasts of
bfloat16 arithmetic; rematerialization of unrolled blocks merged back into the forward pass),
and are reported as such.

Run: python -m benchmarks.memory_check [--only NAME,...] [--out runs/benchmarks]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases.finetune import full_step
from lora_jax.memory import DEFAULT_LORA, estimate_memory
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

TARGET = 0.15


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: LlamaConfig
    batch: int
    seq: int
    mode: str
    optimizer: str = "adamw"
    held: bool = True  # held to the ±15% target
    note: str = ""


SMALL = LlamaConfig.small()  # 3.2M parameters, float32
OPTIMIZERS = {"adamw": lambda: optax.adamw(1e-4), "sgd": lambda: optax.sgd(1e-3)}
CASES = [
    Case("full", SMALL, 4, 128, "full"),
    Case("full-sgd", SMALL, 4, 128, "full", optimizer="sgd"),
    Case("lora", SMALL, 4, 128, "lora"),
    Case("qlora", SMALL, 4, 128, "qlora"),
    Case("lora-vocab4k-s256", LlamaConfig.small(vocab_size=4096), 2, 256, "lora"),
    Case("full-scan-remat", LlamaConfig.small(scan_layers=True, remat=True), 4, 128, "full"),
    Case("lora-scan-remat", LlamaConfig.small(scan_layers=True, remat=True), 4, 128, "lora"),
    Case("lora-scan", LlamaConfig.small(scan_layers=True), 4, 128, "lora"),
    Case(
        "lora-remat-unrolled",
        LlamaConfig.small(remat=True),
        4,
        128,
        "lora",
        held=False,
        note="with unrolled blocks, XLA:CPU's compiled step keeps about what the step without "
        "remat keeps (compare the lora row): the recomputation is not kept apart from the "
        "forward pass; under nn.scan it is (the scan-remat rows)",
    ),
    Case(
        "lora-bf16",
        LlamaConfig.small(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        4,
        128,
        "lora",
        held=False,
        note="XLA:CPU computes bfloat16 arithmetic in float32: the compiled step holds float32 "
        "arrays of the activations' shapes, the estimate counts them in bfloat16",
    ),
]


def loss_fn(apply, batch):
    """The loss that `estimate_memory` traces: mean next-token cross-entropy."""
    return causal_lm_loss(apply(batch["inputs"]), batch["targets"])


def compiled_step(case: Case):
    """Compiles the case's real train step for abstract arguments (nothing is allocated or
    run: the parameters, optimizer state and batch are `jax.ShapeDtypeStruct`s from the
    same init code); returns its compiled figures (`benchmarks.common.compiled_figures`)."""
    model = Llama(case.config)
    ids = jax.ShapeDtypeStruct((case.batch, case.seq), jnp.int32)
    batch = {"inputs": ids, "targets": ids}
    key = jax.random.key(0)
    tx = OPTIMIZERS[case.optimizer]()
    if case.mode == "full":
        base = jax.eval_shape(model.init, key, ids)
        lowered = full_step(model, loss_fn, tx).lower(base, jax.eval_shape(tx.init, base), batch)
    else:
        quantize = lj.QuantConfig(compute_dtype=case.config.dtype) if case.mode == "qlora" else None
        lora_model = lj.LoRA(model, dataclasses.replace(DEFAULT_LORA, quantize=quantize))
        params = jax.eval_shape(lambda k: lj.init(lora_model, k, ids), key)
        step = lj.make_train_step(lora_model, loss_fn, tx)
        lowered = step.lower(params, jax.eval_shape(step.init, params), batch)
    start = time.perf_counter()
    figures = c.compiled_figures(lowered.compile())
    figures["compile_s"] = time.perf_counter() - start
    return figures


def check(case: Case) -> dict:
    start = time.perf_counter()
    est = estimate_memory(
        case.config,
        batch=case.batch,
        seq=case.seq,
        mode=case.mode,
        optimizer=OPTIMIZERS[case.optimizer](),
    )
    estimate_s = time.perf_counter() - start
    xla = compiled_step(case)
    ratio = lambda a, b: a / b if b else None
    row = {
        "name": case.name,
        "mode": case.mode,
        "optimizer": case.optimizer,
        "batch": case.batch,
        "seq": case.seq,
        "params": case.config.num_params(),
        "dtype": jnp.dtype(case.config.dtype).name,
        "scan_layers": case.config.scan_layers,
        "remat": case.config.remat,
        "held": case.held,
        "note": case.note,
        "estimate": {
            **{f.name: getattr(est, f.name) for f in dataclasses.fields(est)},
            "persistent": est.persistent,
            "temporaries": est.temporaries,
            "peak": est.peak,
            "total": est.total,
        },
        "estimate_s": estimate_s,
        "xla": xla,
        "state_ratio": ratio(est.persistent, xla["state_bytes"]),
        "temp_ratio": ratio(est.temporaries, xla["temp_bytes"]),
        "peak_ratio": ratio(est.peak, xla["peak_bytes"]),
    }
    row["within"] = abs(row["peak_ratio"] - 1) <= TARGET
    return row


def markdown(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:,.2f}"
    out = [
        "| case | params | batch × seq | state MiB est / XLA | ratio | temp MiB est / XLA | ratio "
        "| peak MiB est / XLA | ratio | within ±15% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, x = r["estimate"], r["xla"]
        verdict = ("yes" if r["within"] else "no") + ("" if r["held"] else " (not held)")
        out.append(
            f"| {r['name']} ({r['dtype']}, {r['optimizer']}) | {r['params'] / 1e6:.1f}M "
            f"| {r['batch']} × {r['seq']} | {mib(e['persistent'])} / {mib(x['state_bytes'])} "
            f"| {r['state_ratio']:.3f} | {mib(e['temporaries'])} / {mib(x['temp_bytes'])} "
            f"| {r['temp_ratio']:.3f} | {mib(e['peak'])} / {mib(x['peak_bytes'])} "
            f"| {r['peak_ratio']:.3f} | {verdict} |"
        )
    out.append("")
    out.append(
        "Terms of the estimate (MiB): "
        + "; ".join(
            f"{r['name']}: activations {mib(r['estimate']['activations'])}, gradients "
            f"{mib(r['estimate']['gradients'])}, workspace {mib(r['estimate']['workspace'])}"
            for r in rows
        )
    )
    notes = [f"- {r['name']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(out + (["", "Not held to the target:", *notes] if notes else []))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", default=None, help="comma-separated case names")
    p.add_argument("--out", default=os.path.join("runs", "benchmarks"), help="results directory")
    args = p.parse_args(argv)
    names = [k.name for k in CASES]
    wanted = args.only.split(",") if args.only else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"--only: unknown cases {unknown}; known: {names}")
    info = c.machine()
    print(f"JAX {info['jax']} on {info['backend']} ({info['cpu']}, {info['cpu_cores']} cores)")
    rows = []
    for case in CASES:
        if case.name in wanted:
            rows.append(check(case))
            r = rows[-1]
            print(
                f"  {case.name}: peak estimate / XLA {r['peak_ratio']:.3f} "
                f"(compile {r['xla']['compile_s']:.1f} s, estimate {r['estimate_s']:.1f} s)",
                flush=True,
            )
    print(markdown(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"memory_check-{c.machine_slug(info)}.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "target": TARGET, "rows": rows}, f, indent=1, default=str)
    print(f"wrote {path}")
    held = [r for r in rows if r["held"]]
    return {"rows": rows, "held_within": sum(r["within"] for r in held), "held": len(held)}


if __name__ == "__main__":
    main()
