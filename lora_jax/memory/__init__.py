"""Memory of a train step, estimated from shapes alone: nothing is compiled or allocated.

`estimate_memory(config, batch=..., seq=..., mode=...)` gives the bytes of one train step of
`lora_jax.models.Llama` (full fine-tuning, LoRA or QLoRA; any optax optimizer; with or without
rematerialization), term by term:

- base weights, trainable parameters and optimizer state: the leaves of `jax.eval_shape` of
  the model's init (`lora_jax.init` for LoRA/QLoRA, 4-bit kernels as packed codes and scales)
  and of `optimizer.init` over the trainable leaves. Exact.
- gradients: one array per trainable leaf, of its shape and dtype. Exact.
- activations: what the backward pass keeps. The loss is traced under `jax.vjp` with respect
  to the trainable leaves (`jax.make_jaxpr`, ShapeDtypeStruct inputs), which lists the
  residuals JAX saves for the backward pass, so a remat policy or a frozen kernel shows up
  by itself. Residuals that XLA never writes to memory are not counted: arguments
  (parameters, token ids), and residuals that a cheap elementwise op (convert, broadcast,
  reshape, compare, select, ...) makes from arrays that are kept anyway; XLA fuses such an
  op into the backward computation that reads it.
- workspace: the largest array the step computes (the float32 logits at usual sizes; their
  gradient takes their place), plus, with rematerialization, one block's recomputed residuals
  or, with `scan_layers`, one iteration's residuals before they are stacked.
- token ids: the batch (inputs and targets, int32).

The peak is what persists (base weights, trainable parameters, optimizer state, token ids)
plus the step's temporaries: activations and gradients, plus the workspace. With unrolled
layers the backward pass frees each block's activations as it makes that block's gradients,
so the two do not peak together: the larger counts. With `scan_layers` the stacked gradient
buffers live through the whole backward loop: both count.

Layers are identical, so every term is linear in `num_layers`: models of 1 and of 2 layers
are traced and the terms extrapolated, exactly for uniform layers (tracing the 80-layer 70B
shapes whole took 5 to 16 s per mode on 2 CPU cores). A `LoraConfig` that can tell layers
apart (regular expressions, per-path patterns, names with a '/') is traced whole instead.

`benchmarks/memory_check.py` compares the estimate with XLA's compiled memory analysis;
docs/memory.md has the figures and the terms that differ.

Attention: with `attention="cudnn"` (fused flash attention, which cannot be traced without a
GPU) the step is traced on XLA's path and the score and probability arrays (four or more
axes, two of length seq) are replaced by what a flash kernel keeps: a float32 log-sum-exp per
query and head. Where seq equals another length of the model (head_dim, heads, batch, ...),
the scores are told apart in a second trace at another sequence length.

`python -m lora_jax.memory --model llama3_8b --batch 1 --seq 4096` prints the table for full
fine-tuning, LoRA and QLoRA (`--model all`: the 1B, 3B, 8B and 70B reference shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import optax

from lora_jax.config import ALL_LINEAR, LoraConfig, QuantConfig
from lora_jax.linen import LoRA, init
from lora_jax.models.llama import REMAT_POLICIES, Llama, LlamaConfig, causal_lm_loss
from lora_jax.ops.partition import combine, partition

MODES = ("full", "lora", "qlora")
ATTENTION = ("xla", "cudnn")
GIB = 2**30
# The LoRA of the estimates unless one is given: rank 16, alpha 32 on every linear layer of the
# blocks (q, k, v, o, gate, up, down; not lm_head), adapters in float32.
DEFAULT_LORA = LoraConfig(rank=16, alpha=32.0, targets=ALL_LINEAR)
# The reference sizes of the CLI table, by name.
REFERENCE = {
    "llama_1b": LlamaConfig.llama_1b,
    "llama_3b": LlamaConfig.llama_3b,
    "llama3_8b": LlamaConfig.llama3_8b,
    "llama3_70b": LlamaConfig.llama3_70b,
}
# Primitives that XLA fuses into their consumers instead of writing their output to memory.
_CHEAP = frozenset(
    "broadcast_in_dim convert_element_type reshape squeeze expand_dims transpose iota eq ne lt "
    "le gt ge and or not select_n copy copy_p reduce_precision slice".split()
)
_CALLS = ("jit", "pjit")

Loss = Callable[[Any, Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes of one train step, by term (see the module docstring for how each is found).

    Attributes:
      mode: "full", "lora" or "qlora".
      base_weights: the frozen parameters (4-bit kernels as stored); 0 for full fine-tuning.
      trainable: the trained parameters: adapters, or every parameter for full fine-tuning.
      gradients: one gradient per trainable parameter.
      optimizer_state: the optimizer's state for the trainable parameters.
      activations: what the forward pass keeps for the backward pass.
      workspace: the largest array the step makes (the float32 logits at usual sizes), plus
        with remat one block's recomputed residuals, or with `nn.scan` one iteration's.
      inputs: the token ids (inputs and targets).
      stacked: the blocks run under `nn.scan`: gradients and activations peak together.
    """

    mode: str
    base_weights: int
    trainable: int
    gradients: int
    optimizer_state: int
    activations: int
    workspace: int
    inputs: int
    stacked: bool = False

    @property
    def persistent(self) -> int:
        """Bytes that live between steps: weights, optimizer state and the batch."""
        return self.base_weights + self.trainable + self.optimizer_state + self.inputs

    @property
    def temporaries(self) -> int:
        """Bytes the step allocates while it runs: activations, gradients, workspace."""
        both = self.activations + self.gradients
        return (both if self.stacked else max(self.activations, self.gradients)) + self.workspace

    @property
    def peak(self) -> int:
        """The estimated peak: persistent bytes plus the step's temporaries."""
        return self.persistent + self.temporaries

    @property
    def total(self) -> int:
        """Every term added up: an upper bound that ignores when each is freed."""
        return self.persistent + self.gradients + self.activations + self.workspace

    def __str__(self) -> str:
        return table({self.mode: self})


ROWS = (
    ("base weights", "base_weights"),
    ("trainable parameters", "trainable"),
    ("gradients", "gradients"),
    ("optimizer state", "optimizer_state"),
    ("activations (saved for backward)", "activations"),
    ("workspace (logits, recompute)", "workspace"),
    ("token ids", "inputs"),
    ("peak (estimated)", "peak"),
    ("sum of all terms", "total"),
)


def table(estimates: dict[str, MemoryEstimate]) -> str:
    """A Markdown table in GiB: one row per term, one column per estimate (by its label).

    Example:
      >>> from lora_jax.models import LlamaConfig
      >>> est = estimate_memory(LlamaConfig.tiny(), batch=1, seq=8, mode="lora")
      >>> print(table({"LoRA": est}).splitlines()[0])
      | GiB | LoRA |
    """
    labels = list(estimates)
    out = ["| GiB | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, attr in ROWS:
        cells = [f"{getattr(estimates[k], attr) / GIB:,.2f}" for k in labels]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- the estimate


def estimate_memory(
    config: LlamaConfig,
    *,
    batch: int,
    seq: int,
    mode: str = "lora",
    lora: LoraConfig | None = None,
    optimizer: optax.GradientTransformation | None = None,
    remat: bool | str | None = None,
    attention: str | None = None,
) -> MemoryEstimate:
    """Estimates the memory of one train step of `Llama(config)`, without compiling anything.

    The step is the one `lora_jax.make_train_step` builds (gradients of the trainable leaves
    only, the optimizer over them), with the mean next-token cross-entropy
    (`lora_jax.models.causal_lm_loss`) over `batch` rows of `seq` tokens.

    Args:
      config: the model's shapes and dtypes (e.g. `LlamaConfig.llama3_8b()`).
      batch: rows per step.
      seq: tokens per row, at most `config.max_seq_len`.
      mode: "full" (every parameter trained), "lora" or "qlora" (LoRA on 4-bit base kernels).
      lora: the adapters for "lora" and "qlora"; default `DEFAULT_LORA` (rank 16, alpha 32,
        every linear layer of the blocks). For "qlora" without `lora.quantize`, NF4 with
        double quantization (`QuantConfig()`) computing in `config.dtype`.
      optimizer: any optax optimizer; default `optax.adamw(1e-4)` (two moments per trained
        parameter, in the parameter's dtype).
      remat: override `config.remat` (False, True or a `REMAT_POLICIES` name); None keeps it.
      attention: override `config.attention` for the estimate: "xla" (the (seq, seq) scores
        are kept for the backward pass) or "cudnn" (fused flash attention); None keeps the
        config's (None counts as "xla").

    Returns:
      A `MemoryEstimate`; `str()` of it is a table, `.peak` the estimated peak in bytes.

    Raises:
      TypeError, ValueError: an argument of the wrong type or value (named in the message).

    Example:
      >>> from lora_jax.models import LlamaConfig
      >>> cfg = LlamaConfig.tiny()
      >>> full = estimate_memory(cfg, batch=2, seq=16, mode="full")
      >>> lora = estimate_memory(cfg, batch=2, seq=16, mode="lora")
      >>> full.trainable == 4 * cfg.num_params(), lora.trainable < full.trainable
      (True, True)
    """
    config, mode, lora, optimizer = _checked(config, batch, seq, mode, lora, optimizer)
    flash = _attention(config, attention) == "cudnn"
    config = dataclasses.replace(  # traced on XLA's attention; flash is accounted for below
        config, remat=config.remat if remat is None else _checked_remat(remat), attention="xla"
    )
    trace = lambda cfg: _traced(cfg, batch, seq, mode, lora, optimizer, flash)
    layers = config.num_layers
    uniform = mode == "full" or _uniform(lora)
    counted = (1, 2) if uniform and layers > 2 else (layers,)
    terms = _extrapolate([trace(_layers(config, n)) for n in counted], counted, layers)
    if flash and config.remat is False:  # the flash kernel keeps a log-sum-exp per query
        terms["activations"] += layers * batch * config.num_heads * seq * 4
    largest = terms.pop("largest")
    block = 0
    if config.remat is not False or config.scan_layers:
        # remat: the backward pass recomputes one block at a time, all but what the policy
        # saved (the same model without remat tells how much). scan: one iteration's
        # residuals are made before they are stacked (the model with remat tells which).
        other = dataclasses.replace(config, remat=config.remat is False)
        alt = _extrapolate([trace(_layers(other, n)) for n in counted], counted, layers)
        block = abs(alt["activations"] - terms["activations"]) // layers
    return MemoryEstimate(mode=mode, workspace=largest + block, stacked=config.scan_layers, **terms)


def _checked(
    config: Any, batch: Any, seq: Any, mode: Any, lora: Any, optimizer: Any
) -> tuple[LlamaConfig, str, LoraConfig | None, optax.GradientTransformation]:
    if not isinstance(config, LlamaConfig):
        raise TypeError(
            f"estimate_memory: config must be a lora_jax.models.LlamaConfig, got "
            f"{type(config).__name__}."
        )
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"estimate_memory: {name} must be a positive int, got {value!r}.")
    if seq > config.max_seq_len:
        raise ValueError(
            f"estimate_memory: seq must be at most config.max_seq_len ({config.max_seq_len}), "
            f"got {seq}."
        )
    if mode not in MODES:
        raise ValueError(f"estimate_memory: mode must be one of {MODES}, got {mode!r}.")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(
            f"estimate_memory: lora must be a lora_jax.LoraConfig or None, got "
            f"{type(lora).__name__}."
        )
    if mode == "full" and lora is not None:
        raise ValueError("estimate_memory: lora is for modes 'lora' and 'qlora', not 'full'.")
    if mode == "lora" and lora is not None and lora.quantize is not None:
        raise ValueError(
            "estimate_memory: lora.quantize is set but mode is 'lora': pass mode='qlora'."
        )
    if mode != "full":
        lora = lora or DEFAULT_LORA
        if mode == "qlora" and lora.quantize is None:
            lora = dataclasses.replace(lora, quantize=QuantConfig(compute_dtype=config.dtype))
    if optimizer is None:
        optimizer = optax.adamw(1e-4)
    elif not (callable(getattr(optimizer, "init", None)) and callable(optimizer.update)):
        raise TypeError(
            "estimate_memory: optimizer must be an optax.GradientTransformation, got "
            f"{type(optimizer).__name__}."
        )
    return config, mode, lora, optimizer


def _checked_remat(remat: Any) -> bool | str:
    if isinstance(remat, bool) or remat in REMAT_POLICIES:
        return remat
    raise ValueError(
        f"estimate_memory: remat must be a bool or one of {REMAT_POLICIES}, got {remat!r}."
    )


def _attention(config: LlamaConfig, attention: str | None) -> str:
    if attention is None:
        return config.attention or "xla"
    if attention not in ATTENTION:
        raise ValueError(
            f"estimate_memory: attention must be None or one of {ATTENTION}, got {attention!r}."
        )
    return attention


def _uniform(lora: LoraConfig) -> bool:
    """Whether the config treats every block alike (names only: no regex, no patterns)."""
    names = lambda v: isinstance(v, tuple) and all("/" not in n for n in v)
    q = lora.quantize
    quant_ok = q is None or (
        (q.targets is None or names(q.targets)) and (not q.exclude or names(q.exclude))
    )
    return (
        (lora.targets == ALL_LINEAR or names(lora.targets))
        and (not lora.exclude or names(lora.exclude))
        and not (lora.rank_pattern or lora.alpha_pattern or lora.trainable)
        and quant_ok
    )


def _layers(config: LlamaConfig, n: int) -> LlamaConfig:
    return config if n == config.num_layers else dataclasses.replace(config, num_layers=n)


def _extrapolate(
    measured: Sequence[dict[str, int]], counted: Sequence[int], layers: int
) -> dict[str, int]:
    """The terms at `layers` blocks, from terms measured at `counted` blocks (linear)."""
    if len(measured) == 1:
        return dict(measured[0])
    one, two = measured
    out = {k: one[k] + (layers - counted[0]) * (two[k] - one[k]) for k in one if k != "largest"}
    return out | {"largest": max(one["largest"], two["largest"])}


def _traced(
    config: LlamaConfig,
    batch: int,
    seq: int,
    mode: str,
    lora: LoraConfig | None,
    optimizer: optax.GradientTransformation,
    flash: bool,
) -> dict[str, int]:
    """The terms of one model, from abstract values only (`flash`: leave out the attention
    scores, see `_scores`)."""
    model = Llama(config)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    key = jax.random.key(0)
    if mode == "full":
        trainable, frozen = jax.eval_shape(model.init, key, ids), {}
        apply, join = model.apply, lambda t, f: t
    else:
        lora_model = LoRA(model, lora)
        params = jax.eval_shape(lambda k: init(lora_model, k, ids), key)
        (trainable, frozen), apply, join = partition(params), lora_model.apply, combine

    def arrays(n: int) -> tuple[list, list]:
        tokens = jax.ShapeDtypeStruct((batch, n), jnp.int32)
        return _arrays(
            lambda t, f, b: causal_lm_loss(apply(join(t, f), b), b), trainable, frozen, tokens
        )

    kept, made = arrays(seq)
    if flash:
        kept, made = _scores(config, batch, seq, kept, made, arrays)
    state = jax.eval_shape(optimizer.init, trainable)
    return {
        "base_weights": _nbytes(frozen),
        "trainable": _nbytes(trainable),
        "gradients": _nbytes(trainable),
        "optimizer_state": _nbytes(state),
        "activations": sum(_size(a) for a in kept),
        "inputs": 2 * _nbytes(ids),
        "largest": max((_size(a) for a in made), default=0),
    }


# --------------------------------------------------------------------------- residuals


def _nbytes(tree: Any) -> int:
    return sum(_size(leaf) for leaf in jax.tree.leaves(tree))


def _size(x: Any) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _arrays(loss: Loss, trainable: Any, frozen: Any, tokens: Any) -> tuple[list, list]:
    """(the arrays the backward pass keeps, every array the forward pass makes), as abstract
    values in program order (two traces of one program at different shapes align)."""

    def residuals(t: Any, f: Any, b: Any) -> Any:
        return jax.vjp(lambda t: loss(t, f, b), t)[1]

    jaxpr = jax.make_jaxpr(residuals)(trainable, frozen, tokens).jaxpr
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    outside = set(jaxpr.invars) | set(jaxpr.constvars)
    memo: dict = {}
    roots: dict = {}  # an ordered set
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            roots.update(dict.fromkeys(_roots(v, producers, memo)))
    kept = [v.aval for v in roots if v not in outside]
    return kept, list(_made(jaxpr))


def _roots(v: Any, producers: dict, memo: dict) -> tuple:
    """The arrays XLA keeps for residual `v`: `v` itself, or, when a cheap op makes it from
    no larger inputs, those inputs' roots."""
    if v in memo:
        return memo[v]
    eqn = producers.get(v)
    inputs = [] if eqn is None else [u for u in eqn.invars if not isinstance(u, jcore.Literal)]
    if eqn is None or not _is_cheap(eqn) or any(_size(u.aval) > _size(v.aval) for u in inputs):
        memo[v] = (v,)
    else:
        found = (r for u in inputs for r in _roots(u, producers, memo))
        memo[v] = tuple(dict.fromkeys(found))
    return memo[v]


def _is_cheap(eqn: Any) -> bool:
    if eqn.primitive.name in _CHEAP:
        return True
    if eqn.primitive.name in _CALLS:
        return all(_is_cheap(e) for e in eqn.params["jaxpr"].jaxpr.eqns)
    return False


def _made(jaxpr: Any) -> Iterator[Any]:
    """Every array the equations of `jaxpr` (and of the jaxprs inside them) make, in order."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars if hasattr(v.aval, "shape"))
    for sub in jcore.subjaxprs(jaxpr):
        yield from _made(sub)


def _scores(
    config: LlamaConfig,
    batch: int,
    seq: int,
    kept: list,
    made: list,
    arrays: Callable[[int], tuple[list, list]],
) -> tuple[list, list]:
    """`kept` and `made` without the attention scores and probabilities, which a flash kernel
    never writes: the arrays of four or more axes with two of length `seq`. Where `seq` equals
    another length of the model (head_dim, heads, batch, ...), such a shape is ambiguous: the
    scores are then told apart in a trace at another length, whose arrays align with these."""
    c = config
    lengths = {batch, c.head_dim, c.head_dim // 2, c.num_heads, c.num_kv_heads}
    lengths |= {c.num_heads // c.num_kv_heads, c.hidden_size, c.intermediate_size, 1}
    probe = seq
    if seq in lengths:
        near = [n for n in range(seq + 1, c.max_seq_len + 1) if n not in lengths][:1]
        probe = (near or [n for n in range(seq - 1, 1, -1) if n not in lengths][:1] or [seq])[0]
    kept_p, made_p = (kept, made) if probe == seq else arrays(probe)
    shapes = lambda xs: [(len(a.shape), a.dtype) for a in xs]
    if shapes(kept_p) != shapes(kept) or shapes(made_p) != shapes(made):
        raise RuntimeError(
            f"estimate_memory: the traces at {seq} and {probe} tokens differ in structure, so "
            "the attention scores cannot be told apart; pass attention='xla'."
        )
    square = lambda a: len(a.shape) >= 4 and sum(d == probe for d in a.shape) >= 2
    return (
        [a for a, p in zip(kept, kept_p, strict=True) if not square(p)],
        [a for a, p in zip(made, made_p, strict=True) if not square(p)],
    )


# --------------------------------------------------------------------------- command line

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(1e-4),
    "adam": lambda: optax.adam(1e-4),
    "lion": lambda: optax.lion(1e-4),
    "sgd": lambda: optax.sgd(1e-4),
    "sgd_momentum": lambda: optax.sgd(1e-4, momentum=0.9),
    "adafactor": lambda: optax.adafactor(1e-4),
}
ALIASES = {"1b": "llama_1b", "3b": "llama_3b", "8b": "llama3_8b", "70b": "llama3_70b"}
LABELS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4)"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive int, got {text!r}")
        return value

    return parse


def _remat(text: str) -> bool | str:
    words = {"none": False, "false": False, "off": False, "true": True, "full": True}
    if text.lower() in words:
        return words[text.lower()]
    if text in REMAT_POLICIES:
        return text
    raise argparse.ArgumentTypeError(
        f"--remat must be none, full or one of {', '.join(REMAT_POLICIES)}, got {text!r}"
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lora_jax.memory",
        description="Estimated memory of one train step (full fine-tuning, LoRA, QLoRA).",
    )
    models = [*REFERENCE, *ALIASES, "all"]
    p.add_argument("--model", default="all", help=f"one of {models} (default: all)")
    p.add_argument("--batch", type=_positive("--batch"), default=1, help="rows (default 1)")
    p.add_argument("--seq", type=_positive("--seq"), default=4096, help="tokens (default 4096)")
    p.add_argument("--rank", type=_positive("--rank"), default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--remat",
        type=_remat,
        default=False,
        help="none (default), full, or a jax.checkpoint_policies name",
    )
    p.add_argument(
        "--optimizer", default="adamw", help=f"one of {sorted(OPTIMIZERS)} (default adamw)"
    )
    p.add_argument(
        "--attention",
        default="cudnn",
        help="cudnn (fused flash attention, default) or xla (keeps the (seq, seq) scores)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, MemoryEstimate]]:
    """The CLI: prints one table per model; returns the estimates by model and mode."""
    p = _parser()
    args = p.parse_args(argv)
    name = ALIASES.get(args.model, args.model)
    if name != "all" and name not in REFERENCE:
        p.error(f"--model must be one of {[*REFERENCE, *ALIASES, 'all']}, got {args.model!r}")
    if args.optimizer not in OPTIMIZERS:
        p.error(f"--optimizer must be one of {sorted(OPTIMIZERS)}, got {args.optimizer!r}")
    if args.attention not in ATTENTION:
        p.error(f"--attention must be one of {list(ATTENTION)}, got {args.attention!r}")
    names = list(REFERENCE) if name == "all" else [name]
    lora = dataclasses.replace(DEFAULT_LORA, rank=args.rank, alpha=2.0 * args.rank)
    results = {}
    for model in names:
        config = REFERENCE[model]()
        if args.seq > config.max_seq_len:
            p.error(f"--seq must be at most {config.max_seq_len} for {model}, got {args.seq}")
        results[model] = {
            mode: estimate_memory(
                config,
                batch=args.batch,
                seq=args.seq,
                mode=mode,
                lora=None if mode == "full" else lora,
                optimizer=OPTIMIZERS[args.optimizer](),
                remat=args.remat,
                attention=args.attention,
            )
            for mode in MODES
        }
        print(
            f"{model} ({config.num_params() / 1e9:.2f}B parameters, "
            f"{jnp.dtype(config.param_dtype).name}): batch {args.batch} x {args.seq} tokens, "
            f"{args.optimizer}, LoRA rank {args.rank} on all linear layers, remat: "
            f"{ {False: 'none', True: 'full'}.get(args.remat, args.remat) }, "
            f"{args.attention} attention"
        )
        print(table({LABELS[m]: e for m, e in results[model].items()}))
        print()
    return results
