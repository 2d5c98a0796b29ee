"""lora_jax against other LoRA implementations: same model, same batch, one run.

  qwix LoRA / QLoRA   google/qwix (`qwix.apply_lora_to_model` with a `LoraRule`; NF4 with
                      tiles of 64 for QLoRA) on the same reference model, LoRA on every linear
                      layer, the same train-step structure (grads of the adapters only, AdamW,
                      donated): step time and compiled peak memory, each as a ratio to lora_jax's
                      LoRA or QLoRA step, timed round-robin with it.
  nnx.LoRALinear      Flax NNX's LoRA layer, which a user places in an NNX model by hand. It
                      does not apply to the reference model (a `flax.linen` model whose Dense
                      layers it cannot wrap), so both libraries run a small all-Dense MLP:
                      `nnx.LoRALinear` layers vs `lj.LoRA` over `nn.Dense` layers, same shapes.
  PEFT                Hugging Face PEFT on `transformers.LlamaForCausalLM` built from a
                      `LlamaConfig` of the same shapes (random weights), same tokens per step,
                      in a child process (see `benchmarks/torch_peft.py`); on GPU by default.

A peer that cannot be imported or fails gets a row that says why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from benchmarks import common as c
from benchmarks.cases import finetune, quantized

TITLE = "Peers"
INSTALL = "pip install -e '.[peers]'"


def _skip(reason: str) -> dict:
    return {"skipped": reason[:300]}


def adapter_split(params):
    """(trainable dict keyed by key path, frozen leaves) of a qwix params tree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    is_adapter = lambda path: str(path[-1]).strip("[]'\".").endswith(("lora_a", "lora_b"))
    trainable = {jax.tree_util.keystr(p): v for p, v in flat if is_adapter(p)}
    frozen = [v for p, v in flat if not is_adapter(p)]
    return trainable, frozen


def qwix_step(model, batch, rank: int, qtype: str | None, loss):
    """qwix LoRA (qtype None) or QLoRA ("nf4") on all linear layers: (Step, figures)."""
    import qwix

    rule = qwix.LoraRule(
        module_path=".*(" + "|".join(c.ALL_LINEAR) + ")",
        rank=rank,
        alpha=2.0 * rank,
        weight_qtype=qtype,
        tile_size=64 if qtype else None,
    )
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
    # Random weights (qwix's own init): time and memory do not depend on the values.
    params = jax.jit(qmodel.init)(jax.random.key(0), batch[:, :-1])["params"]
    trainable, frozen = adapter_split(params)
    tx = optax.adamw(1e-4)

    def step(trainable, params, state, batch):
        def objective(trainable):
            merged = jax.tree_util.tree_map_with_path(
                lambda p, v: trainable.get(jax.tree_util.keystr(p), v), params
            )
            return loss(lambda x: qmodel.apply({"params": merged}, x), batch)

        value, grads = jax.value_and_grad(objective)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    args = (jax.tree.map(jnp.copy, trainable), params, tx.init(trainable), batch)
    advance = lambda a, out: (out[0], a[1], out[1], a[3])
    step_, figures = c.compile_step(jax.jit(step, donate_argnums=(0, 2)), args, advance)
    figures["frozen_bytes"] = c.nbytes(frozen)
    return step_, figures


def qwix_rows(ctx: c.Context) -> dict:
    """lora_jax vs qwix: LoRA on the model in its dtype, QLoRA on the bf16 model (as the
    quantized case), all linear layers, each timed round-robin with its lora_jax counterpart."""
    steps, figures, errors = {}, {}, {}
    sizes = {"LoRA": ctx.size, "QLoRA": quantized.bf16(ctx.size)}
    for kind, quantize in (("LoRA", None), ("QLoRA", quantized.QCFG)):
        got = finetune.lora(ctx, c.ALL_LINEAR, quantize, size=sizes[kind])
        name = f"lora_jax {kind}"
        steps[name], figures[name] = (
            got["step"],
            {**got["figures"], "frozen_bytes": got["frozen_bytes"]},
        )
    try:
        import qwix  # noqa: F401 - only probes that the optional peer is installed
    except ImportError as e:
        errors["qwix LoRA"] = errors["qwix QLoRA"] = f"qwix is not installed ({INSTALL}): {e}"
    else:
        for kind, qtype in (("LoRA", None), ("QLoRA", "nf4")):
            name, sz = f"qwix {kind}", sizes[kind]
            ctx.log(f"  compiling {name}")
            model, batch, _ = finetune.setup(ctx, sz)
            try:
                steps[name], figures[name] = qwix_step(model, batch, sz.rank, qtype, c.loss_for(sz))
            except Exception as e:  # a failing peer is a row, not a crash
                errors[name] = f"qwix failed: {type(e).__name__}: {e}"
    ctx.log(f"  timing {len(steps)} steps")
    times = c.time_steps(steps, ctx.runs)
    rows = {}
    for name in ("lora_jax LoRA", "qwix LoRA", "lora_jax QLoRA", "qwix QLoRA"):
        if name in errors:
            rows[name] = _skip(errors[name])
            continue
        kind = name.split()[1]
        ref = f"lora_jax {kind}"
        tokens = sizes[kind].tokens
        r = {
            **figures[name],
            **times[name],
            "tokens_per_s": tokens / (times[name]["ms"] / 1e3),
            "dtype": jnp.dtype(sizes[kind].model.dtype).name,
        }
        r["time_vs_lora_jax"] = c.ratio(times[name]["ms"], times[ref]["ms"])
        r["memory_vs_lora_jax"] = c.ratio(r["peak_bytes"], figures[ref]["peak_bytes"])
        rows[name] = r
    return rows


# --------------------------------------------------------------------------- nnx.LoRALinear


class DenseMLP(nn.Module):
    """`layers` Dense layers of `width` with ReLU between them (linen, for lj.LoRA)."""

    width: int
    layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype, name=f"fc{i}")(x)
            x = nn.relu(x) if i < self.layers - 1 else x
        return x


def mlp_shapes(sz: c.Size) -> tuple[int, int, int]:
    """(width, layers, rows): the MLP benchmark's shapes for a size (rows = tokens per step)."""
    return sz.model.hidden_size, 4, sz.tokens


def nnx_rows(ctx: c.Context) -> dict:
    """nnx.LoRALinear MLP vs lj.LoRA over a linen MLP of the same shapes."""
    from flax import nnx

    sz = ctx.size
    width, layers, rows = mlp_shapes(sz)
    dtype = sz.model.dtype
    x = jax.random.normal(jax.random.key(0), (rows, width), dtype)
    y = jax.random.normal(jax.random.key(1), (rows, width), dtype)
    batch = (x, y)
    mse = lambda out, y: jnp.mean(jnp.square(out.astype(jnp.float32) - y.astype(jnp.float32)))
    tx = optax.adamw(1e-4)

    # lora_jax: linen Dense layers wrapped by lj.LoRA, every layer adapted.
    mlp = DenseMLP(width, layers, dtype)
    base = jax.jit(mlp.init)(jax.random.key(2), x)
    lora_model = lj.LoRA(mlp, lj.LoraConfig(rank=sz.rank, alpha=2.0 * sz.rank, targets=r"fc\d+"))
    params = lj.init(lora_model, jax.random.key(3), x, base_params=base)
    step = lj.make_train_step(lora_model, lambda apply, b: mse(apply(b[0]), b[1]), tx)
    trainable, frozen = lj.partition(params)
    args = (jax.tree.map(jnp.copy, trainable), frozen, step.init(params), batch, None)
    steps, figures = {}, {}
    steps["lora_jax"], figures["lora_jax"] = c.compile_step(
        step.jitted, args, lambda a, out: (out[0], a[1], out[1], a[3], a[4])
    )

    # nnx: LoRALinear layers; the adapters (nnx.LoRAParam) are differentiated and updated in a
    # jax.jit'ed step over nnx.split state (the functional form, no per-call graph traversal).
    class NnxMLP(nnx.Module):
        def __init__(self, rngs):
            for i in range(layers):  # one attribute per layer: works across nnx versions
                setattr(
                    self,
                    f"fc{i}",
                    nnx.LoRALinear(
                        width,
                        width,
                        lora_rank=sz.rank,
                        lora_dtype=dtype,
                        dtype=dtype,
                        param_dtype=dtype,
                        rngs=rngs,
                    ),
                )

        def __call__(self, x):
            for i in range(layers):
                x = getattr(self, f"fc{i}")(x)
                x = jax.nn.relu(x) if i < layers - 1 else x
            return x

    model = NnxMLP(nnx.Rngs(0))
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    def nnx_step(lora_state, rest, opt_state, batch):
        def objective(lora_state):
            return mse(nnx.merge(graphdef, lora_state, rest)(batch[0]), batch[1])

        value, grads = jax.value_and_grad(objective)(lora_state)
        updates, opt_state = tx.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, value

    nargs = (lora_state, rest, tx.init(lora_state), batch)
    steps["nnx"], figures["nnx"] = c.compile_step(
        jax.jit(nnx_step, donate_argnums=(0, 2)), nargs, lambda a, out: (out[0], a[1], out[1], a[3])
    )
    times = c.time_steps(steps, ctx.runs)
    out = {}
    for name in ("lora_jax", "nnx"):
        r = {**figures[name], **times[name]}
        r["time_vs_lora_jax"] = c.ratio(r["ms"], times["lora_jax"]["ms"])
        r["memory_vs_lora_jax"] = c.ratio(r["peak_bytes"], figures["lora_jax"]["peak_bytes"])
        out[name] = r
    return {
        "shape": f"{layers} x Dense({width}, {width}) + bias, {rows} rows, rank {sz.rank}, "
        f"{jnp.dtype(dtype).name}",
        "rows": out,
    }


# --------------------------------------------------------------------------- PEFT


def peft_row(
    ctx: c.Context,
    lora_ms: float | None,
    targets=c.ALL_LINEAR,
    *,
    compile: bool = False,
    use_dora: bool = False,
    liger: bool = False,
) -> dict:
    """PEFT's step time on the same config, in a child process (its own GPU memory pool);
    with `compile`, PEFT under `torch.compile`; with `use_dora`, PEFT's DoRA; with `liger`,
    Liger's kernels in the model."""
    if liger and importlib.util.find_spec("liger_kernel") is None:  # no child process then
        return _skip("Liger not installed (pip install liger-kernel, or carry its wheel in .whl/)")
    sz = ctx.size
    m = sz.model
    spec = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_layers": m.num_layers,
        "num_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.rms_norm_eps,
        "tie_embeddings": m.tie_embeddings,
        "max_seq_len": max(m.max_seq_len, sz.seq),
        "dtype": jnp.dtype(m.dtype).name,
        "batch": sz.batch,
        "seq": sz.seq,
        "rank": sz.rank,
        "targets": list(targets),
        "runs": max(ctx.runs, c.MIN_RUNS),
        "chunked_loss": sz.chunked_loss,
        "compile": compile,
        "use_dora": use_dora,
        "liger": liger,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peft.json")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.torch_peft",
            "--spec",
            json.dumps(spec),
            "--json",
            out,
        ]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return _skip("PEFT run timed out")
        if not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return _skip("PEFT run failed: " + " | ".join(tail))
        with open(out) as f:
            row = json.load(f)
    if "skipped" not in row and lora_ms is not None:
        row["time_vs_lora_jax"] = c.ratio(row["ms"], lora_ms)
        row["lora_jax_speedup"] = c.ratio(row["ms"], lora_ms)
    return row


# --------------------------------------------------------------------------- the case


def run(ctx: c.Context, *, peft: bool | None = None) -> dict:
    result = {"title": TITLE, "size": ctx.size.describe()}
    # PEFT first, in its child process, before this process's JAX allocator grows.
    peft = jax.default_backend() == "gpu" if peft is None else peft
    if peft:
        ctx.log("  PEFT (child process)")
        result["peft"] = peft_row(ctx, None)
    else:
        result["peft"] = _skip(
            "not run on this backend (PEFT runs on GPU; --peft runs it here when torch, "
            "transformers and peft are installed)"
        )
    result["qwix"] = qwix_rows(ctx)
    p = result["peft"]
    if "skipped" not in p:
        lora_ms = result["qwix"]["lora_jax LoRA"]["ms"]
        p["time_vs_lora_jax"] = c.ratio(p["ms"], lora_ms)
        p["lora_jax_speedup"] = c.ratio(p["ms"], lora_ms)
    ctx.log("  nnx.LoRALinear MLP")
    try:
        result["nnx"] = nnx_rows(ctx)
    except Exception as e:
        result["nnx"] = {"rows": {"nnx": _skip(f"nnx failed: {type(e).__name__}: {e}")}}
    return result


def markdown(result: dict) -> str:
    q = result["qwix"]
    out = [
        f"**Peers** — {result['size']}, LoRA on all linear layers; ratios > 1: the peer is slower "
        "or uses more memory than lora_jax",
        "",
        "| implementation | ms | tokens/s | time / lora_jax | peak MB | memory / lora_jax | frozen MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in q.items():
        if "skipped" in r:
            out.append(f"| {name} | {r['skipped']} | | | | | |")
            continue
        out.append(
            f"| {name} ({r['dtype']}) | {c.fmt(r['ms'])} | {c.fmt(r['tokens_per_s'], 0)} | {c.fmt(r['time_vs_lora_jax'])} "
            f"| {c.fmt(c.mb(r['peak_bytes']), 1)} | {c.fmt(r['memory_vs_lora_jax'])} "
            f"| {c.fmt(c.mb(r['frozen_bytes']), 2)} |"
        )
    p = result["peft"]
    if "skipped" in p:
        out.append(f"| PEFT (PyTorch) | {p['skipped']} | | | | | |")
    else:
        out.append(
            f"| PEFT {p.get('peft', '')} (torch {p.get('torch', '')}, {p.get('device', '')}) "
            f"| {c.fmt(p['ms'])} | {c.fmt(p['tokens_per_s'], 0)} | {c.fmt(p['time_vs_lora_jax'])} "
            f"| {c.fmt(c.mb(p.get('peak_bytes')), 1)} | – | – |"
        )
    n = result["nnx"]
    out += [
        "",
        f"nnx.LoRALinear vs lj.LoRA on an all-Dense MLP ({n.get('shape', '')}):",
        "",
        "| implementation | ms | time / lora_jax | peak MB | memory / lora_jax |",
        "|---|---|---|---|---|",
    ]
    for name, r in n["rows"].items():
        label = {"nnx": "flax nnx.LoRALinear", "lora_jax": "lora_jax (lj.LoRA over nn.Dense)"}[name]
        if "skipped" in r:
            out.append(f"| {label} | {r['skipped']} | | | |")
            continue
        out.append(
            f"| {label} | {c.fmt(r['ms'], 3)} | {c.fmt(r['time_vs_lora_jax'])} "
            f"| {c.fmt(c.mb(r['peak_bytes']), 1)} | {c.fmt(r['memory_vs_lora_jax'])} |"
        )
    return "\n".join(out)


def bars(result: dict):
    out = []
    for name, r in result["qwix"].items():
        if name.startswith("qwix"):
            out.append((f"{name} time", r.get("time_vs_lora_jax"), None))
            out.append((f"{name} memory", r.get("memory_vs_lora_jax"), None))
    nnx = result["nnx"]["rows"].get("nnx", {})
    out.append(("nnx.LoRALinear time", nnx.get("time_vs_lora_jax"), None))
    out.append(("PEFT time", result["peft"].get("time_vs_lora_jax"), None))
    return out
