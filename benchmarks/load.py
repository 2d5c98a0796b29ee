"""Loading a Hugging Face checkpoint: throughput and peak host memory of `load_pretrained`.

Writes a synthetic checkpoint with Llama-3.2-1B's shapes (1,235,814,400 parameters, bfloat16,
tied embeddings, "llama3" RoPE scaling, sharded at --shard-gb) to a temporary directory, its
random values made a chunk at a time (the writer never holds the model), then loads it with
`lora_jax.io.hf_checkpoint.load_pretrained` in a fresh child process per mode:

  dense   bfloat16 as stored
  nf4     the seven linear layers of every block quantized as they arrive (NF4, block 64,
          double quantization); embeddings and norms stay bfloat16

and reports, per mode (the run of median time among --repeats loads, the modes alternating):
the wall time until every array is ready, the throughput (checkpoint bytes / time), the bytes
of the loaded parameters, and the child's peak resident memory (max of VmHWM and ru_maxrss,
the highest of the runs) as a multiple of the checkpoint's bytes, next to its resident memory
before the load (Python, JAX and lora_jax: the baseline) and after it.

On CPU the loaded arrays live in host memory too: "params" is what must stay (1.0x the
checkpoint when dense), the baseline is the interpreter, and the rest of the peak is what
the loader held transiently (the target: the whole peak <= 1.3x the checkpoint's bytes).
The child reads files that were just written, i.e. mostly from the page cache, so the
throughput is the loader's, not the disk's.

Run: python -m benchmarks.load [--out runs/benchmarks/] [--dir DIR] [--keep] [--size 1b|test]
                               [--shard-gb 1.0] [--modes dense,nf4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = ("1b", "test")
MODES = ("dense", "nf4")


def model_config(size: str):
    """Llama-3.2-1B's config (or a small one for a smoke run)."""
    from lora_jax.models import LlamaConfig, RopeScaling

    scaling = RopeScaling(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    if size == "1b":
        return LlamaConfig.llama_1b(rope_scaling=scaling, max_seq_len=131072)
    return LlamaConfig.small(
        rope_scaling=scaling, tie_embeddings=True, dtype="bfloat16", param_dtype="bfloat16"
    )


def write_checkpoint(path: pathlib.Path, size: str, shard_bytes: int, seed: int = 0) -> int:
    """Writes the synthetic checkpoint tensor by tensor, chunk by chunk; returns its bytes."""
    from lora_jax.io.hf_checkpoint import _abstract, _Entry, _expected, _write_checkpoint
    from lora_jax.io.hf_config import llama_config_to_hf
    from lora_jax.io.hf_names import LLAMA

    cfg = model_config(size)
    entries = []
    for i, (name, (_, shape)) in enumerate(_expected(_abstract(cfg), LLAMA).items()):
        entries.append(_Entry(name, shape, "BF16", _random_chunks(shape, name, seed + i)))
    _write_checkpoint(path, llama_config_to_hf(cfg), entries, shard_bytes)
    return sum(e.nbytes for e in entries)


def _random_chunks(shape: tuple[int, ...], name: str, seed: int, chunk: int = 1 << 24):
    """N(0, 0.02) weights (norm scales 1 + N(0, 0.02)) in bfloat16, `chunk` values at a time."""

    def chunks():
        import ml_dtypes

        rng = np.random.default_rng(seed)
        rows = max(1, chunk // int(np.prod(shape[1:], dtype=np.int64)))
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            values = 0.02 * rng.standard_normal((n, *shape[1:]), dtype=np.float32)
            if name.endswith("norm.weight"):
                values += 1.0
            yield values.astype(ml_dtypes.bfloat16)

    return chunks


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(path: str, mode: str, result: str) -> None:
    """Loads the checkpoint once and writes the figures as JSON (run in a fresh process)."""
    import jax

    import lora_jax as lj
    from benchmarks import common as c
    from lora_jax.io.hf_checkpoint import load_pretrained

    jax.devices()
    baseline = _status_kb("VmRSS") * 1024
    quantize = (
        lj.QuantConfig(fmt="nf4", block_size=64, double_quant=True) if mode == "nf4" else None
    )
    start = time.perf_counter()
    _, variables = load_pretrained(path, quantize=quantize)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    peak = max(
        _status_kb("VmHWM") * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    figures = {
        "mode": mode,
        "seconds": seconds,
        "params_bytes": c.nbytes(variables),
        "baseline_rss_bytes": baseline,
        "final_rss_bytes": _status_kb("VmRSS") * 1024,
        "peak_rss_bytes": peak,
    }
    pathlib.Path(result).write_text(json.dumps(figures))


def run_child(path: pathlib.Path, mode: str, result: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.load", "--child", str(path), "--mode", mode,
           "--result", str(result)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"The {mode} load failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def summarize(figures: dict, checkpoint_bytes: int) -> dict:
    ck = checkpoint_bytes
    return {
        **figures,
        "gb_per_s": ck / figures["seconds"] / 1e9,
        "params_over_checkpoint": figures["params_bytes"] / ck,
        "peak_over_checkpoint": figures["peak_rss_bytes"] / ck,
        "baseline_over_checkpoint": figures["baseline_rss_bytes"] / ck,
        "transient_over_checkpoint": (
            figures["peak_rss_bytes"] - figures["baseline_rss_bytes"] - figures["params_bytes"]
        )
        / ck,
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median time (the lower middle one of an even count), with every run's
    seconds, and the peak memory (and what was transient in it) of the run that peaked
    highest."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    median = ordered[(len(ordered) - 1) // 2]
    highest = max(runs, key=lambda r: r["peak_rss_bytes"])
    return {
        **median,
        "seconds_all": [r["seconds"] for r in runs],
        **{k: highest[k] for k in ("peak_rss_bytes", "peak_over_checkpoint")},
        "transient_over_checkpoint": highest["transient_over_checkpoint"],
    }


def markdown(report: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f}"
    lines = [
        f"# load_pretrained: {report['size']} checkpoint, {gb(report['checkpoint_bytes'])} GB "
        f"bf16 in {report['shards']} shard(s)",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cpu_cores']} cores, JAX "
        f"{report['machine']['jax']}, backend {report['machine']['backend']}; written in "
        f"{report['write_seconds']:.1f} s.",
        "",
        "| mode | loads | seconds (median) | seconds (all) | GB/s (median) | params GB (x ckpt) "
        "| baseline RSS GB | peak RSS GB (x ckpt) | peak - baseline - params (x ckpt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {len(r['seconds_all'])} | {r['seconds']:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in r['seconds_all'])} | {r['gb_per_s']:.2f} | "
            f"{gb(r['params_bytes'])} "
            f"({r['params_over_checkpoint']:.2f}) | {gb(r['baseline_rss_bytes'])} | "
            f"{gb(r['peak_rss_bytes'])} ({r['peak_over_checkpoint']:.2f}) | "
            f"{r['transient_over_checkpoint']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/benchmarks/", help="directory for load.json / load.md")
    p.add_argument("--dir", help="write the checkpoint here (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--size", choices=SIZES, default="1b")
    p.add_argument("--shard-gb", type=float, default=1.0, help="largest shard, GB (1e9 bytes)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--repeats", type=int, default=1, help="loads per mode (fresh processes)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.mode, args.result)
        return None
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    from benchmarks import common as c

    root = pathlib.Path(args.dir) if args.dir else pathlib.Path(tempfile.mkdtemp(prefix="load-"))
    try:
        start = time.perf_counter()
        checkpoint_bytes = write_checkpoint(root, args.size, int(args.shard_gb * 1e9))
        write_seconds = time.perf_counter() - start
        shards = len(list(root.glob("*.safetensors")))
        print(f"wrote {checkpoint_bytes / 1e9:.2f} GB in {shards} shard(s) to {root} "
              f"in {write_seconds:.1f} s")  # fmt: skip
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # the modes alternate: drift hits each alike
            for mode in modes:
                figures = run_child(root, mode, root / f"{mode}.json")
                runs[mode].append(summarize(figures, checkpoint_bytes))
                print(f"{mode}: {figures['seconds']:.2f} s, "
                      f"{runs[mode][-1]['gb_per_s']:.2f} GB/s, peak RSS "
                      f"{figures['peak_rss_bytes'] / 1e9:.2f} GB = "
                      f"{runs[mode][-1]['peak_over_checkpoint']:.2f}x the checkpoint")  # fmt: skip
        results = [median_run(runs[mode]) for mode in modes]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "size": args.size,
        "checkpoint_bytes": checkpoint_bytes,
        "shards": shards,
        "write_seconds": write_seconds,
        "machine": c.machine(),
        "results": results,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "load.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
