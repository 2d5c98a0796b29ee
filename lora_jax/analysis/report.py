"""The report command: ``python -m lora_jax.analysis ADAPTER [OTHER] --base MODEL``.

Loads the base model (a Hugging Face directory or a GGUF file, `lora_jax.hf.load_pretrained`)
and one or two adapters on it (lora_jax files or PEFT's, told apart by their weights file),
then prints, per ΔW: its shape, rank and scale, ‖ΔW‖_F and σ₁, the effective ranks (stable,
entropy, 90 % / 99 % energy) and the amplification of W's directions (Hu et al. 2021, §7.3:
‖ΔW‖_F / ‖Uᵀ W V‖_F and W projected on ΔW's, its own top and random directions). With a second
adapter, the subspace similarity φ(i, j) of each shared ΔW (§7.2). Writes, to --out: the
spectra and ranks per layer (spectra.png), φ heatmaps per module (phi_<module>.png; e.g.
phi_q_proj.png) for a few layers spread over the depth, and every figure in report.json.
Plots need matplotlib (``pip install "lora_jax[examples]"``); without it the tables and the
JSON are still written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.analysis.compare import SIDES, compare_adapters
from lora_jax.analysis.spectrum import AdapterReport, adapter_report
from lora_jax.io import adapter_files, peft
from lora_jax.io.hf_checkpoint import load_pretrained

try:  # optional: the examples extra
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the environment
    Figure = None


def load(directory: Path, base: Mapping) -> dict:
    """An adapter directory (lora_jax's files or PEFT's) added to the base's variables."""
    if (directory / peft.WEIGHTS_FILE).is_file():
        return peft.load_peft(directory, base)[0]
    if (directory / adapter_files.ADAPTER_FILE).is_file():
        return adapter_files.load_adapter(directory, base)[0]
    raise ValueError(
        f"'{directory}' is not an adapter directory: it has neither "
        f"{adapter_files.ADAPTER_FILE} (lora_jax) nor {peft.WEIGHTS_FILE} (PEFT)."
    )


def _where(label: str) -> tuple[str, int | None]:
    """(module name, layer index) of an adapted parameter's path: ('q_proj', 3) for
    params/layers_3/self_attn/q_proj/kernel; the layer is None when the path has none."""
    parts = label.split("@")[0].split("/")
    module = parts[-2] if len(parts) > 1 else parts[-1]
    layer = next((int(m[1]) for p in parts if (m := re.search(r"_(\d+)$", p))), None)
    return module, layer


def rows(reports: Mapping[str, AdapterReport]) -> list[dict]:
    """One flat dict per ΔW: a stacked or per-head adapter gives one row per index."""
    out = []
    for label, r in reports.items():
        module, layer = _where(label)
        lead = r.singular_values.shape[:-1]
        for index in np.ndindex(*lead):
            amp = r.amplification
            row = {
                "adapter": label + "".join(f"[{i}]" for i in index),
                "module": module,
                "layer": index[0] if lead and layer is None else layer,
                "shape": list(r.shape),
                "rank": r.rank,
                "scale": r.scale,
                "singular_values": np.asarray(r.singular_values[index]).tolist(),
                "stable_rank": float(r.stable_rank[index]),
                "entropy_rank": float(r.entropy_rank[index]),
                "rank_90": int(r.rank_90[index]),
                "rank_99": int(r.rank_99[index]),
            }
            if amp is not None:
                row.update({k: float(getattr(amp, k)[index]) for k in amp._fields})
            out.append(row)
    return sorted(out, key=_order)


def similarity_rows(
    phis: Mapping[str, Any], reports: Mapping[str, AdapterReport], side: str
) -> list[dict]:
    """Per shared ΔW: φ(1, 1), the grid's mean, and the mean a random pair would give."""
    out = []
    for label, phi in phis.items():
        module, layer = _where(label)
        phi = np.asarray(phi)
        d = reports[label].shape[0 if side in ("a", "delta_in") else 1]  # the space compared
        for index in np.ndindex(*phi.shape[:-2]):
            grid = phi[index]
            i, j = np.meshgrid(*(np.arange(1, n + 1) for n in grid.shape), indexing="ij")
            out.append(
                {
                    "adapter": label + "".join(f"[{k}]" for k in index),
                    "module": module,
                    "layer": index[0] if index and layer is None else layer,
                    "phi_11": float(grid[0, 0]),
                    "phi_mean": float(grid.mean()),
                    "random_mean": float(np.mean(np.maximum(i, j) / d)),
                    "phi": grid.tolist(),
                }
            )
    return sorted(out, key=_order)


def _order(row: dict) -> tuple:
    """Module, then depth (layers_2 before layers_10), then the label."""
    return (row["module"], -1 if row["layer"] is None else row["layer"], row["adapter"])


def _short(label: str) -> str:
    return label.removeprefix("params/").replace("/kernel", "")


def table(rows_: Sequence[dict]) -> str:
    width = max(12, *(len(_short(r["adapter"])) for r in rows_))
    head = (
        f"{'adapter':<{width}} {'shape':>11} {'r':>3} {'scale':>6} {'|dW|_F':>8} {'s1':>8} "
        f"{'stable':>6} {'entropy':>7} {'r90':>4} {'r99':>4}"
    )
    amp = "factor" in rows_[0]
    if amp:
        head += f" {'amplif':>7} {'|UtWV|':>7} {'W top':>7} {'W rand':>7}"
    lines = [head]
    for r in rows_:
        s1 = r["singular_values"][0] if r["singular_values"] else 0.0
        line = (
            f"{_short(r['adapter']):<{width}} {'x'.join(map(str, r['shape'])):>11} {r['rank']:>3} "
            f"{r['scale']:>6.3g} {math.sqrt(sum(s * s for s in r['singular_values'])):>8.3g} "
            f"{s1:>8.3g} {r['stable_rank']:>6.2f} {r['entropy_rank']:>7.2f} {r['rank_90']:>4} "
            f"{r['rank_99']:>4}"
        )
        if amp:
            line += (
                f" {r['factor']:>7.3g} {r['delta_projection']:>7.3g} "
                f"{r['top_projection']:>7.3g} {r['random_projection']:>7.3g}"
            )
        lines.append(line)
    return "\n".join(lines)


def similarity_table(rows_: Sequence[dict], side: str) -> str:
    width = max(12, *(len(_short(r["adapter"])) for r in rows_))
    lines = [
        f"subspace similarity phi(i, j) of {SIDES[side]} (1: same span, random: max(i, j) / d)",
        f"{'adapter':<{width}} {'phi(1,1)':>8} {'mean':>6} {'random':>6}",
    ]
    for r in rows_:
        lines.append(
            f"{_short(r['adapter']):<{width}} {r['phi_11']:>8.3f} {r['phi_mean']:>6.3f} "
            f"{r['random_mean']:>6.3f}"
        )
    shared = sum(r["phi_11"] > 0.5 for r in rows_)
    lines.append(f"top direction shared (phi(1,1) > 0.5) in {shared} of {len(rows_)}")
    return "\n".join(lines)


def by_module(rows_: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by module name (q_proj, v_proj, ...), in their order."""
    by: dict[str, list[dict]] = {}
    for r in rows_:
        by.setdefault(r["module"], []).append(r)
    return by


def _layer_axis(rs: Sequence[dict]) -> list:
    return [r["layer"] if r["layer"] is not None else i for i, r in enumerate(rs)]


def plot_spectra(rows_: Sequence[dict], path: Path) -> Path:
    """Per module: σᵢ / σ₁ of every layer's ΔW, and the effective ranks against depth."""
    by = by_module(rows_)
    fig = Figure(figsize=(11, 3.6 * len(by)), layout="constrained")
    axes = fig.subplots(len(by), 2, squeeze=False)
    for (module, rs), (left, right) in zip(by.items(), axes, strict=True):
        layers = _layer_axis(rs)
        top = max(layers) or 1
        for r, layer in zip(rs, layers, strict=True):
            s = np.asarray(r["singular_values"])
            if s.size and s[0] > 0:
                x = np.arange(1, s.size + 1)
                left.plot(x, s / s[0], color=(layer / top, 0.2, 1 - layer / top), lw=0.8)
        left.set(
            title=f"{module}: σᵢ / σ₁ of ΔW (blue: first layer, red: last)",
            xlabel="i",
            ylabel="σᵢ / σ₁",
            yscale="log",
        )
        for key, style in (("stable_rank", "-o"), ("entropy_rank", "-s"), ("rank_90", "-^")):
            right.plot(layers, [r[key] for r in rs], style, ms=3, label=key.replace("_", " "))
        right.set(
            title=f"{module}: effective rank of ΔW by layer (rank {rs[0]['rank']})",
            xlabel="layer",
            ylabel="rank",
        )
        if "factor" in rs[0]:
            twin = right.twinx()
            twin.plot(layers, [r["factor"] for r in rs], ":", color="gray", label="amplification")
            twin.set_ylabel("amplification factor")
            twin.legend(loc="upper right", fontsize=8)
        right.legend(loc="upper left", fontsize=8)
        for ax in (left, right):
            ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def plot_similarity(sim: Sequence[dict], out: Path, names: tuple[str, str], panels: int) -> list:
    """Per module, φ(i, j) heatmaps for `panels` layers spread evenly over the depth."""
    paths = []
    for module, rs in by_module(sim).items():
        picks = sorted({round(k) for k in np.linspace(0, len(rs) - 1, min(panels, len(rs)))})
        fig = Figure(figsize=(3.2 * len(picks) + 1.2, 3.4), layout="constrained")
        axes = fig.subplots(1, len(picks), squeeze=False)[0]
        image = None
        for ax, k in zip(axes, picks, strict=True):
            grid = np.asarray(rs[k]["phi"])
            image = ax.imshow(
                grid,
                vmin=0,
                vmax=1,
                cmap="viridis",
                aspect="auto",
                extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5),
            )
            layer = rs[k]["layer"]
            ax.set(
                title=f"{module}, layer {layer}" if layer is not None else _short(rs[k]["adapter"]),
                xlabel=f"j ({names[1]})",
                ylabel=f"i ({names[0]})",
            )
        fig.colorbar(image, ax=list(axes), label="φ(i, j)")
        path = out / f"phi_{module}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lora_jax.analysis",
        description="What an adapter learned: ΔW's spectrum, effective rank, amplification of "
        "the base's directions, and the subspace similarity of two adapters (Hu et al. 2021, §7).",
    )
    p.add_argument("adapter", type=Path, help="adapter directory (lora_jax or PEFT files)")
    p.add_argument("other", type=Path, nargs="?", help="a second adapter to compare with")
    p.add_argument("--base", type=Path, required=True, help="Hugging Face directory or GGUF file")
    p.add_argument("--out", type=Path, default=Path("runs/analysis"), help="PNGs and report.json")
    p.add_argument("--side", choices=list(SIDES), default="a", help="directions compared by phi")
    p.add_argument("--panels", type=int, default=5, help="layers per phi heatmap figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument(
        "--no-amplification", action="store_true", help="skip the SVD of each base kernel"
    )
    return p.parse_args(argv)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    for name, path in (("ADAPTER", args.adapter), ("OTHER", args.other)):
        if path is not None and not path.is_dir():
            _fail(f"{name} '{path}' is not a directory.")
    if args.panels < 1:
        _fail(f"--panels must be at least 1, got {args.panels}.")
    try:
        _, base = load_pretrained(args.base, dtype=jnp.float32)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(f"--base {args.base}: {str(e).splitlines()[0]}")
    trees = []
    for path in filter(None, (args.adapter, args.other)):
        try:
            trees.append(load(path, base))
        except ValueError as e:
            _fail(f"{path}: {str(e).splitlines()[0]}")
    reports = adapter_report(trees[0], with_amplification=not args.no_amplification, seed=args.seed)
    result: dict[str, Any] = {"adapter": str(args.adapter), "base": str(args.base)}
    result["spectra"] = rows(reports)
    print(f"{args.adapter} on {args.base.name}:")
    print(table(result["spectra"]))
    if args.other is not None:
        others = adapter_report(trees[1], with_amplification=False)
        result["other"] = {"adapter": str(args.other), "spectra": rows(others)}
        print(f"\n{args.other}:")
        print(table(result["other"]["spectra"]))
        try:
            phis = compare_adapters(trees[0], trees[1], side=args.side)
        except ValueError as e:
            _fail(str(e).splitlines()[0])
        result["similarity"] = {
            "side": args.side,
            "rows": similarity_rows(phis, reports, args.side),
        }
        print(f"\n{args.adapter.name} (i) vs {args.other.name} (j):")
        print(similarity_table(result["similarity"]["rows"], args.side))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1))
    written = [args.out / "report.json"]
    if Figure is None:
        print("matplotlib is not installed (pip install 'lora_jax[examples]'): no plots.")
    else:
        written.append(plot_spectra(result["spectra"], args.out / "spectra.png"))
        if "similarity" in result:
            names = (args.adapter.name, args.other.name)
            written += plot_similarity(result["similarity"]["rows"], args.out, names, args.panels)
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return result
