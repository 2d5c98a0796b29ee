"""The train-step overhead of the adapter variants against plain LoRA, on the reference model.

One base model (random weights, `benchmarks.common.init_base`) of the size's configuration;
for each config below, LoRA with the same rank r (the size's) and the same targets, built
from that base with `lj.init(..., base_params=base)`, and the `lj.make_train_step` step with
AdamW (`lj.optimizer`), the trainable subtree and the optimizer state donated, as
benchmarks/cases/finetune.py builds it:

  lora    lj.LoraConfig(rank=r, alpha=2r, targets=T): the reference of every ratio
  dora    the same with variant="dora": a trainable magnitude per output feature rescales
          the adapted kernel's columns by m / ‖W + scale · A @ B‖_col, so each step also
          forms A @ B, the column norms of the sum and the rescaling (an extra cost per step)
  pissa   the same with init="pissa": only the initial A, B and the (residual) base differ,
          so the step is the lora step on other numbers; a sanity row that should read 1.0

The steps are compiled, then timed round-robin in one run (`benchmarks.common.time_steps`:
one warm-up call each, then one call of each per round; the figure is the median); memory is
the compiled step's peak (arguments + outputs + temporaries - aliased,
`benchmarks.common.compiled_figures`). Compare the ratios, not the milliseconds.

Writes `<out>/variants-<targets>-<size>.json` (with the machine's description).

Run: python -m benchmarks.variants [--size NAME] [--runs N] [--targets qv|all] [--out runs/benchmarks]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases.finetune import lora_step
from lora_jax.models import Llama

TARGETS = {"all": c.ALL_LINEAR, "qv": c.QV}
CONFIGS = {  # name -> LoraConfig fields on top of rank, alpha and targets
    "lora": {},
    "dora": {"variant": "dora"},
    "pissa": {"init": "pissa"},
}
DEFAULT_RUNS = 30


def default_size() -> str:
    """The suite's default size (benchmarks/run.py): tiny on CPU, 1b on GPU."""
    return "1b" if jax.default_backend() == "gpu" else "tiny"


def peft_dora(sz: c.Size, targets: tuple[str, ...], runs: int, log=print) -> dict:
    """PEFT's DoRA step over its LoRA step at the same config, eager PyTorch: each timed in
    its own child process (benchmarks/torch_peft.py), LoRA and DoRA alternating, two rounds;
    the ratio of the medians."""
    from benchmarks.cases import peers

    ctx = c.Context(size=sz, runs=runs, log=log)
    out: dict = {"lora_ms": [], "dora_ms": []}
    for _ in range(2):
        for name in ("lora", "dora"):
            log(f"  PEFT {name} (child process)")
            row = peers.peft_row(ctx, None, targets, use_dora=name == "dora")
            if "skipped" in row:
                return {"skipped": row["skipped"]}
            out[f"{name}_ms"].append(round(row["ms"], 2))
            out["torch"] = row.get("torch")
    out["dora_over_lora"] = statistics.median(out["dora_ms"]) / statistics.median(out["lora_ms"])
    return out


def measure(sz: c.Size, targets: tuple[str, ...], runs: int, log=print) -> dict:
    """Builds, compiles and times the configs' steps on one base model; returns the rows."""
    model = Llama(sz.model)
    batch = c.tokens(sz)
    base = c.init_base(model, batch)
    loss = c.loss_for(sz)
    steps, rows = {}, {}
    for name, fields in CONFIGS.items():
        cfg = lj.LoraConfig(rank=sz.rank, alpha=2.0 * sz.rank, targets=targets, **fields)
        lora_model = lj.LoRA(model, cfg)
        start = time.perf_counter()
        params = lj.init(lora_model, jax.random.key(2), batch[:, :-1], base_params=base)
        init_s = time.perf_counter() - start
        log(f"  compiling {name} (init {init_s:.1f} s)")
        steps[name], figures = lora_step(lora_model, params, batch, loss)
        trainable, _ = lj.partition(params)
        rows[name] = {
            **figures,
            "init_s": init_s,
            "trainable_bytes": c.nbytes(trainable),
            "param_bytes": c.nbytes(params["params"]),
        }
        del params, trainable  # the step holds its own copies (the trainable ones are donated)
    log(f"  timing {len(steps)} steps x {max(runs, c.MIN_RUNS)} rounds, round-robin")
    times = c.time_steps(steps, runs)
    ref = {**rows["lora"], **times["lora"]}
    for name, row in rows.items():
        row.update(times[name])
        row["time_ratio"] = c.ratio(row["ms"], ref["ms"])
        row["memory_ratio"] = c.ratio(row["peak_bytes"], ref["peak_bytes"])
        row["state_ratio"] = c.ratio(row["state_bytes"], ref["state_bytes"])
        row["flops_ratio"] = c.ratio(row["flops"], ref["flops"])
        row["trainable_ratio"] = c.ratio(row["trainable_bytes"], ref["trainable_bytes"])
        row["tokens_per_s"] = sz.tokens / (row["ms"] / 1e3)
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    out = [
        f"**Adapter variants vs LoRA ({result['targets']})** — {result['size']}",
        "",
        "| config | ms (median) | min–max ms | time / lora | peak MB | peak / lora "
        "| XLA GFLOP | FLOPs / lora | trainable MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        out.append(
            f"| {name} | {c.fmt(r['ms'])} | {c.fmt(r['ms_min'])}–{c.fmt(r['ms_max'])} "
            f"| {c.fmt(r['time_ratio'], 3)} | {c.fmt(c.mb(r['peak_bytes']), 1)} "
            f"| {c.fmt(r['memory_ratio'], 3)} | {c.fmt(r['flops'] / 1e9)} "
            f"| {c.fmt(r['flops_ratio'], 3)} | {c.fmt(c.mb(r['trainable_bytes']), 2)} |"
        )
    out += [
        "",
        f"Timed round-robin in one run, {result['runs']} rounds after one warm-up call each; "
        "peak = arguments + outputs + temporaries - aliased of the compiled step.",
    ]
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--size",
        default=None,
        help=f"one of {sorted(c.SIZES)}; default: the suite's (tiny on CPU, 1b on GPU)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        help=f"timed rounds (default {DEFAULT_RUNS}, at least {c.MIN_RUNS})",
    )
    p.add_argument(
        "--targets",
        choices=sorted(TARGETS),
        default="all",
        help="LoRA targets: every linear layer of the blocks (all, default) or q_proj, v_proj (qv)",
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="also time PEFT's LoRA and DoRA steps at the same config (torch, transformers and "
        "peft installed), in child processes, alternating, two rounds each",
    )
    p.add_argument("--out", default=os.path.join("runs", "benchmarks"), help="results directory")
    args = p.parse_args(argv)
    size_name = args.size or default_size()
    if size_name not in c.SIZES:
        p.error(f"--size: unknown size {size_name!r}; known: {sorted(c.SIZES)}")
    runs = max(args.runs, c.MIN_RUNS)
    sz = c.size(size_name, attention=c.default_attention())
    info = c.machine()
    print(f"JAX {info['jax']} on {info['backend']} ({info['device_kind']}); {runs} rounds")
    print(sz.describe(), flush=True)
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True)
    rows = measure(sz, TARGETS[args.targets], runs, log)
    peft = peft_dora(sz, TARGETS[args.targets], runs, log) if args.peft else None
    wall_s = time.perf_counter() - t0
    result = {
        "title": "Adapter variants vs LoRA",
        "size_name": size_name,
        "size": sz.describe(),
        "targets": args.targets,
        "target_modules": list(TARGETS[args.targets]),
        "rank": sz.rank,
        "alpha": 2.0 * sz.rank,
        "runs": runs,
        "wall_s": wall_s,
        "machine": info,
        "rows": rows,
        "peft": peft,
    }
    print(markdown(result))
    if peft is not None:
        print(
            f"PEFT (torch {peft.get('torch')}, eager): DoRA step / LoRA step "
            f"{c.fmt(peft.get('dora_over_lora'))} (LoRA runs {peft.get('lora_ms')} ms, DoRA "
            f"{peft.get('dora_ms')} ms)"
        )
    path = c.write_json(args.out, f"variants-{args.targets}-{size_name}.json", result)
    print(f"wrote {path} ({wall_s:.1f} s)")
    return result


if __name__ == "__main__":
    main()
