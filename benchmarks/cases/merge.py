"""`lj.merge` throughput against a plain ``W + scale * A @ B`` loop.

On the reference model with LoRA on every linear layer of the blocks, both functions fold
every adapter into its kernel in float32 and cast back to the kernel's dtype, and return the
whole tree without the adapters:
  lj.merge          the library's merge, called eagerly (as a user calls it once) and jitted
  plain loop        a dict comprehension of ``(W + s * A @ B).astype(W.dtype)`` per kernel,
                    eagerly and jitted
Throughput is GB/s of adapted base kernels processed (each byte read once and written once);
a jitted merge also copies the tree's other leaves (embeddings, norms), the eager one does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases import finetune

TITLE = "merge() throughput"


def plain_merge(variables):
    """What one writes by hand: every adapted kernel W + scale * A @ B, adapters dropped."""
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    records = traverse_util.flatten_dict(variables["lora"], sep="/")
    out = {}
    for path, w in flat.items():
        if path.endswith(("_lora_a", "_lora_b")):
            continue
        if path + "_lora_a" in flat:
            a, b = flat[path + "_lora_a"], flat[path + "_lora_b"]
            s = records[path + "_lora"].scale
            f32 = jnp.float32
            w = (w.astype(f32) + s * (a.astype(f32) @ b.astype(f32))).astype(w.dtype)
        out[path] = w
    return {"params": traverse_util.unflatten_dict(out, sep="/")}


def run(ctx: c.Context) -> dict:
    sz = ctx.size
    _, params = finetune.lora_params(ctx, c.ALL_LINEAR)
    flat = traverse_util.flatten_dict(params["params"], sep="/")
    adapted = sum(int(v.nbytes) for k, v in flat.items() if k + "_lora_a" in flat)
    fns = {
        "lj.merge (eager)": lj.merge,
        "plain loop (eager)": plain_merge,
        "lj.merge (jit)": jax.jit(lj.merge),
        "plain loop (jit)": jax.jit(plain_merge),
    }
    ctx.log("  timing merges")
    steps = {name: c.Step(fn, (params,)) for name, fn in fns.items()}
    times = c.time_steps(steps, ctx.runs)
    rows = {}
    for name, t in times.items():
        ref = times["plain loop (jit)" if "jit" in name else "plain loop (eager)"]
        rows[name] = {
            **t,
            "gb_per_s": adapted / (t["ms"] / 1e3) / 1e9,
            "time_vs_plain": c.ratio(t["ms"], ref["ms"]),
        }
    same = jax.tree.map(
        lambda x, y: bool(jnp.array_equal(x, y)), lj.merge(params), plain_merge(params)
    )
    return {
        "title": TITLE,
        "size": sz.describe(),
        "adapted_bytes": adapted,
        "rows": rows,
        "same_result": all(jax.tree.leaves(same)),
    }


def markdown(result: dict) -> str:
    out = [
        f"**{TITLE}** — {result['size']}; {c.fmt(c.mb(result['adapted_bytes']), 1)} MB of adapted "
        f"kernels; results identical: {result['same_result']}",
        "",
        "| merge | ms | GB/s of base weights | time / plain loop (same mode) |",
        "|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        out.append(
            f"| {name} | {c.fmt(r['ms'], 3)} | {c.fmt(r['gb_per_s'])} | {c.fmt(r['time_vs_plain'])} |"
        )
    return "\n".join(out)


def bars(result: dict):
    rows = result["rows"]
    return [
        ("eager: lj.merge / plain", rows["lj.merge (eager)"]["time_vs_plain"], 1.0),
        ("jit: lj.merge / plain", rows["lj.merge (jit)"]["time_vs_plain"], 1.0),
    ]
