"""LoRA vs full fine-tuning, and the trainable subtree vs the whole tree, on the reference model.

Steps compiled and timed round-robin in one run, all with AdamW and donated buffers:
  full         full fine-tuning: grads of every parameter, AdamW state for every parameter
  lora_qv      lj.make_train_step, LoRA on q_proj and v_proj
  lora_all     lj.make_train_step, LoRA on every linear layer of the blocks
  whole_tree   grads of the whole tree (all-linear adapters) + lj.optimizer (set_to_zero on the
               frozen leaves), donated: what a user writes without partition
  whole_nodon  the same without donation

Theory. A frozen kernel needs the forward product (2N FLOPs per token) and the activation
gradient (2N) but no weight gradient (2N): a LoRA step is about 2/3 of full fine-tuning's
FLOPs. Memory that persists between steps ("state": arguments + outputs - aliased): full
fine-tuning keeps the parameters and AdamW's two moments (3P bytes), LoRA the frozen
parameters and three copies of the small adapters (P + 3T). Within the step, gradients (P
or T) and the activations (about the same in both) come on top: the compiled peak ratio is
(P + 4T + activations) / (4P + activations), above (P + 3T) / 3P when activations dominate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from benchmarks import common as c
from lora_jax.models import Llama

TITLE = "LoRA vs full fine-tuning"
TIME_TARGET, MEMORY_TARGET = 0.72, 0.45


def full_step(model, loss, tx):
    """Full fine-tuning: grads of every parameter, params and optimizer state donated."""

    def step(params, state, batch):
        value, grads = jax.value_and_grad(lambda p: loss(lambda x: model.apply(p, x), batch))(
            params
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return jax.jit(step, donate_argnums=(0, 1))


def whole_tree_step(lora_model, loss, tx, donate: bool):
    """Grads of the whole LoRA tree; the optimizer's set_to_zero keeps frozen leaves still."""

    def step(params, state, batch):
        value, grads = jax.value_and_grad(lambda p: loss(lambda x: lora_model.apply(p, x), batch))(
            params
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def lora_setup(model, base, batch, targets, rank, quantize=None):
    """(lora_model, params) for LoRA on `targets`, from the pretrained `base`."""
    cfg = lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, quantize=quantize)
    lora_model = lj.LoRA(model, cfg)
    return lora_model, lj.init(lora_model, jax.random.key(2), batch[:, :-1], base_params=base)


def lora_step(lora_model, params, batch, loss):
    """The compiled `lj.make_train_step` step and its figures, fed its own outputs."""
    step = lj.make_train_step(lora_model, loss, lj.optimizer(optax.adamw(1e-4), params))
    trainable, frozen = lj.partition(params)
    trainable = jax.tree.map(jnp.copy, trainable)  # donated by the step
    args = (trainable, frozen, step.init(params), batch, None)
    advance = lambda a, out: (out[0], a[1], out[1], a[3], a[4])
    return c.compile_step(step.jitted, args, advance)


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def setup(ctx: c.Context, size: c.Size | None = None):
    """(model, batch, base) of the context's size (or `size`), made once per run."""
    sz = size or ctx.size

    def make():
        model = Llama(sz.model)
        batch = c.tokens(sz)
        return model, batch, c.init_base(model, batch)

    return ctx.cached(("setup", sz), make)


def lora_params(ctx: c.Context, targets, quantize=None, size: c.Size | None = None):
    """(lora_model, params) for LoRA on `targets` (QLoRA with `quantize`), made once per run."""
    sz = size or ctx.size

    def make():
        model, batch, base = setup(ctx, sz)
        return lora_setup(model, base, batch, targets, sz.rank, quantize)

    return ctx.cached(("params", sz, tuple(targets), quantize), make)


def lora(ctx: c.Context, targets, quantize=None, size: c.Size | None = None) -> dict:
    """The compiled LoRA step for `targets` (QLoRA with `quantize`), compiled once per run:
    {"model", "params", "step", "figures", "frozen_bytes", "trainable_bytes", "param_bytes"}."""
    sz = size or ctx.size

    def make():
        _, batch, _ = setup(ctx, sz)
        lora_model, params = lora_params(ctx, targets, quantize, sz)
        ctx.log(f"  compiling lora_jax {'QLoRA' if quantize else 'LoRA'} on {','.join(targets)}")
        step, figures = lora_step(lora_model, params, batch, c.loss_for(sz))
        trainable, frozen = lj.partition(params)
        return {
            "model": lora_model,
            "params": params,
            "step": step,
            "figures": figures,
            "frozen_bytes": c.nbytes(frozen["params"]),
            "trainable_bytes": c.nbytes(trainable),
            "param_bytes": c.nbytes(params["params"]),
        }

    return ctx.cached(("lora", sz, tuple(targets), quantize), make)


def run(ctx: c.Context) -> dict:
    sz = ctx.size
    model, batch, base = setup(ctx)
    loss = c.loss_for(sz)
    adamw = optax.adamw(1e-4)
    steps, figures, info = {}, {}, {}

    ctx.log("  compiling full fine-tuning")
    fargs = (copy(base), adamw.init(base), batch)
    steps["full"], figures["full"] = c.compile_step(
        full_step(model, loss, adamw), fargs, lambda a, out: (out[0], out[1], a[2])
    )
    info["full"] = {"param_bytes": c.nbytes(base), "trainable_bytes": c.nbytes(base)}
    for name, targets in (("lora_qv", c.QV), ("lora_all", c.ALL_LINEAR)):
        got = lora(ctx, targets)
        steps[name], figures[name] = got["step"], got["figures"]
        info[name] = {k: got[k] for k in ("param_bytes", "trainable_bytes")}
    ctx.log(f"  timing {len(steps)} steps x {max(ctx.runs, c.MIN_RUNS)} rounds")
    times = c.time_steps(steps, ctx.runs)
    del steps["full"], fargs  # frees full fine-tuning's state before the whole-tree steps
    lora_model, params = lora(ctx, c.ALL_LINEAR)["model"], lora(ctx, c.ALL_LINEAR)["params"]
    tx = lj.optimizer(adamw, params)
    subtree = {"lora_all": steps["lora_all"]}
    for variant, donate in (("whole_tree", True), ("whole_nodon", False)):
        ctx.log(f"  compiling {variant}")
        wargs = (copy(params), tx.init(params), batch)
        advance = lambda a, out: (out[0], out[1], a[2])
        subtree[variant], figures[variant] = c.compile_step(
            whole_tree_step(lora_model, loss, tx, donate), wargs, advance
        )
        info[variant] = info["lora_all"]
    ctx.log(f"  timing {len(subtree)} steps x {max(ctx.runs, c.MIN_RUNS)} rounds")
    subtimes = c.time_steps(subtree, ctx.runs)
    del subtree
    times |= {k: v for k, v in subtimes.items() if k != "lora_all"}
    times["lora_all_subtree"] = subtimes["lora_all"]
    figures["lora_all_subtree"], info["lora_all_subtree"] = figures["lora_all"], info["lora_all"]
    rows = {
        n: {**figures[n], **times[n], **info[n], "tokens_per_s": sz.tokens / (times[n]["ms"] / 1e3)}
        for n in times
    }
    ref = rows["full"]
    for row in rows.values():
        row["time_ratio"] = c.ratio(row["ms"], ref["ms"])
        row["memory_ratio"] = c.ratio(row["peak_bytes"], ref["peak_bytes"])
        row["state_ratio"] = c.ratio(row["state_bytes"], ref["state_bytes"])
        row["flops_ratio"] = c.ratio(row["flops"], ref["flops"])
        p, t = ref["param_bytes"], row["trainable_bytes"]
        frozen = row["param_bytes"] - t
        row["memory_theory"] = (frozen + 3 * t) / (3 * p)
    add_theory(rows, sz)
    return {"title": TITLE, "size": sz.describe(), "rows": rows}


TARGETS = {"full": None, "lora_qv": c.QV}  # every other row: LoRA on all linear layers


def add_theory(rows: dict, sz: c.Size) -> None:
    """Adds each row's model FLOPs per step (`c.model_flops_per_token`), their ratio to full
    fine-tuning's, and the measured time ratio over that theory (1.0: as fast as the FLOPs
    allow, relative to full fine-tuning)."""
    for name, row in rows.items():
        row["model_flops"] = (
            c.model_flops_per_token(sz, TARGETS.get(name, c.ALL_LINEAR))["total"] * sz.tokens
        )
    for row in rows.values():
        row["model_flops_ratio"] = c.ratio(row["model_flops"], rows["full"]["model_flops"])
        row["time_vs_theory"] = c.ratio(row.get("time_ratio"), row["model_flops_ratio"])


ROWS = {
    "full": "full fine-tuning (AdamW)",
    "lora_qv": "LoRA q,v (`lj.make_train_step`)",
    "lora_all": "LoRA all linear (`lj.make_train_step`)",
}
SUBTREE_ROWS = {
    "lora_all_subtree": "trainable subtree (`lj.make_train_step`, donated)",
    "whole_tree": "whole tree + `set_to_zero`, donated",
    "whole_nodon": "whole tree + `set_to_zero`, not donated",
}


def markdown(result: dict) -> str:
    rows = result["rows"]
    out = [
        f"**{TITLE}** — {result['size']}",
        "",
        "| step | ms | tokens/s | time / full | theory: model FLOPs / full | time / theory "
        "| XLA GFLOP | XLA FLOPs / full | peak MB | peak / full | state MB | state / full "
        "| theory (P+3T)/3P | state / theory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in ROWS.items():
        r = rows[key]
        lora = key != "full"
        out.append(
            f"| {label} | {c.fmt(r['ms'])} | {c.fmt(r['tokens_per_s'], 0)} | {c.fmt(r['time_ratio'])} "
            f"| {c.fmt(r.get('model_flops_ratio') if lora else None)} "
            f"| {c.fmt(r.get('time_vs_theory') if lora else None)} "
            f"| {c.fmt(r['flops'] / 1e9)} | {c.fmt(r['flops_ratio'])} | {c.fmt(c.mb(r['peak_bytes']), 1)} "
            f"| {c.fmt(r['memory_ratio'])} | {c.fmt(c.mb(r['state_bytes']), 1)} | {c.fmt(r['state_ratio'])} "
            f"| {c.fmt(r['memory_theory'] if lora else None)} "
            f"| {c.fmt(r['state_ratio'] / r['memory_theory'] if lora else None)} |"
        )
    best = rows["lora_all"]
    verdict = lambda ok: "met" if ok else "missed"
    out += [
        "",
        "theory: model FLOPs per step (LoRA: 4N for the frozen kernels + the adapters + "
        "attention; full: 6N + attention; `benchmarks/common.py: model_flops_per_token`). XLA "
        "FLOPs: `cost_analysis()`, which on a GPU leaves out library calls (cuBLAS products, "
        "cuDNN attention). peak = arguments + outputs + temporaries - aliased (activations "
        "included); state = arguments + outputs - aliased (parameters, optimizer state, batch).",
        f"Targets (LoRA all linear vs full): time ≤ {TIME_TARGET} → {c.fmt(best['time_ratio'])} "
        f"({verdict(best['time_ratio'] <= TIME_TARGET)}; q,v: {c.fmt(rows['lora_qv']['time_ratio'])}); "
        f"peak memory ≤ {MEMORY_TARGET} → {c.fmt(best['memory_ratio'])} "
        f"({verdict(best['memory_ratio'] <= MEMORY_TARGET)}; state: {c.fmt(best['state_ratio'])}).",
    ]
    return "\n".join(out)


def subtree_markdown(result: dict) -> str:
    rows = result["rows"]
    ref = rows["lora_all_subtree"]
    out = [
        f"**Trainable subtree vs whole tree** — {result['size']}, LoRA on all linear layers",
        "",
        "| step | ms | time / subtree | output MB | outputs / subtree | peak MB | peak / subtree | GFLOP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label in SUBTREE_ROWS.items():
        r = rows[key]
        out.append(
            f"| {label} | {c.fmt(r['ms'])} | {c.fmt(c.ratio(r['ms'], ref['ms']))} "
            f"| {c.fmt(c.mb(r['output_bytes']), 2)} | {c.fmt(c.ratio(r['output_bytes'], ref['output_bytes']), 1)} "
            f"| {c.fmt(c.mb(r['peak_bytes']), 1)} | {c.fmt(c.ratio(r['peak_bytes'], ref['peak_bytes']))} "
            f"| {c.fmt(r['flops'] / 1e9)} |"
        )
    return "\n".join(out)


def bars(result: dict) -> list[tuple[str, float | None, float | None]]:
    """(label, ratio, target) for the plot."""
    rows = result["rows"]
    return [
        ("q,v time", rows["lora_qv"]["time_ratio"], rows["lora_qv"].get("model_flops_ratio")),
        ("all time", rows["lora_all"]["time_ratio"], TIME_TARGET),
        ("all model FLOPs (theory)", rows["lora_all"].get("model_flops_ratio"), None),
        ("q,v peak memory", rows["lora_qv"]["memory_ratio"], None),
        ("all peak memory", rows["lora_all"]["memory_ratio"], MEMORY_TARGET),
        ("all state memory", rows["lora_all"]["state_ratio"], rows["lora_all"]["memory_theory"]),
    ]


def subtree_bars(result: dict):
    rows = result["rows"]
    ref = rows["lora_all_subtree"]
    return [
        (f"{k} time", c.ratio(rows[k]["ms"], ref["ms"]), None)
        for k in ("whole_tree", "whole_nodon")
    ] + [
        (f"{k} outputs", c.ratio(rows[k]["output_bytes"], ref["output_bytes"]), None)
        for k in ("whole_tree", "whole_nodon")
    ]
