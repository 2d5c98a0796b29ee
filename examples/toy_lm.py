"""The quick path of the main example (`--model tiny` or `small`): a small decoder pretrained
here for a minute on the standard library's Python source, then fine-tuned on text of another
style — the standard library's English docstrings, or your own text with `--data FILE` —
measured as held-out loss. Bytes are the tokens; every Python installation has the data.
"""

from __future__ import annotations

import ast
import itertools
import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import training

from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

CORPUS_BYTES = 2_000_000


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
    """Endless random windows of seq + 1 tokens: inputs and next-token targets. Batch i
    depends only on (seed, i), so a resumed run continues at `start` = i."""
    for i in itertools.count(start):
        starts = np.random.default_rng((seed, i)).integers(0, len(tokens) - seq - 1, size=batch)
        window = np.stack([tokens[s : s + seq + 1] for s in starts])
        yield {"inputs": jnp.asarray(window[:, :-1]), "targets": jnp.asarray(window[:, 1:])}


def eval_loss(apply: Any, params: Any, eval_set: list) -> float:
    loss = jax.jit(lambda p, b: causal_lm_loss(apply(p, b["inputs"]), b["targets"]))
    # Each loss made a Python float here, not inside NumPy's array conversion: a Ctrl-C that
    # lands while a value is fetched then stays a KeyboardInterrupt (NumPy turns an exception
    # raised inside its conversion into a ValueError).
    return float(np.mean([float(loss(params, b)) for b in eval_set]))


class Task:
    """The toy flow for `finetune_lm.fine_tune`: pretrains (or reloads) the base, serves the
    fine-tuning batches and measures held-out loss."""

    metric, higher_is_better = "held-out loss", False

    def __init__(self, args: Any) -> None:
        self.args = args
        files = stdlib_files()
        base_train, _ = split(code_corpus(files))
        if args.data is not None:
            text = args.data.read_bytes()
            if len(text) < 4 * (args.seq + 1):
                sys.exit(
                    f"--data: {args.data} has {len(text)} bytes; need at least {4 * (args.seq + 1)}."
                )
        else:
            text = docstring_corpus(files)
        self.train_tokens, held = split(text)
        self.held = [
            b
            for _, b in zip(range(8), batches(held, args.batch, args.seq, seed=1234), strict=False)
        ]
        print(
            f"corpora: {len(base_train):,} bytes of code to pretrain, {len(self.train_tokens):,} "
            f"bytes of {'--data' if args.data else 'docstrings'} to fine-tune, {len(held):,} held out"
        )
        cfg = getattr(LlamaConfig, args.model)(vocab_size=256, max_seq_len=max(args.seq, 128))
        self.model = Llama(cfg)
        self.sample = jnp.zeros((1, args.seq), jnp.int32)
        self.base_train = base_train
        self.pretrain_losses: list = []
        self.tokens_per_step = args.batch * args.seq

    def base(self, resume: bool) -> Any:
        """The pretrained weights: trained now, or (when resuming) those the run saved."""
        args, key = self.args, jax.random.key(self.args.seed)
        path = (args.out / "base_model").absolute()
        if resume and path.is_dir():
            with ocp.StandardCheckpointer() as ckptr:
                base = ckptr.restore(path, jax.eval_shape(self.model.init, key, self.sample))
            self.pretrain_losses = json.loads((args.out / "base_losses.json").read_text())
            return base
        base = jax.jit(self.model.init)(jax.random.fold_in(key, 0), self.sample)
        base, self.pretrain_losses = self._pretrain(base)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, base, force=True)
        (args.out / "base_losses.json").write_text(json.dumps(self.pretrain_losses))
        return base

    def _pretrain(self, params: Any) -> tuple[Any, list]:
        """Full training of the base model (not LoRA): the 'pretrained' weights to adapt."""
        args, model = self.args, self.model
        tx = optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, max(args.base_steps, 21))
        )

        @jax.jit
        def step(params: Any, opt_state: Any, batch: dict, rng: Any = None) -> tuple:
            def loss_fn(p: Any) -> Any:
                return causal_lm_loss(model.apply(p, batch["inputs"]), batch["targets"])

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        params, _, losses = training.train(
            step, params, tx.init(params), batches(self.base_train, args.batch, args.seq, args.seed),
            steps=args.base_steps, desc="pretrain (code)", tokens_per_step=self.tokens_per_step,
        )  # fmt: skip
        return params, losses

    def batches(self, start: int) -> Any:
        a = self.args
        return batches(self.train_tokens, a.batch, a.seq, a.seed + 1, start=start)

    def loss_fn(self, apply: Any, batch: dict) -> Any:
        return causal_lm_loss(apply(batch["inputs"]), batch["targets"])

    def evaluate(self, model: Any, params: Any) -> tuple[float, list]:
        return eval_loss(model.apply, params, self.held), []

    def held_out_loss(self, model: Any, params: Any) -> float:
        return self.evaluate(model, params)[0]

    def check_input(self) -> Any:
        return self.held[0]["inputs"]

    def panels(self, losses: list, curve: list) -> list:
        return [
            ("1. Pretraining on Python source", "train loss (nats/byte)", self.pretrain_losses, {}),
            ("2. LoRA fine-tuning", "train loss (nats/byte)", losses, {}),
            ("Held-out loss on the fine-tuning text", "loss (nats/byte)", curve, {}),
        ]
