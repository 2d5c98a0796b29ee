"""Runs the lora_jax benchmark suite and writes its results.

    python -m benchmarks.run --quick            # the CPU configuration, 5 rounds (< 3 min, 2 cores)
    python -m benchmarks.run                    # the same with more rounds
    python -m benchmarks.run --size 1b,3b       # on a GPU; `bash benchmarks/gpu.sh` runs it all

Cases (`--cases`, default: all but mfu on CPU, all on GPU):
  finetune    LoRA (q,v and all linear) vs full fine-tuning; trainable subtree vs whole tree
  quantized   QLoRA (NF4 + double quant) vs bf16 LoRA
  merge       lj.merge throughput vs a plain W + A@B loop
  peers       qwix LoRA/QLoRA, nnx.LoRALinear (all-Dense MLP), PEFT (GPU, child process)
  mfu         MFU of the LoRA step and tokens/s vs PEFT (on `--mfu-size`, default 8b)

Attention (`--attention`): the bf16 models are built with `LlamaConfig(attention="cudnn")`,
cuDNN's fused kernel, on GPU, and with "xla" elsewhere; float32 models always use "xla".

Writes `<out>/<machine>.json` (`<machine>-quick.json` with --quick) and the same name with
`.md` (the tables); `--out` defaults to `runs/benchmarks/`, outside the tracked files: the
committed results in `benchmarks/results/` and plots in `docs/img/` change only when someone
copies a run there (or passes `--out benchmarks/results --plots docs/img`). Results of earlier
runs in the file for other sizes or cases are kept, so that runs of one size at a time add
up. With `--plots DIR`, one PNG of ratios per case group.
Every figure is measured in this one run on this machine; compare ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback

import jax

from benchmarks import common as c
from benchmarks import report as rep
from benchmarks.cases import finetune, merge, mfu, peers, quantized

CASES = {"finetune": finetune, "quantized": quantized, "merge": merge, "peers": peers, "mfu": mfu}
QUICK_RUNS, FULL_RUNS = 5, 15
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join("runs", "benchmarks")  # never the tracked benchmarks/results


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} timed rounds per case")
    p.add_argument(
        "--size",
        default=None,
        help=f"comma-separated sizes from {sorted(c.SIZES)}; default: tiny on CPU, 1b on GPU",
    )
    p.add_argument("--cases", default=None, help=f"comma-separated, from {sorted(CASES)}")
    p.add_argument("--mfu-size", default="8b", help="the size of the mfu case (default 8b)")
    p.add_argument("--runs", type=int, default=None, help=f"timed rounds (at least {c.MIN_RUNS})")
    p.add_argument("--batch", type=int, default=None, help="override the size's batch")
    p.add_argument("--seq", type=int, default=None, help="override the size's sequence length")
    p.add_argument("--rank", type=int, default=None, help="override the LoRA rank")
    p.add_argument(
        "--peft",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the PyTorch PEFT peer (default: on GPU only)",
    )
    p.add_argument(
        "--remat",
        nargs="?",
        const=True,
        default=False,
        metavar="POLICY",
        help="mfu case: rematerialize each block (LlamaConfig.remat): wholly, or "
        "selectively with a jax.checkpoint_policies name, e.g. "
        "dots_with_no_batch_dims_saveable",
    )
    p.add_argument(
        "--attention",
        choices=c.ATTENTION,
        default=None,
        help="LlamaConfig.attention of the bf16 models: cuDNN's fused kernel ('cudnn', "
        "the default on GPU) or XLA's unfused attention ('xla', the default "
        "elsewhere); float32 models always use 'xla'",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="results directory")
    p.add_argument("--plots", default=None, help="write one PNG per case group here")
    p.add_argument("--fresh", action="store_true", help="do not keep earlier results in the file")
    p.add_argument("--name", default=None, help="results file name (default: the machine's)")
    args = p.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    args.sizes = (args.size or ("1b" if gpu else "tiny")).split(",")
    default_cases = list(CASES) if gpu else [k for k in CASES if k != "mfu"]
    args.case_list = args.cases.split(",") if args.cases else default_cases
    unknown = [k for k in args.case_list if k not in CASES] + [
        s for s in args.sizes if s not in c.SIZES
    ]
    if unknown:
        p.error(f"unknown case or size {unknown}; cases {sorted(CASES)}, sizes {sorted(c.SIZES)}")
    args.runs = max(args.runs or (QUICK_RUNS if args.quick else FULL_RUNS), c.MIN_RUNS)
    args.attention = args.attention or c.default_attention()
    if args.attention == "cudnn" and not gpu:
        p.error("--attention cudnn needs a GPU (cuDNN's fused attention)")
    return args


def _load(path: str, fresh: bool) -> dict:
    if fresh or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write(report: dict, base: str, plots: str | None) -> None:
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(base + ".md", "w") as f:
        f.write(rep.markdown_all(report))
    if plots:
        prefix = report["machine"]["backend"] + ("-quick" if report["mode"] == "quick" else "")
        rep.plot_all(report, plots, prefix)


def main(argv=None) -> dict:
    args = parse(argv)
    info = c.machine()
    info["attention"] = args.attention  # LlamaConfig.attention of the bf16 models
    info["fused_attention"] = args.attention == "cudnn"  # the report's header says so
    name = args.name or c.machine_slug(info) + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, name)
    report = _load(base + ".json", args.fresh)
    report.update(
        machine=info,
        mode="quick" if args.quick else "full",
        runs=args.runs,
        command="python -m benchmarks.run "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    )
    report.setdefault("sizes", {})
    print(
        f"JAX {info['jax']} on {info['backend']} ({info['device_kind']}); {args.runs} rounds; "
        f"results -> {base}.json",
        flush=True,
    )
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True)
    for size_name in args.sizes:
        cache: dict = {}  # base weights and compiled LoRA steps, shared by the cases of a size
        for case in args.case_list:
            sname = args.mfu_size if case == "mfu" else size_name
            if (
                case == "mfu"
                and sname in report["sizes"]
                and "mfu" in report["sizes"][sname]
                and len(args.sizes) > 1
                and size_name != args.sizes[0]
            ):
                continue  # the mfu case has its own size: run it once
            sz = c.size(
                sname, batch=args.batch, seq=args.seq, rank=args.rank, attention=args.attention
            )
            ctx = c.Context(
                size=sz,
                runs=args.runs,
                quick=args.quick,
                log=log,
                cache=cache if case != "mfu" else {},
            )
            log(f"[{sname}] {case}: {sz.describe()}")
            start = time.perf_counter()
            try:
                kwargs = {}
                if case in ("peers", "mfu"):
                    kwargs["peft"] = args.peft
                if case == "mfu":
                    kwargs["remat"] = args.remat
                result = CASES[case].run(ctx, **kwargs)
            except Exception as e:  # one failing case must not lose the others
                traceback.print_exc()
                result = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            result["seconds"] = round(time.perf_counter() - start, 1)
            result["date"] = info["date"]
            report["sizes"].setdefault(sname, {})[case] = result
            _write(report, base, args.plots)
            log(f"  done in {result['seconds']} s")
            log(rep.case_markdown(case, result))
    print(f"wrote {base}.json and {base}.md" + (f"; plots in {args.plots}" if args.plots else ""))
    return report


if __name__ == "__main__":
    main()
