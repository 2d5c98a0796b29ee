"""What every case of the suite shares: model sizes, timing, compiled-program figures, the machine.

Timing: a compiled program is timed call by call with `jax.block_until_ready`; the compared
programs of a case are timed round-robin (one call of each per round, after one warm-up call
each), so that a change in the machine's load during the run hits all of them alike; the figure
is the median over the rounds (at least 5). Memory comes from the compiled executable's
`memory_analysis()`, FLOPs and bytes accessed from its `cost_analysis()`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lora_jax._eager import needed_only
from lora_jax.models import Llama, LlamaConfig, causal_lm_loss

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_RUNS = 5


# --------------------------------------------------------------------------- attention

ATTENTION = ("cudnn", "xla")


def default_attention() -> str:
    """`--attention`'s default: cuDNN's fused attention on GPU, XLA's everywhere else."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def with_attention(model: LlamaConfig, attention: str) -> LlamaConfig:
    """`model` with `LlamaConfig.attention` set for the suite's `attention` ("cudnn" or "xla").

    "cudnn" (the fused flash kernel, as PyTorch's SDPA uses; needed at long sequences, where
    XLA's attention keeps the (batch, heads, seq, seq) scores for the backward pass) applies to
    bfloat16/float16 models only, so a float32 model gets "xla" whatever was asked.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
    half = jnp.dtype(model.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    impl = "cudnn" if attention == "cudnn" and half else "xla"
    return model if model.attention == impl else dataclasses.replace(model, attention=impl)


# --------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Size:
    """A reference-model configuration and the batch that each train step of a case sees."""

    name: str
    model: LlamaConfig
    batch: int
    seq: int
    rank: int = 16
    chunked_loss: int | None = None  # tokens per cross-entropy chunk; None: whole logits
    note: str = ""
    # The attention asked for (`--attention`): "cudnn" or "xla". The model gets it through
    # `LlamaConfig.attention` where it applies (see `with_attention`), here and in every
    # `dataclasses.replace` of the size (the quantized case's bf16 copy, the mfu case's remat).
    attention: str = "xla"

    def __post_init__(self):
        object.__setattr__(self, "model", with_attention(self.model, self.attention))

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        m = self.model
        return (
            f"{self.name}: Llama {m.num_params() / 1e6:,.1f}M params ({m.num_layers} layers, hidden "
            f"{m.hidden_size}, mlp {m.intermediate_size}, heads {m.num_heads}/{m.num_kv_heads}, vocab "
            f"{m.vocab_size}, {jnp.dtype(m.dtype).name}), batch {self.batch} x {self.seq} tokens, "
            f"LoRA rank {self.rank}" + (", cuDNN attention" if m.attention == "cudnn" else "")
        )


def llama_3b(**overrides: Any) -> LlamaConfig:
    """Llama-3.2-3B shapes (3,212,749,824 parameters), bfloat16: `llama_1b` with 3B overrides."""
    return LlamaConfig.llama_1b(
        **{
            **dict(
                hidden_size=3072,
                intermediate_size=8192,
                num_layers=28,
                num_heads=24,
                num_kv_heads=8,
                head_dim=128,
            ),
            **overrides,
        }
    )


def _wide(hidden: int) -> LlamaConfig:
    """`LlamaConfig.small` (4 layers, float32) at another width: mlp 2.75x, heads of 64."""
    heads = hidden // 64
    return LlamaConfig.small(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_heads=heads,
        num_kv_heads=heads // 2,
    )


SIZES: dict[str, Callable[[], Size]] = {
    # CI smoke test: the library's `tiny` unit-test model, seconds in all.
    "test": lambda: Size("test", LlamaConfig.tiny(num_layers=1), batch=2, seq=32, rank=4),
    # The CPU configuration: the example's `small` model in float32.
    "tiny": lambda: Size("tiny", LlamaConfig.small(), batch=4, seq=128, rank=16),
    # Issue targets on CPU: the same shape at hidden 512 and 1024 (heads of 64).
    "h512": lambda: Size("h512", _wide(512), batch=4, seq=128, rank=16),
    "h1024": lambda: Size("h1024", _wide(1024), batch=4, seq=128, rank=16),
    "1b": lambda: Size("1b", LlamaConfig.llama_1b(), batch=4, seq=2048),
    "3b": lambda: Size("3b", llama_3b(), batch=2, seq=2048),
    "8b": lambda: Size("8b", LlamaConfig.llama3_8b(), batch=1, seq=4096, chunked_loss=1024),
}


def size(name: str, **overrides: Any) -> Size:
    """The named size, with `Size` fields (batch, seq, rank, attention, ...) overridden."""
    if name not in SIZES:
        raise ValueError(f"Unknown size {name!r}; known: {sorted(SIZES)}.")
    return dataclasses.replace(
        SIZES[name](), **{k: v for k, v in overrides.items() if v is not None}
    )


def tokens(sz: Size, key: int = 0) -> jax.Array:
    """A random batch of token ids, (batch, seq + 1): inputs and shifted targets."""
    return jax.random.randint(jax.random.key(key), (sz.batch, sz.seq + 1), 0, sz.model.vocab_size)


def init_base(model: Llama, batch: jax.Array):
    """Random base weights, made on the device (never on the host): the init traced, cut to
    the draws and run op by op (`lora_jax._eager.needed_only`), since compiled as one program
    XLA compiles every layer's draws anew (1B shapes on a 2-core CPU: 29 s -> 17 s; the
    values within 1.2e-7 relative of the jitted init's)."""
    return needed_only(model.init, jax.random.key(1), batch[:, :-1])


def lm_loss(apply, batch):
    """Next-token cross-entropy of `apply` over a (batch, seq + 1) token array."""
    return causal_lm_loss(apply(batch[:, :-1]), batch[:, 1:])


def chunked_lm_loss(chunk: int):
    """A loss like `lm_loss` that never holds the whole (tokens, vocab) logits.

    The model's output head (`lm_head`, or `embed_tokens.attend` with tied embeddings) is
    intercepted: its input and weight are captured and it returns zeros (which nothing reads,
    so XLA drops them); the cross-entropy is then computed over `chunk` tokens at a time, each
    chunk rematerialized in the backward pass. Numerically the same loss as `lm_loss`.
    """

    def loss(apply, batch):
        captured = {}

        def head(next_fun, args, kwargs, context):
            module, method = context.module, context.method_name
            is_head = (module.name == "lm_head" and method == "__call__") or (
                module.name == "embed_tokens" and method == "attend"
            )
            if not is_head:
                return next_fun(*args, **kwargs)
            params = module.variables["params"]
            w = params["kernel"] if "kernel" in params else params["embedding"].T
            captured["x"], captured["w"] = args[0], w.astype(module.dtype or args[0].dtype)
            return jnp.zeros((*args[0].shape[:-1], w.shape[-1]), captured["w"].dtype)

        with nn.intercept_methods(head):
            apply(batch[:, :-1])
        return chunked_cross_entropy(captured["x"], captured["w"], batch[:, 1:], chunk)

    return loss


def chunked_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, chunk: int):
    """Mean cross-entropy of logits ``x @ w`` against `targets`, `chunk` tokens at a time.

    Args:
      x: hidden states, (batch, seq, hidden).
      w: the output head, (hidden, vocab).
      targets: integer ids, (batch, seq).
      chunk: tokens per chunk; must divide batch * seq.
    """
    n = targets.size
    if n % chunk:
        raise ValueError(f"chunked_cross_entropy: chunk {chunk} does not divide {n} tokens.")
    xs = x.reshape(n // chunk, chunk, x.shape[-1])
    ts = targets.reshape(n // chunk, chunk)

    @jax.checkpoint
    def one(xc, tc):
        logits = jnp.dot(xc, w.astype(xc.dtype), preferred_element_type=jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, tc))

    return jnp.sum(jax.lax.map(lambda a: one(*a), (xs, ts))) / n


def loss_for(sz: Size):
    return lm_loss if sz.chunked_loss is None else chunked_lm_loss(sz.chunked_loss)


# --------------------------------------------------------------------------- model FLOPs


def model_flops_per_token(sz: Size, targets: tuple[str, ...] | None = ALL_LINEAR) -> dict:
    """The model FLOPs of one training token of the size's model, by part; no recomputation.

    LoRA on `targets` (`targets=None`: full fine-tuning). N = the multiply-adds of the blocks'
    kernels and the output head per token.
      LoRA:  frozen kernels 4N (2N forward + 2N activation gradient; no weight gradient),
             adapters 6 r (K + N) per adapted K x N kernel (forward, input and weight grads)
      full:  every kernel 6N (forward, activation and weight gradients)
      both:  attention 6 s d per layer (QK^T and AV: 4 s d forward, twice that backward,
             halved by the causal mask), d = heads x head_dim, s = sequence length
    These counts are the theory the measured times are held against: XLA's `cost_analysis`
    does not count library calls (cuBLAS products, cuDNN attention) on a GPU.
    """
    m = sz.model
    h, hd, i = m.hidden_size, m.head_dim, m.intermediate_size
    kernels = {  # name -> (K, N) of one layer's kernel
        "q_proj": (h, m.num_heads * hd),
        "k_proj": (h, m.num_kv_heads * hd),
        "v_proj": (h, m.num_kv_heads * hd),
        "o_proj": (m.num_heads * hd, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    n = m.num_layers * sum(k * o for k, o in kernels.values()) + h * m.vocab_size
    attention = m.num_layers * 6 * sz.seq * m.num_heads * hd
    if targets is None:
        return {
            "weights": 6 * n,
            "adapters": 0,
            "attention": attention,
            "total": 6 * n + attention,
            "n_matmul": n,
        }
    adapters = m.num_layers * sum(
        6 * sz.rank * (k + o) for name, (k, o) in kernels.items() if name in targets
    )
    return {
        "frozen": 4 * n,
        "adapters": adapters,
        "attention": attention,
        "total": 4 * n + adapters + attention,
        "n_matmul": n,
    }


# --------------------------------------------------------------------------- compiled programs


@dataclasses.dataclass
class Step:
    """A compiled program and its arguments; `advance(args, outputs)` gives the next call's
    arguments (a step that donates its inputs must be fed its outputs)."""

    compiled: Any
    args: tuple
    advance: Callable[[tuple, Any], tuple] | None = None

    def __call__(self) -> float:
        start = time.perf_counter()
        out = jax.block_until_ready(self.compiled(*self.args))
        elapsed = time.perf_counter() - start
        if self.advance is not None:
            self.args = self.advance(self.args, out)
        return elapsed


def compile_step(jitted, args: tuple, advance=None) -> tuple[Step, dict]:
    """Lowers and compiles `jitted` for `args`; returns the step and its compiled figures."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    figures = compiled_figures(compiled)
    figures["compile_s"] = time.perf_counter() - start
    return Step(compiled, args, advance), figures


def compiled_figures(compiled) -> dict:
    """FLOPs and bytes accessed (`cost_analysis`) and memory (`memory_analysis`), in bytes.

    `peak_bytes` = arguments + outputs + temporaries - aliased (donated buffers reused for
    outputs): everything the step holds while it runs. `state_bytes` = arguments + outputs -
    aliased: what persists between steps (parameters, optimizer state, batch), without the
    step's temporaries (activations). `backend_peak_bytes` is the backend's own
    `peak_memory_in_bytes` where it reports one (the CPU backend reports the arguments only).
    """
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    mem = compiled.memory_analysis()
    get = lambda name: int(getattr(mem, name, 0) or 0)
    arg, out, temp, alias = (
        get(f"{n}_size_in_bytes") for n in ("argument", "output", "temp", "alias")
    )
    peak = arg + out + temp - alias
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "argument_bytes": arg,
        "output_bytes": out,
        "temp_bytes": temp,
        "alias_bytes": alias,
        "peak_bytes": peak,
        "state_bytes": arg + out - alias,
        "backend_peak_bytes": get("peak_memory_in_bytes") or None,
    }


def time_steps(steps: dict[str, Step], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Times the steps round-robin: `warmup` calls of each, then `runs` rounds of one call each.

    Returns, per step: `ms` (median), `ms_min`, `ms_max` and `ms_all` (every timed call).
    """
    runs = max(runs, MIN_RUNS)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            times[name].append(1e3 * step())
    return {
        name: {
            "ms": statistics.median(t),
            "ms_min": min(t),
            "ms_max": max(t),
            "ms_all": [round(v, 4) for v in t],
        }
        for name, t in times.items()
    }


def time_fn(fn: Callable, *args, runs: int, warmup: int = 1) -> dict:
    """Times one function of fixed arguments (a stateless program)."""
    step = Step(fn, args)
    return time_steps({"fn": step}, runs, warmup)["fn"]


def nbytes(tree) -> int:
    """Bytes of a tree's arrays (a `QuantizedTensor` counts its packed bytes)."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def ratio(a, b) -> float | None:
    """a / b, or None where either is missing (a peer that could not run) or b is 0."""
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


# --------------------------------------------------------------------------- the machine

# Dense bfloat16 peak of one chip, FLOP/s (vendor figures, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device_kind: str) -> float | None:
    """The nominal dense bf16 peak of the chip named by a `device_kind`, if known."""
    return next((v for k, v in PEAK_BF16.items() if k in device_kind.upper()), None)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What ran the suite: backend, device, CPU, cores, library versions, date (UTC)."""
    import flax
    import optax as _optax

    import lora_jax

    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "flax": flax.__version__,
        "optax": _optax.__version__,
        "lora_jax": lora_jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def machine_slug(info: dict) -> str:
    """A file name for a machine: `gpu-nvidia-h100-80gb-hbm3`, `cpu-amd-epyc-2c`."""
    if info["backend"] == "cpu":
        name = f"cpu-{info['cpu']}-{info['cpu_cores']}c"
    else:
        name = f"{info['backend']}-{info['device_kind']}"
        if info["device_count"] > 1:
            name += f"-x{info['device_count']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------- a run's context


@dataclasses.dataclass
class Context:
    """What a case needs to know about the run: the size, how many timed rounds, the mode.

    `cache` keeps what several cases share within one run (the base weights, compiled LoRA
    steps), so that each is built and compiled once.
    """

    size: Size
    runs: int = MIN_RUNS
    quick: bool = False
    log: Callable[[str], None] = print
    cache: dict = dataclasses.field(default_factory=dict)

    def cached(self, key, make: Callable[[], Any]):
        """`make()` once per key and size."""
        key = (self.size, key)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def fmt(value, digits: int = 2, missing: str = "–") -> str:
    """A number for a Markdown table ('–' where it is missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def mb(n) -> float | None:
    return None if n is None else n / 2**20


def write_json(out_dir: str, name: str, report: dict) -> str:
    """Writes a standalone script's report as `<out_dir>/<name>` (made if missing); returns
    the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
    return path
