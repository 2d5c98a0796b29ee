"""Choosing the LoRA rank: the main example's task at ranks 1 to 64, scaled by alpha / r and by
alpha / sqrt(r) (rsLoRA), at one learning rate (or several).

Each run fine-tunes the same base on the same data as examples/finetune_lm.py (SmolLM2 and the
date task by default; every finetune_lm flag but --rank/--alpha/--lr/--seed/--rslora passes
through, e.g. --model tiny for the quick path) and records held-out exact match and loss, the
trainable parameters and the effective rank of what the adapters learned
(`lora_jax.analysis`). Its adapter is saved under OUT/<run>/adapter (lora_jax files), for
`python -m lora_jax.analysis`. Results accumulate in OUT/results.json: a second invocation
with other ranks, seeds or learning rates adds to the same table and a run already there is
not repeated. At the end: a table, a plot (OUT/rank_sweep.png) and a recommendation, the
smallest rank whose result is within --tolerance of the best.

The two scalings agree at rank 8 (the main example's default, scale 2): alpha = 16 under
alpha / r, alpha = 16 / sqrt(8) under rsLoRA. Away from rank 8, alpha / r shrinks the update
as the rank grows, rsLoRA much less, which is why the best learning rate drifts with the rank
under alpha / r (Kalajdzievski 2023); run several --lrs to see whether it does on this task.
At rank 8 the two scalings are the same run, made once.

Run: python examples/rank_sweep.py                          (12 runs of about 2 minutes)
     python examples/rank_sweep.py --ranks 1,8,64 --lrs 5e-4,8e-3
     python examples/rank_sweep.py --model tiny --ranks 1,4 --steps 20   (the quick path)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' own modules

import finetune_lm
import jax
import numpy as np
import optax
import toy_lm
import training

import lora_jax as lj
from lora_jax import analysis

SCALINGS = {"alpha_r": "alpha / r", "rslora": "alpha / sqrt(r) (rsLoRA)"}
REFERENCE_RANK, REFERENCE_SCALE = 8, 2.0  # both scalings give scale 2 at rank 8
TWIN = {"alpha_r": "rslora", "rslora": "alpha_r"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The sweep's own flags, and the finetune_lm flags for everything else."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=training.HelpFormatter, allow_abbrev=False
    )  # no abbreviations: --rank must not be read as --ranks
    p.add_argument("--ranks", default="1,2,4,8,16,64", help="comma-separated ranks")
    p.add_argument("--lrs", default="2e-3", help="comma-separated peak learning rates")
    p.add_argument(
        "--scalings", default="alpha_r,rslora", help=f"comma-separated, of {', '.join(SCALINGS)}"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (adapter init, data order)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="recommend the smallest rank within this of the best (accuracy points, or nats)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/rank_sweep"), help="output directory")
    own, rest = p.parse_known_args(argv)
    for flag in ("--rank", "--alpha", "--lr", "--seed", "--rslora", "--resume", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            p.error(f"{flag} is set by the sweep (see --ranks, --lrs, --seeds, --scalings)")
    try:
        own.ranks = [int(r) for r in own.ranks.split(",")]
        own.lrs = [float(x) for x in own.lrs.split(",")]
        own.seeds = [int(s) for s in own.seeds.split(",")]
    except ValueError as e:
        p.error(f"--ranks, --lrs and --seeds take comma-separated numbers: {e}")
    own.scalings = own.scalings.split(",")
    bad = [s for s in own.scalings if s not in SCALINGS]
    if bad or any(r < 1 for r in own.ranks) or any(x <= 0 for x in own.lrs):
        p.error(
            f"--scalings must be of {', '.join(SCALINGS)} (got {', '.join(bad) or 'those'}); "
            "ranks and learning rates must be positive"
        )
    return own, finetune_lm.parse_args([*rest, "--out", str(own.out)])


def alpha_for(scaling: str) -> float:
    """Alpha that makes the scale REFERENCE_SCALE at REFERENCE_RANK under `scaling`."""
    root = scaling == "rslora"
    return REFERENCE_SCALE * (math.sqrt(REFERENCE_RANK) if root else REFERENCE_RANK)


def run_name(scaling: str, rank: int, lr: float, seed: int) -> str:
    return f"{scaling}-r{rank}-lr{lr:g}-s{seed}"


def run(task: Any, base: Any, args: argparse.Namespace, out: Path) -> dict:
    """One fine-tune at args' rank/alpha/lr/seed: its figures, and its adapter saved in `out`."""
    cfg = finetune_lm.lora_config(args)
    lora_model = lj.LoRA(task.model, cfg)
    key = jax.random.key(args.seed)
    params = lj.init(lora_model, jax.random.fold_in(key, 1), task.sample, base_params=base)
    tx = lj.optimizer(optax.adamw(finetune_lm.schedule(args.lr, args.steps)), params)
    step = lj.make_train_step(lora_model, task.loss_fn, tx)
    task.args.seed = args.seed  # the batch order; the held-out split was drawn once, at seed 0
    begin = time.perf_counter()
    params, _, losses = training.train(
        step, params, step.init(params), task.batches(0), steps=args.steps,
        desc=out.name, tokens_per_step=task.tokens_per_step,
    )  # fmt: skip
    seconds = time.perf_counter() - begin
    metric, _ = task.evaluate(lora_model, params)
    reports = analysis.adapter_report(params, with_amplification=False).values()
    lj.save_adapter(out / "adapter", params, cfg)
    return {
        "metric": metric,
        "held_out_loss": task.held_out_loss(lora_model, params),
        "final_train_loss": float(np.mean([loss for _, loss in losses[-10:]])),
        "trainable": lj.summary(params).trainable_params,
        "stable_rank": float(np.mean([float(r.stable_rank.mean()) for r in reports])),
        "entropy_rank": float(np.mean([float(r.entropy_rank.mean()) for r in reports])),
        "rank_90": float(np.mean([float(r.rank_90.mean()) for r in reports])),
        "train_seconds": seconds,
    }


def sweep(own: argparse.Namespace, args: argparse.Namespace) -> dict:
    """Runs every (scaling, rank, lr, seed) not yet in OUT/results.json; returns them all."""
    own.out.mkdir(parents=True, exist_ok=True)
    path = own.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    todo = [
        (scaling, rank, lr, seed)
        for scaling in own.scalings
        for rank in own.ranks
        for lr in own.lrs
        for seed in own.seeds
        if run_name(scaling, rank, lr, seed) not in results["runs"]
    ]
    if not todo and "base" in results:
        return results
    args.seed = 0
    task = finetune_lm.DateTask(args) if args.model == "smollm2" else toy_lm.Task(args)
    base = task.base(False)
    results["metric"] = {"name": task.metric, "higher_is_better": task.higher_is_better}
    if "base" not in results:
        lora_model = lj.LoRA(task.model, finetune_lm.lora_config(args))
        params = lj.init(lora_model, jax.random.key(0), task.sample, base_params=base)
        results["base"] = {
            "metric": task.evaluate(lora_model, params)[0],  # adapters at zero: the base model
            "held_out_loss": task.held_out_loss(lora_model, params),
        }
    for i, (scaling, rank, lr, seed) in enumerate(todo):
        name = run_name(scaling, rank, lr, seed)
        twin = run_name(TWIN[scaling], rank, lr, seed)
        if rank == REFERENCE_RANK and twin in results["runs"]:  # the same scale: the same run
            results["runs"][name] = {**results["runs"][twin], "scaling": scaling, "same_as": twin}
            path.write_text(json.dumps(results, indent=1))
            print(f"[{i + 1}/{len(todo)}] {name}: the same run as {twin} (scale 2 under both)")
            continue
        print(f"[{i + 1}/{len(todo)}] {name}")
        args.rank, args.lr, args.seed = rank, lr, seed
        args.alpha, args.rslora = alpha_for(scaling), scaling == "rslora"
        figures = run(task, base, args, own.out / name)
        results["runs"][name] = {"scaling": scaling, "rank": rank, "lr": lr, "seed": seed,
                                 "alpha": args.alpha, **figures}  # fmt: skip
        path.write_text(json.dumps(results, indent=1))  # after every run: a crash loses one
    return results


def _better(results: dict) -> Any:
    return max if results["metric"]["higher_is_better"] else min


def _shown(results: dict, value: float) -> str:
    return f"{value:.0%}" if results["metric"]["higher_is_better"] else f"{value:.4f}"


def table(results: dict) -> str:
    runs = sorted(
        results["runs"].values(), key=lambda r: (r["scaling"], r["lr"], r["rank"], r["seed"])
    )
    head = f"{'scaling':<8} {'lr':>7} {'seed':>4} {'rank':>4} {'trainable':>10} " \
           f"{'metric':>7} {'loss':>7} {'stable':>6} {'entropy':>7} {'r90':>5}"  # fmt: skip
    lines = [
        f"{results['metric']['name']} of the base model: {_shown(results, results['base']['metric'])}",
        head,
    ]
    for r in runs:
        lines.append(
            f"{r['scaling']:<8} {r['lr']:>7g} {r['seed']:>4} {r['rank']:>4} {r['trainable']:>10,} "
            f"{_shown(results, r['metric']):>7} {r['held_out_loss']:>7.4f} {r['stable_rank']:>6.2f} "
            f"{r['entropy_rank']:>7.2f} {r['rank_90']:>5.1f}"
        )
    return "\n".join(lines)


def _by_rank(results: dict, scaling: str, lr: float) -> dict[int, float]:
    """Rank -> the metric averaged over seeds, for one scaling and learning rate."""
    return _series(results, scaling, lr, "metric")


def recommend(results: dict, tolerance: float) -> list[str]:
    """Per scaling (at the learning rate with the most ranks): the smallest rank within
    `tolerance` of the best, with its evidence; and the best learning rate per rank."""
    lines, better = [], _better(results)
    sign = 1 if results["metric"]["higher_is_better"] else -1
    for scaling in SCALINGS:
        runs = [r for r in results["runs"].values() if r["scaling"] == scaling]
        if not runs:
            continue
        lrs = sorted({r["lr"] for r in runs})
        lr = max(lrs, key=lambda x: (len(_by_rank(results, scaling, x)), -abs(math.log(x / 2e-3))))
        by_rank = _by_rank(results, scaling, lr)
        best_rank = better(by_rank, key=by_rank.get)
        best = by_rank[best_rank]
        pick = min(r for r, v in by_rank.items() if sign * (best - v) <= tolerance + 1e-9)
        verdict = (
            f"rank {pick} ({_shown(results, by_rank[pick])}) is the best"
            if pick == best_rank
            else f"rank {pick} ({_shown(results, by_rank[pick])}) is within {tolerance:g} of "
            f"the best, rank {best_rank} ({_shown(results, best)})"
        )
        tried = ", ".join(f"{k}: {_shown(results, v)}" for k, v in by_rank.items())
        lines.append(f"{SCALINGS[scaling]} at lr {lr:g}: {verdict}; ranks tried: {tried}")
        if len(lrs) > 1:
            best_lr = {}
            for rank in sorted({r["rank"] for r in runs}):
                scores = {x: _by_rank(results, scaling, x).get(rank) for x in lrs}
                scores = {x: v for x, v in scores.items() if v is not None}
                if len(scores) > 1:
                    best_lr[rank] = better(scores, key=scores.get)
            if best_lr:
                lines.append(
                    f"  best learning rate per rank under {SCALINGS[scaling]}: "
                    + ", ".join(f"r{k}: {v:g}" for k, v in best_lr.items())
                )
    return lines


def _series(results: dict, scaling: str, lr: float, key: str) -> dict[int, float]:
    """Rank -> `key` averaged over seeds, for one scaling and learning rate."""
    values: dict[int, list] = {}
    for r in results["runs"].values():
        if r["scaling"] == scaling and r["lr"] == lr:
            values.setdefault(r["rank"], []).append(r[key])
    return {rank: float(np.mean(v)) for rank, v in sorted(values.items())}


def plot(results: dict, path: Path) -> Path | None:
    """Against rank: the metric and held-out loss (per scaling and lr), trainable parameters,
    and the effective rank of ΔW."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no plot.")
        return None
    runs = list(results["runs"].values())
    lrs = sorted({r["lr"] for r in runs})
    styles = dict(zip(lrs, ("-o", "--s", ":^", "-.v", "-D"), strict=False))
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.3))
    name = results["metric"]["name"]
    for color, scaling in zip(("C0", "C1"), SCALINGS, strict=True):
        for lr in lrs:
            label = f"{SCALINGS[scaling]}, lr {lr:g}"
            for ax, key in ((axes[0], "metric"), (axes[1], "held_out_loss")):
                series = _series(results, scaling, lr, key)
                if series:
                    ax.plot(
                        list(series), list(series.values()), styles[lr], color=color, label=label
                    )
        for key, style in (("stable_rank", "-o"), ("entropy_rank", "--s")):
            series = _series(results, scaling, lrs[0] if len(lrs) == 1 else 2e-3, key)
            if series:
                label = f"{key.replace('_', ' ')}, {SCALINGS[scaling]}"
                axes[3].plot(list(series), list(series.values()), style, color=color, label=label)
    base = _shown(results, results["base"]["metric"])
    axes[0].set(title=f"{name[0].upper()}{name[1:]}, held out (base model: {base})", ylabel=name)
    axes[1].set(title="Held-out loss", ylabel="loss (nats/token)", yscale="log")
    ranks = sorted({r["rank"] for r in runs})
    trainable = {r["rank"]: r["trainable"] for r in runs}
    axes[2].plot(ranks, [trainable[k] for k in ranks], "-o", color="C2", label="A and B")
    axes[2].set(title="Trainable parameters", yscale="log")
    axes[3].plot(ranks, ranks, ":", color="gray", label="rank r")
    axes[3].set(title="Effective rank of ΔW (mean over adapters)", yscale="log")
    axes[3].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[3].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        ax.set(xlabel="rank r", xscale="log")
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    own, args = parse_args(argv)
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))")
    results = sweep(own, args)
    print(table(results))
    for line in recommend(results, own.tolerance):
        print(f"recommendation: {line}")
    png = plot(results, own.out / "rank_sweep.png")
    if png:
        print(f"plot: {png}")
    return results


if __name__ == "__main__":
    training.run_main(main)
