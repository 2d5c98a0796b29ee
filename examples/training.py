"""What the examples share: a training loop with smooth progress and checkpoints that a run can
resume from (and that Ctrl-C leaves in order), the output directory, the plot.

The loop keeps the device busy: it dispatches step i, then reads the loss of step i - 1 (which
is done by then, or nearly), so the bar moves once per finished step and shows the true rate,
never waits on the step that is running, and never runs ahead of the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

import lora_jax as lj


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help (a default of
    None is spelled out in the flag's own help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class Progress:
    """A tqdm bar (or, without tqdm, a line every `every` steps) with loss, rate and ETA."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step") -> None:
        self.total, self.desc, self.done, self.begin = total, desc, initial, time.perf_counter()
        self.start = initial
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is in the `examples` extra; fall back to plain lines
            self.bar = None
        else:
            self.bar = tqdm(
                total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                file=sys.stdout,
            )  # fmt: skip

    def update(self, **postfix: Any) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        every = max(1, self.total // 20)
        if self.done % every == 0 or self.done == self.total:
            rate = (self.done - self.start) / (time.perf_counter() - self.begin)
            eta = (self.total - self.done) / max(rate, 1e-9)
            shown = "  ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"{self.desc} {self.done}/{self.total}  {shown}  ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    step: Callable,
    params: Any,
    opt_state: Any,
    batches: Iterator[Any],
    *,
    steps: int,
    start: int = 0,
    rng: jax.Array | None = None,
    desc: str = "fine-tune",
    tokens_per_step: int = 0,
    losses: list | None = None,
    checkpoint_every: int = 0,
    checkpoint: Callable[[int, Any, Any, list], None] | None = None,
) -> tuple[Any, Any, list]:
    """Runs steps `start` .. `steps` - 1 of `step(params, opt_state, batch, rng=...)`.

    Returns the params, optimizer state and [(step, loss)] (every step's loss).
    `checkpoint(done, params, opt_state, losses)` is called after every `checkpoint_every`-th
    step and after the last one, with that step's own params (a checkpoint waits for its step;
    the others never wait). A KeyboardInterrupt goes through once the running step is done.
    """
    losses = list(losses or [])
    bar = Progress(steps, desc, start)
    pending = None  # (index, device loss) of the step dispatched last
    begin = time.perf_counter()

    def finish(index: int, loss: Any) -> None:
        losses.append((index, float(loss)))  # blocks until that step is done
        rate = tokens_per_step * (index + 1 - start) / (time.perf_counter() - begin)
        bar.update(loss=f"{losses[-1][1]:.3f}", tok_s=f"{rate:,.0f}")

    try:
        for i in range(start, steps):
            key = None if rng is None else jax.random.fold_in(rng, i)
            params, opt_state, loss = step(params, opt_state, next(batches), rng=key)
            if pending is not None:
                finish(*pending)
            pending = (i, loss)
            done = i + 1
            if checkpoint is not None and (
                done == steps or (checkpoint_every and done % checkpoint_every == 0)
            ):
                finish(*pending)
                pending = None
                checkpoint(done, params, opt_state, losses)
        if pending is not None:
            finish(*pending)
    finally:
        bar.close()
    return params, opt_state, losses


def prepare_out(out: Path, resume: bool, what: tuple[str, ...]) -> None:
    """Creates `out`; says so when a new run is about to replace an earlier run's results."""
    out.mkdir(parents=True, exist_ok=True)
    old = [name for name in what if (out / name).exists()]
    if old and not resume:
        print(f"note: {out} holds an earlier run's {', '.join(old)}: this run replaces them")


def open_checkpoints(directory: Path, resume: bool) -> tuple[lj.CheckpointManager, bool]:
    """The run's checkpoint manager, and whether to resume from it (saying what happens)."""
    ckpt = lj.CheckpointManager(directory, max_to_keep=2)
    latest = ckpt.latest_step()
    if resume and latest is None:
        print(f"--resume: no checkpoint in {directory}: starting a fresh run")
    elif not resume and latest is not None:
        print(f"new run: removing the checkpoints of the last run in {directory}")
        for old in ckpt.all_steps():
            ckpt.delete(old)
    return ckpt, resume and latest is not None


def run_main(main: Callable[[], Any]) -> None:
    """Runs a script's `main()`; after Ctrl-C (exit code 130, checkpoints already closed) the
    process ends at once, without the interpreter's teardown, which can crash while XLA's
    threads are still winding down from an interrupted step."""
    try:
        main()
    except SystemExit as e:
        if e.code != 130:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def interrupted(ckpt: lj.CheckpointManager) -> int:
    """Ctrl-C: finishes the checkpoint in flight and says where --resume would continue."""
    ckpt.close()
    latest = ckpt.latest_step()
    where = (
        f"run again with --resume to continue from step {latest} ({ckpt.directory})"
        if latest is not None
        else "no checkpoint was saved yet: a new run starts over"
    )
    print(f"\ninterrupted: {where}")
    return 130


def plot(path: Path, panels: list[tuple[str, str, list, dict]]) -> Path | None:
    """One PNG with a panel per (title, ylabel, [(x, y)], horizontal lines {label: y})."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[examples]'): no plot.")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, ylabel, points, lines) in zip(axes[0], panels, strict=True):
        if points:
            marker = "o" if len(points) < 20 else None
            ax.plot(*zip(*points, strict=True), marker=marker)
        for i, (label, y) in enumerate(lines.items()):
            ax.axhline(y, ls=("--", ":", "-.")[i % 3], color=f"C{i + 1}", label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
