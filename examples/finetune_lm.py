"""LoRA fine-tuning of a small Llama-style model, end to end, on CPU in about two minutes.

1. Pretrain the reference decoder briefly on Python source code (the standard library's own
   .py files: every Python installation has them).
2. LoRA-fine-tune it on text of another style: the English docstrings of those modules, or
   your own text with `--data FILE`.
3. Report held-out loss before and after, save the adapter (safetensors + JSON), check that
   the merged model equals the adapted one, and plot the loss curves.

The fine-tuning saves a train-state checkpoint every --ckpt-every steps (adapters, optimizer
state, data position; the pretrained base is saved once, beside them). Interrupt it and run
again with --resume (and the same flags) to continue from the latest checkpoint.

Run: python examples/finetune_lm.py            (defaults)
     python examples/finetune_lm.py --resume   (continue an interrupted run)
     python examples/finetune_lm.py --help     (model size, rank, steps, targets, data)
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

CORPUS_BYTES = 2_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", choices=("tiny", "small"), default="small", help="reference model size"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument(
        "--targets",
        default="q_proj,v_proj",
        help="comma-separated module names to adapt",
    )
    p.add_argument("--base-steps", type=int, default=100, help="pretraining steps on source code")
    p.add_argument("--steps", type=int, default=200, help="LoRA fine-tuning steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--data", type=Path, help="a UTF-8 text file to fine-tune on instead of docstrings"
    )
    p.add_argument("--out", type=Path, default=Path("runs/finetune_lm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ckpt-dir", type=Path, help="train-state checkpoints (default: OUT/checkpoints)"
    )
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N LoRA steps")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --ckpt-dir (run with the same flags)",
    )
    args = p.parse_args(argv)
    args.ckpt_dir = args.ckpt_dir or args.out / "checkpoints"
    return args


# --------------------------------------------------------------------------- data


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        sys.exit(
            f"No Python sources found under {root}; pass --data FILE for the fine-tuning text."
        )
    return files


def code_corpus(files: list[Path]) -> bytes:
    """Python source code: the base model's pretraining style."""
    out = bytearray()
    for path in files:
        out += path.read_bytes() + b"\n"
        if len(out) >= CORPUS_BYTES:
            break
    return bytes(out[:CORPUS_BYTES])


def docstring_corpus(files: list[Path]) -> bytes:
    """English prose: every module, class and function docstring of the same files."""
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        ]
        docs += [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 40]
    return "\n\n".join(docs).encode("utf-8")[:CORPUS_BYTES]


def split(data: bytes, held_out: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int32)  # byte-level tokens
    cut = int(len(tokens) * (1 - held_out))
    return tokens[:cut], tokens[cut:]


def batches(tokens: np.ndarray, batch: int, seq: int, seed: int, start: int = 0):
    """Endless random windows of seq + 1 tokens: inputs and next-token targets.

    Batch i depends only on (seed, i), so a resumed run continues at `start` = i.
    """
    for i in itertools.count(start):
        starts = np.random.default_rng((seed, i)).integers(0, len(tokens) - seq - 1, size=batch)
        window = np.stack([tokens[s : s + seq + 1] for s in starts])
        yield {"inputs": jnp.asarray(window[:, :-1]), "targets": jnp.asarray(window[:, 1:])}


def eval_batches(tokens: np.ndarray, batch: int, seq: int, count: int = 8):
    """Fixed held-out windows, the same before and after fine-tuning."""
    return [b for _, b in zip(range(count), batches(tokens, batch, seq, seed=1234), strict=False)]


# --------------------------------------------------------------------------- training


def progress(total: int, desc: str, initial: int = 0):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the `examples` extra; fall back to plain lines
        return None
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stdout)


def run(
    steps: int,
    desc: str,
    step_fn,
    state,
    data,
    tokens_per_step: int,
    rng_key=None,
    *,
    start: int = 0,
    losses=(),
    after_step=None,
):
    """Steps `start` .. `steps` - 1; `after_step(done, state, losses)` follows each step."""
    bar, losses = progress(steps, desc, start), [tuple(x) for x in losses]
    begin = time.perf_counter()
    for i in range(start, steps):
        batch = next(data)
        rng = None if rng_key is None else jax.random.fold_in(rng_key, i)
        *state, loss = step_fn(*state, batch, rng)
        if i % 10 == 0 or i == steps - 1:
            loss = float(loss)
            losses.append((i, loss))
            tok_s = tokens_per_step * (i + 1 - start) / (time.perf_counter() - begin)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            elif i % 50 == 0 or i == steps - 1:
                print(
                    f"{desc} step {i + 1}/{steps}  loss {loss:.3f}  {tok_s:,.0f} tok/s", flush=True
                )
        if bar is not None:
            bar.update(1)
        if after_step is not None:
            after_step(i + 1, state, losses)
    if bar is not None:
        bar.close()
    return state, losses


def pretrain(model, params, args, data):
    """Full training of the base model (not LoRA): the 'pretrained' weights to adapt."""
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, max(args.base_steps, 21)))

    @jax.jit
    def step(params, opt_state, batch, rng):
        def loss_fn(p):
            return causal_lm_loss(model.apply(p, batch["inputs"]), batch["targets"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state, losses = run(
        args.base_steps,
        "pretrain (code)",
        lambda p, s, b, r: step(p, s, b, None),
        (params, tx.init(params)),
        data,
        args.batch * args.seq,
    )
    return state[0], losses


def eval_loss(apply, params, eval_set) -> float:
    loss = jax.jit(lambda p, b: causal_lm_loss(apply(p, b["inputs"]), b["targets"]))
    return float(np.mean([loss(params, b) for b in eval_set]))


def save_base(out: Path, base, losses) -> None:
    """The pretrained weights and their loss curve: what a resumed run starts from."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((out / "base_model").absolute(), base, force=True)
    (out / "base_losses.json").write_text(json.dumps(losses))


def load_base(out: Path, like):
    """What `save_base` wrote; `like` gives the shapes (from `jax.eval_shape`)."""
    if not (out / "base_model").is_dir():
        sys.exit(f"--resume: no pretrained weights in {out / 'base_model'}; run without --resume.")
    with ocp.StandardCheckpointer() as ckptr:
        base = ckptr.restore((out / "base_model").absolute(), like)
    return base, json.loads((out / "base_losses.json").read_text())


def plot(out: Path, base_losses, lora_losses, before: float, after: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no plot.")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(*zip(*base_losses, strict=True), label="train")
    ax1.set(title="1. Pretraining on Python source", xlabel="step", ylabel="loss (nats/byte)")
    ax2.plot(*zip(*lora_losses, strict=True), label="train", color="tab:orange")
    ax2.axhline(before, ls="--", color="gray", label=f"held-out before {before:.3f}")
    ax2.axhline(after, ls=":", color="tab:green", label=f"held-out after {after:.3f}")
    ax2.set(title="2. LoRA fine-tuning on prose", xlabel="step")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))")
    files = stdlib_files()
    base_train, _ = split(code_corpus(files))
    if args.data is not None:
        if not args.data.is_file():
            sys.exit(f"--data: no such file: {args.data}")
        tune_text = args.data.read_bytes()
        if len(tune_text) < 4 * (args.seq + 1):
            sys.exit(
                f"--data: {args.data} has {len(tune_text)} bytes; need at least {4 * (args.seq + 1)}."
            )
    else:
        tune_text = docstring_corpus(files)
    tune_train, tune_held = split(tune_text)
    print(
        f"corpora: {len(base_train):,} bytes of code to pretrain, {len(tune_train):,} bytes "
        f"of {'--data' if args.data else 'docstrings'} to fine-tune, {len(tune_held):,} held out"
    )

    model_cfg = getattr(LlamaConfig, args.model)(vocab_size=256, max_seq_len=max(args.seq, 128))
    model = Llama(model_cfg)
    key = jax.random.key(args.seed)
    sample = jnp.zeros((1, args.seq), jnp.int32)
    ckpt = lj.CheckpointManager(args.ckpt_dir, max_to_keep=2)
    resume = args.resume and ckpt.latest_step() is not None
    if resume:
        base, base_losses = load_base(args.out, jax.eval_shape(model.init, key, sample))
    else:
        if ckpt.all_steps():
            print(f"new run: removing the checkpoints of the last run in {args.ckpt_dir}")
            for old in ckpt.all_steps():
                ckpt.delete(old)
        base = jax.jit(model.init)(jax.random.fold_in(key, 0), sample)
        base, base_losses = pretrain(
            model, base, args, batches(base_train, args.batch, args.seq, args.seed)
        )
        save_base(args.out, base, base_losses)

    cfg = lj.LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
    )
    lora_model = lj.LoRA(model, cfg)
    params = lj.init(lora_model, jax.random.fold_in(key, 1), sample, base_params=base)
    print(lj.summary(params))

    held = eval_batches(tune_held, args.batch, args.seq)
    before = eval_loss(model.apply, base, held)
    tx = lj.optimizer(
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 10, max(args.steps, 11))),
        params,
    )
    step = lj.make_train_step(
        lora_model, lambda apply, b: causal_lm_loss(apply(b["inputs"]), b["targets"]), tx
    )
    dropout_key = jax.random.fold_in(key, 2) if args.dropout > 0 else None
    opt_state, start, lora_losses, resumed_from = step.init(params), 0, [], None
    if resume:
        trainable, frozen = lj.partition(params)
        try:
            state = ckpt.restore(trainable_like=trainable, opt_state_like=opt_state, config=cfg)
        except ValueError as e:
            sys.exit(f"--resume: {e}")
        params, opt_state = lj.combine(state.trainable, frozen), state.opt_state
        start, lora_losses = state.data_state["position"], state.data_state["losses"]
        dropout_key, resumed_from = state.rng, state.step
        print(f"resumed from step {state.step} ({args.ckpt_dir})")

    def checkpoint(done, state, losses):
        if done % args.ckpt_every == 0 or done == args.steps:
            trainable = lj.partition(state[0])[0]
            position = {"position": done, "losses": losses}
            ckpt.save(done, trainable, state[1], rng=dropout_key, data_state=position, config=cfg)

    (params, opt_state), lora_losses = run(
        args.steps,
        "LoRA fine-tune",
        lambda p, s, b, r: step(p, s, b, rng=r),
        (params, opt_state),
        batches(tune_train, args.batch, args.seq, args.seed + 1, start=start),
        args.batch * args.seq,
        dropout_key,
        start=start,
        losses=lora_losses,
        after_step=checkpoint,
    )
    ckpt.close()
    # The step skips (and counts) an update whose loss or gradient is NaN or inf.
    print(f"updates skipped for a non-finite loss or gradient: {step.skipped(opt_state)}")
    after = eval_loss(lora_model.apply, params, held)
    print(
        f"held-out loss on the fine-tuning text: before {before:.4f}  after {after:.4f} "
        f"({100 * (before - after) / before:.1f}% lower)"
    )

    adapter = lj.save_adapter(args.out / "adapter", params, cfg) / "adapter.safetensors"
    print(f"adapter saved: {adapter} ({os.path.getsize(adapter):,} bytes)")
    merged = lj.merge(params)
    x = held[0]["inputs"]
    diff = float(jnp.max(jnp.abs(model.apply(merged, x) - lora_model.apply(params, x))))
    print(f"merged model vs adapted model: max |logit difference| = {diff:.2e}")
    if diff > 1e-3:
        sys.exit("merged model does not match the adapted model")
    png = plot(args.out, base_losses, lora_losses, before, after)
    if png:
        print(f"loss curves: {png}")
    return {
        "before": before,
        "after": after,
        "merge_diff": diff,
        "resumed_from": resumed_from,
        "skipped": step.skipped(opt_state),
    }


if __name__ == "__main__":
    main()
