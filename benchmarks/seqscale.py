"""Sequence scaling of the LoRA step: tokens/s and compiled peak memory against the sequence
length, under each rematerialization policy.

One base model (random weights, `benchmarks.common.init_base`) of the size's configuration
(on GPU: Llama-3-8B shapes, bf16, cross-entropy in chunks of 1024 tokens); LoRA of the size's
rank on every linear layer of the blocks; AdamW; the `lj.make_train_step` step, built as
benchmarks/cases/finetune.py builds it, for a batch of `--batch` sequences of each length in
`--seqs`, under each policy in `--remat`:

  none     no rematerialization: every block's activations are kept for the backward pass
  block    LlamaConfig(remat=True): each block recomputed whole in the backward pass
  POLICY   LlamaConfig(remat=POLICY), a `jax.checkpoint_policies` name (selective: e.g.
           dots_with_no_batch_dims_saveable keeps the products with the weights and recomputes
           the rest)

Layers run under `nn.scan` by default (`--no-scan-layers` unrolls them): one compiled block,
so that the many compiles of the sweep fit a lent machine's time (an unrolled 8B step
compiles in about a minute). Each configuration is compiled, run once, then timed for
`--runs` calls (median); its row is written as soon as it is measured (a run stopped at a time
limit keeps what it finished). The lengths run shortest first, each under every policy, so a
stopped run has the short lengths of every policy. A configuration that does not fit the
device's memory is recorded as such, and longer lengths under that policy are skipped.

peak = arguments + outputs + temporaries - aliased of the compiled step
(`benchmarks.common.compiled_figures`); tokens/s = batch x length / the median step time.

Writes `<out>/seqscale-<size>.json` and prints a Markdown table.

Run: python -m benchmarks.seqscale [--size NAME] [--seqs 1024,2048,...] [--batch 1]
                                   [--remat none,block,dots_with_no_batch_dims_saveable]
                                   [--runs 5] [--no-scan-layers] [--out runs/benchmarks]
                                   [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases.finetune import lora_step
from lora_jax.models import REMAT_POLICIES, Llama

DEFAULT_REMAT = ("none", "block", "dots_with_no_batch_dims_saveable")
DEFAULT_SEQS = {"gpu": (1024, 2048, 4096, 8192, 16384, 32768), "cpu": (128, 256, 512, 1024, 2048)}


def remat_field(policy: str) -> bool | str:
    """`LlamaConfig.remat` for a policy name of this script."""
    return {"none": False, "block": True}.get(policy, policy)


def is_out_of_memory(error: Exception) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure(sz: c.Size, seqs, policies, batch: int, runs: int, scan: bool, write, log=print):
    """Measures every (length, policy) that fits; calls `write(rows)` after each one."""
    longest = max(seqs)
    model_cfg = dataclasses.replace(
        sz.model, scan_layers=scan, max_seq_len=max(sz.model.max_seq_len, longest)
    )
    sized = lambda seq, policy: dataclasses.replace(
        sz, batch=batch, seq=seq, model=dataclasses.replace(model_cfg, remat=remat_field(policy))
    )
    first = sized(min(seqs), "none")
    lora_cfg = lj.LoraConfig(rank=sz.rank, alpha=2.0 * sz.rank, targets=c.ALL_LINEAR)
    # The parameters depend on neither the length nor the policy: made once.
    log("  initializing the base and the adapters")
    model, first_ids = Llama(first.model), c.tokens(first)
    base = c.init_base(model, first_ids)
    params = lj.init(
        lj.LoRA(model, lora_cfg), jax.random.key(2), first_ids[:, :-1], base_params=base
    )
    del base  # `params` holds the same arrays
    rows: dict[str, dict[str, dict]] = {policy: {} for policy in policies}
    failed: set[str] = set()
    for seq in sorted(seqs):
        for policy in policies:
            if policy in failed:
                rows[policy][str(seq)] = {"skipped": "a shorter length did not fit"}
                continue
            s = sized(seq, policy)
            batch_ids = c.tokens(s)
            lora_model = lj.LoRA(Llama(s.model), lora_cfg)
            log(f"  seq {seq}, remat {policy}: compiling")
            step = None
            try:  # the step copies the trainable leaves it donates: `params` stays whole
                step, figures = lora_step(lora_model, params, batch_ids, c.loss_for(s))
                times = c.time_steps({"step": step}, runs)["step"]
                step = None
            except Exception as e:  # recorded in the row if out of memory; the sweep goes on
                step = None  # free the device memory before the next configuration
                if not is_out_of_memory(e):
                    raise
                failed.add(policy)
                rows[policy][str(seq)] = {"error": "out of memory", "detail": str(e)[:300]}
                log(f"    out of memory: {str(e)[:120]}")
                write(rows)
                continue
            row = {**figures, **times, "tokens_per_s": s.tokens / (times["ms"] / 1e3)}
            rows[policy][str(seq)] = row
            log(
                f"    {row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_bytes'] / 1e9:.2f} GB, "
                f"compiled in {row['compile_s']:.1f} s"
            )
            write(rows)
    return rows


def markdown(result: dict) -> str:
    policies = list(result["rows"])
    seqs = sorted({int(s) for p in policies for s in result["rows"][p]})
    head = " | ".join(f"{p}: tokens/s | {p}: peak MB" for p in policies)
    out = [
        f"**Sequence scaling of the LoRA step** — {result['size']}, all linear layers, "
        f"{'layers under nn.scan' if result['scan_layers'] else 'layers unrolled'}",
        "",
        f"| tokens per sequence | {head} |",
        "|---|" + "---|---|" * len(policies),
    ]
    for seq in seqs:
        cells = []
        for p in policies:
            r = result["rows"][p].get(str(seq))
            if r is None:
                cells += ["not run", ""]
            elif "error" in r or "skipped" in r:
                cells += [r.get("error") or r["skipped"], ""]
            else:
                cells += [f"{r['tokens_per_s']:,.0f}", f"{c.mb(r['peak_bytes']):,.1f}"]
        out.append(f"| {seq} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"Batch {result['batch']}; median of {result['runs']} steps after one warm-up call; "
        "peak = arguments + outputs + temporaries - aliased of the compiled step.",
    ]
    return "\n".join(out)


def plot(result: dict, path: str) -> bool:
    """Two panels against the length (log scale): tokens/s and compiled peak, one line per
    policy. False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for policy, rows in result["rows"].items():
        done = sorted((int(s), r) for s, r in rows.items() if "tokens_per_s" in r)
        seqs = [s for s, _ in done]
        axes[0].plot(seqs, [r["tokens_per_s"] for _, r in done], marker="o", label=policy)
        axes[1].plot(seqs, [c.mb(r["peak_bytes"]) for _, r in done], marker="o", label=policy)
    for ax, label in zip(axes, ("tokens/s", "compiled peak, MB"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(title="remat", fontsize=7, title_fontsize=7)
    machine = result["machine"]
    where = machine["device_kind"] if machine["backend"] != "cpu" else machine["cpu"]
    fig.suptitle(f"{result['size']}\n{where}, JAX {machine['jax']}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    gpu = jax.default_backend() == "gpu"
    p.add_argument("--size", default=None, help="default: 8b on GPU, h512 on CPU")
    p.add_argument("--seqs", default=None, help="comma-separated lengths (default: 1k-32k on GPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--remat",
        default=",".join(DEFAULT_REMAT),
        help=f"comma-separated: none, block, or of {REMAT_POLICIES}",
    )
    p.add_argument("--runs", type=int, default=c.MIN_RUNS)
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=os.path.join("runs", "benchmarks"), help="results directory")
    p.add_argument("--plot", default=None, help="also draw the two curves into this PNG")
    args = p.parse_args(argv)
    size_name = args.size or ("8b" if gpu else "h512")
    if size_name not in c.SIZES:
        p.error(f"--size: unknown size {size_name!r}; known: {sorted(c.SIZES)}")
    policies = [x for x in args.remat.split(",") if x]
    unknown = [x for x in policies if x not in ("none", "block", *REMAT_POLICIES)]
    if unknown:
        p.error(f"--remat: unknown {unknown}; choose none, block or of {REMAT_POLICIES}")
    default_seqs = DEFAULT_SEQS["gpu" if gpu else "cpu"]
    seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else list(default_seqs)
    runs = max(args.runs, c.MIN_RUNS)
    sz = c.size(size_name, attention=c.default_attention())
    info = c.machine()
    print(f"JAX {info['jax']} on {info['backend']} ({info['device_kind']}); {runs} steps each")
    result = {
        "title": "Sequence scaling of the LoRA step",
        "size_name": size_name,
        "size": dataclasses.replace(sz, batch=args.batch, seq=max(seqs)).describe(),
        "batch": args.batch,
        "seqs": seqs,
        "remat": policies,
        "scan_layers": args.scan_layers,
        "runs": runs,
        "machine": info,
        "rows": {},
    }
    name = f"seqscale-{size_name}.json"

    def write(rows):
        result["rows"] = rows
        c.write_json(args.out, name, result)

    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.1f}s] {s}", flush=True)
    measure(sz, seqs, policies, args.batch, runs, args.scan_layers, write, log)
    result["wall_s"] = time.perf_counter() - t0
    write(result["rows"])
    print(markdown(result))
    print("wrote", os.path.join(args.out, name))
    if args.plot and plot(result, args.plot):
        print("wrote", args.plot)
    return result


if __name__ == "__main__":
    main()
