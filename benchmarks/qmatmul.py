"""The 4-bit matmul alone: dequantize-then-dot vs a bf16 dot.

For M in {1, 16, 128, 4096} (tokens) and a K x N kernel (default 4096 x 4096, NF4, block 64,
double quantization), times in bfloat16:
  bf16        x @ W with W dense in bfloat16 (the floor: what LoRA's base matmul costs)
  xla         dequantize(W) then x @ W (lora_jax's path, QuantConfig(kernel="auto"))
and the same for the backward input-gradient product g @ W.T ("bwd" rows). Median of 10 runs
after a warm-up, with block_until_ready (at least 5 runs). Ratios are to bf16 in the same run.

Before timing, every 4-bit path is checked against a float32 reference (the dequantized kernel,
HIGHEST precision) on fresh random inputs: relative error ||out - ref|| / ||ref|| per M and
direction, at the timed shape and at an awkward one (K padded to the block, N not a multiple
of 128), so that a kernel that computes the wrong thing never gets a time.

(Until 2026-12-01 a fused Pallas kernel had rows here too; slower than `xla` at every M on an
H200, it was removed: docs/qlora.md keeps its figures.)

Run: python -m benchmarks.qmatmul [--k 4096] [--n 4096] [--ms 1,16,128,4096] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import lora_jax as lj
from benchmarks import common as c
from lora_jax import quant
from lora_jax.quant.matmul import _matmul


def rel_error(fn, inp, qt, transpose: bool) -> float:
    """||fn(inp, qt) - ref|| / ||ref|| against the float32 product with the dequantized kernel."""
    w = quant.dequantize(qt, jnp.float32)
    w = w.T if transpose else w
    ref = jnp.dot(inp.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    out = fn(inp, qt).astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check(paths: dict, ms, shapes, tol: float = 2e-2) -> list[dict]:
    """Relative errors of the 4-bit `paths` for each (K, N) in `shapes`, M in `ms`, both ways."""
    rows = []
    for k, n in shapes:
        w = jax.random.normal(jax.random.key(k * 7 + n), (k, n), jnp.float32) * 0.02
        qt = quant.quantize_array(w, lj.QuantConfig(compute_dtype=jnp.bfloat16))
        for m in ms:
            for direction, width in (("fwd", k), ("bwd", n)):
                inp = jax.random.normal(jax.random.key(m + width), (m, width), jnp.bfloat16)
                for name, (fwd, bwd) in paths.items():
                    err = rel_error(fwd if direction == "fwd" else bwd, inp, qt, direction == "bwd")
                    rows.append(
                        {
                            "k": k,
                            "n": n,
                            "m": m,
                            "direction": direction,
                            "path": name,
                            "rel_error": err,
                            "ok": bool(err < tol),
                        }
                    )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--ms", default="1,16,128,4096")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args(argv)

    bf16 = jnp.bfloat16
    w = jax.random.normal(jax.random.key(0), (args.k, args.n), jnp.float32) * 0.02
    qt = quant.quantize_array(w, lj.QuantConfig(compute_dtype=bf16))
    dense = quant.dequantize(qt, bf16)
    cases = {
        "bf16": (jax.jit(lambda x, w: x @ w), jax.jit(lambda g, w: g @ w.T), dense),
        "xla": (
            jax.jit(lambda x, q: _matmul("xla", x, q, transpose=False)),
            jax.jit(lambda g, q: _matmul("xla", g, q, transpose=True)),
            qt,
        ),
    }
    ms = [int(s) for s in args.ms.split(",")]
    paths = {name: (fwd, bwd) for name, (fwd, bwd, _) in cases.items() if name != "bf16"}
    checks = check(paths, ms, [(args.k, args.n), (1000, 1040)])
    worst = {name: max(r["rel_error"] for r in checks if r["path"] == name) for name in paths}
    print(
        "correctness (max relative error vs float32 reference): "
        + ", ".join(f"{n} {e:.2e}" for n, e in worst.items())
    )
    bad = [r for r in checks if not r["ok"]]
    for r in bad:
        print(f"  WRONG: {r}")
    rows = []
    for m in ms:
        x = jax.random.normal(jax.random.key(1), (m, args.k), bf16)
        g = jax.random.normal(jax.random.key(2), (m, args.n), bf16)
        for direction, inp in (("fwd", x), ("bwd", g)):
            times = {}
            for name, (fwd, bwd, weight) in cases.items():
                fn = fwd if direction == "fwd" else bwd
                times[name] = c.time_fn(fn, inp, weight, runs=args.runs)["ms"]
            rows.append(
                {"m": m, "direction": direction, **{f"{k}_ms": v for k, v in times.items()}}
            )
    report = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "k": args.k,
        "n": args.n,
        "bits_per_weight": qt.bits_per_weight,
        "rows": rows,
        "correctness": checks,
        "correct": not bad,
    }
    names = list(cases)
    print(
        f"{args.k}x{args.n} NF4 kernel ({qt.bits_per_weight:.3f} bits/weight) on {report['device']}, jax {report['jax']}"
    )
    print(
        "| M | pass | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n}/bf16" for n in names[1:])
        + " |"
    )
    print("|---" * (2 + 2 * len(names) - 1) + "|")
    for r in rows:
        ms = [r[f"{n}_ms"] for n in names]
        ratios = [f"{v / ms[0]:.2f}" for v in ms[1:]]
        print(
            f"| {r['m']} | {r['direction']} | "
            + " | ".join(f"{v:.3f}" for v in ms)
            + " | "
            + " | ".join(ratios)
            + " |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if bad:
        raise SystemExit(f"{len(bad)} of {len(checks)} correctness checks failed")
    return report


if __name__ == "__main__":
    main()
