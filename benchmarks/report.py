"""The suite's outputs: the Markdown report and one bar plot of ratios per case group."""

from __future__ import annotations

import math
import os

from benchmarks.cases import finetune, merge, mfu, peers, quantized

# group -> (module, table function, bars function); a case may give several groups.
GROUPS = {
    "finetune": [
        ("finetune", finetune.markdown, finetune.bars),
        ("subtree", finetune.subtree_markdown, finetune.subtree_bars),
    ],
    "quantized": [("quantized", quantized.markdown, quantized.bars)],
    "merge": [("merge", merge.markdown, merge.bars)],
    "peers": [("peers", peers.markdown, peers.bars)],
    "mfu": [("mfu", mfu.markdown, mfu.bars)],
}
TITLES = {
    "finetune": "LoRA step vs full fine-tuning (ratio to full; lower is better)",
    "subtree": "Whole-tree step vs trainable subtree (ratio; lower is better)",
    "quantized": "QLoRA vs bf16 LoRA (ratio to LoRA)",
    "merge": "lj.merge vs a plain W + A@B loop (time ratio)",
    "peers": "Peers vs lora_jax (ratio; > 1: peer slower / larger)",
    "mfu": "MFU and lora_jax / PEFT tokens/s",
}


def _header(report: dict) -> list[str]:
    m = report["machine"]
    return [
        f"# lora_jax benchmarks — {report['mode']} run",
        "",
        f"- machine: {m['backend']} / {m['device_kind']} ({m['device_count']} device(s)); CPU "
        f"{m['cpu']}, {m['cpu_cores']} cores",
        f"- JAX {m['jax']} (jaxlib {m['jaxlib']}), Flax {m['flax']}, optax {m['optax']}, "
        f"lora_jax {m['lora_jax']}, Python {m['python']}; {m['date']}"
        + ("; attention: cuDNN fused (bf16)" if m.get("fused_attention") else ""),
        f"- latest command: `{report['command']}`",
        f"- timing: median of {report['runs']} rounds after one warm-up call each, compared "
        "steps round-robin, `block_until_ready`; memory from `memory_analysis()` (peak = "
        "arguments + outputs + temporaries - aliased), FLOPs from `cost_analysis()`",
        "",
    ]


def markdown_all(report: dict) -> str:
    """The whole report: the machine, then every size's tables."""
    lines = _header(report)
    for size, cases in report["sizes"].items():
        lines += [f"## {size}", ""]
        for case, result in cases.items():
            lines += [case_markdown(case, result), ""]
    return "\n".join(lines)


def case_markdown(case: str, result: dict) -> str:
    if "error" in result:
        return f"**{case}** — failed: `{result['error']}`"
    return "\n\n".join(table(result) for _, table, _ in GROUPS[case])


def plot_all(report: dict, directory: str, prefix: str) -> list[str]:
    """One PNG per size and case group: `<prefix>-<size>-<group>.png`."""
    written = []
    for size, cases in report["sizes"].items():
        for case, result in cases.items():
            if "error" not in result:
                for group, _, bars in GROUPS[case]:
                    path = os.path.join(directory, f"{prefix}-{size}-{group}.png")
                    if plot(bars(result), TITLES[group], report["machine"], path):
                        written.append(path)
    return written


def plot(items, title: str, machine: dict, path: str) -> bool:
    """Horizontal bars of ratios, targets or theory as red ticks, 1.0 dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    where = (
        machine["device_kind"]
        if machine["backend"] != "cpu"
        else f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    )
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.4))
    values = [0.0 if v is None or math.isnan(v) else v for _, v, _ in items]
    ax.barh(
        range(len(items)),
        values,
        color=["#cccccc" if v is None else "#4c72b0" for _, v, _ in items],
    )
    for i, (_, v, target) in enumerate(items):
        ax.text(values[i], i, " n/a" if v is None else f" {v:.2f}", va="center", fontsize=8)
        if target is not None:
            ax.plot([target, target], [i - 0.4, i + 0.4], color="#c44e52", lw=2)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(items)), [label for label, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([1.2] + [v * 1.25 for v in values]))
    ax.set_title(f"{title}\n{where}, JAX {machine['jax']}", fontsize=9)
    ax.set_xlabel("ratio (red tick: target or theory)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    """Rewrites the Markdown tables (and plots, with --plots) of a results JSON."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", help="a benchmarks/results/<machine>.json file")
    p.add_argument("--plots", default=None, help="write the PNGs here")
    args = p.parse_args(argv)
    with open(args.results) as f:
        report = json.load(f)
    with open(args.results[: -len(".json")] + ".md", "w") as f:
        f.write(markdown_all(report))
    if args.plots:
        prefix = report["machine"]["backend"] + ("-quick" if report["mode"] == "quick" else "")
        print("\n".join(plot_all(report, args.plots, prefix)))


if __name__ == "__main__":
    main()
