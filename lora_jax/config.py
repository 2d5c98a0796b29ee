"""LoRA configuration: a frozen, validated dataclass and the target matching it defines.

Paths are always '/'-joined module paths as they appear in the parameter tree, e.g.
``layers_0/self_attn/q_proj``; parameter paths add the parameter name,
``layers_0/self_attn/q_proj/kernel``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")  # and "pissa_niter_<n>"
BASE_INITS = ("pissa", "olora", "loftq")  # start from the base weight and change it
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
ALL_LINEAR = "all-linear"  # PEFT's special `targets` value
OUTPUT_HEADS = ("lm_head",)  # what "all-linear" leaves out
QUANT_FORMATS = ("nf4", "fp4", "int4")
QUANT_KERNELS = ("auto", "xla")
VARIANTS = ("lora", "dora")
BIASES = ("none", "all", "lora_only")  # PEFT's `bias`
# Layers that read the same input in the Llama family (Hugging Face's names).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

Pattern = tuple[tuple[str, Any], ...]


def _qualified(field: str) -> str:
    return field if "." in field else f"LoraConfig.{field}"


def _compile(field: str, pattern: str) -> re.Pattern:
    field = _qualified(field)
    if not isinstance(pattern, str):
        raise TypeError(f"{field} entries must be str, got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{field} has an invalid regular expression {pattern!r}: {e}.") from None


def _as_names(field: str, value: Any) -> str | tuple[str, ...]:
    """A single string stays a regex; any other sequence becomes a tuple of names."""
    if isinstance(value, str):
        _compile(field, value)
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(
            f"{_qualified(field)} must be a regex string or a sequence of non-empty module names, "
            f"got {value!r}."
        )
    return tuple(value)


def _as_pattern(field: str, value: Any, check: Callable[[str, Any], None]) -> Pattern:
    """A mapping regex -> value becomes an ordered tuple of pairs, so the config stays hashable."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise TypeError(
            f"LoraConfig.{field} must be a mapping of regex -> value, got {value!r}."
        ) from None
    for key, v in pairs:
        _compile(field, key)
        check(f"{field}[{key!r}]", v)
    return pairs


def float_dtype(field: str, value: Any, error: type[Exception] = ValueError) -> np.dtype:
    """`value` as a floating NumPy dtype (names such as "bfloat16" too); else raises `error`
    naming `field`."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise error(f"{field} must be a floating dtype, got {value!r}.")
    return dtype


def _check_rank(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoraConfig.{field} must be a positive int, got {value!r}.")


def _check_alpha(field: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value > 0 and math.isfinite(value))
    ):
        raise ValueError(f"LoraConfig.{field} must be a positive finite number, got {value!r}.")


def matches_names(names: str | tuple[str, ...], path: str, *, linear: bool = True) -> bool:
    """Whether a module path matches `targets`-style names.

    `ALL_LINEAR` ("all-linear", PEFT's special value) matches every linear layer (`linear`:
    nn.Dense, nn.DenseGeneral, nn.Einsum, custom `LinearRule` layers) except the output head,
    a module named one of `OUTPUT_HEADS` ("lm_head", as in Hugging Face causal LMs). Any other
    string is a regular expression full-matched against the path. A sequence of names matches
    when the path equals a name or ends with '/' + name, so ``"q_proj"`` matches
    ``layers_0/self_attn/q_proj`` and so does ``"self_attn/q_proj"`` (PEFT's rule).
    """
    if names == ALL_LINEAR:
        return linear and path.rpartition("/")[2] not in OUTPUT_HEADS
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("/" + n) for n in names)


def matches_pattern(pattern: str, path: str) -> bool:
    """Whether a `rank_pattern` / `alpha_pattern` / `trainable` regex matches a path.

    The regex is full-matched against the path or against any suffix that starts at a
    '/' boundary: ``"q_proj"`` matches ``layers_0/self_attn/q_proj``, ``"layers_0/.*"`` matches
    every module under ``layers_0``.
    """
    return re.fullmatch(f"(?:.*/)?(?:{pattern})", path) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How the frozen base kernels are stored in 4 bits (QLoRA), set as `LoraConfig.quantize`.

    Attributes:
      fmt: the 16-value code: "nf4" (QLoRA's NormalFloat), "fp4" (E2M1 floats) or "int4"
        (symmetric integers -7..7).
      block_size: weights per absmax scale, consecutive along the contraction axes; a power
        of two, at least 2. An axis whose length is not a multiple is zero-padded (stored
        padded; dequantization drops the padding).
      double_quant: quantize the absmax scales again (8 bits, blocks of 256, mean
        subtracted), as QLoRA does: about 4.127 bits per weight instead of 4.5 at block 64.
      compute_dtype: the dtype kernels are dequantized to: what a quantized kernel acts as
        in the forward pass, and the dtype of `merge`'s dense kernels.
      targets: which layers to quantize, spelled like `LoraConfig.targets`; None quantizes
        the kernels of the adapted layers.
      exclude: layers removed from `targets`, spelled like `LoraConfig.targets`.
      kernel: the dequantizing matmul: "auto" or "xla", both XLA's dequantize-then-dot (XLA
        fuses the decoding into one pass, then calls the backend's dot). ("pallas", a fused
        Pallas kernel, was removed: it was slower on an H200; docs/qlora.md.)
    """

    fmt: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: Any = jnp.bfloat16
    targets: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.fmt not in QUANT_FORMATS:
            raise ValueError(f"QuantConfig.fmt must be one of {QUANT_FORMATS}, got {self.fmt!r}.")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ValueError(
                f"QuantConfig.block_size must be a power of two >= 2, got {self.block_size!r}."
            )
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"QuantConfig.double_quant must be a bool, got {self.double_quant!r}.")
        dtype = float_dtype("QuantConfig.compute_dtype", self.compute_dtype)
        object.__setattr__(self, "compute_dtype", dtype)
        if self.targets is not None:
            object.__setattr__(self, "targets", _as_names("QuantConfig.targets", self.targets))
        object.__setattr__(self, "exclude", _as_names("QuantConfig.exclude", self.exclude))
        if self.kernel == "pallas":
            raise ValueError(
                "QuantConfig.kernel='pallas' was removed: on an H200 the fused Pallas kernel "
                "ran 1.4-3.2x a bf16 matmul where XLA's dequantize-then-dot runs 0.93-1.33x "
                "(docs/qlora.md). Use kernel='auto'."
            )
        if self.kernel not in QUANT_KERNELS:
            raise ValueError(
                f"QuantConfig.kernel must be one of {QUANT_KERNELS}, got {self.kernel!r}."
            )

    def is_target(self, path: str, adapted: bool, *, linear: bool = True) -> bool:
        """Whether the layer at `path` (adapted by LoRA or not; `linear` or not) gets a
        quantized kernel."""
        hit = adapted if self.targets is None else matches_names(self.targets, path, linear=linear)
        return hit and not (self.exclude and matches_names(self.exclude, path, linear=linear))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """What to adapt and how.

    Attributes:
      rank: rank r of every adapter (A is (in, r), B is (r, out)).
      alpha: scaling numerator; the adapter output is scaled by alpha / rank
        (alpha / sqrt(rank) with `use_rslora`).
      dropout: dropout rate on the adapter input, applied only when a 'dropout' rng is passed.
      targets: a sequence of module names (a module matches when its path ends with one of
        them), one regular expression full-matched against the '/'-joined module path, or
        "all-linear" (PEFT's value: every linear layer except the output head `lm_head`).
        The default, ("q_proj", "v_proj"), is PEFT's default for Llama models and fits
        `lora_jax.models.Llama`.
      exclude: modules removed from the targets, spelled like `targets`.
      rank_pattern: regex -> rank overrides per module path, first match wins.
      alpha_pattern: regex -> alpha overrides per module path, first match wins.
      use_rslora: scale by alpha / sqrt(rank) (rank-stabilized LoRA).
      init: "kaiming" (A uniform with bound 1/sqrt(fan_in), as PEFT; B zeros) or "gaussian"
        (A normal with std 1/rank; B zeros); embeddings follow PEFT: A zeros, B normal. Or
        an init that starts from the base weight and changes the base so the model still
        starts as the base model (`lora_jax.adapters.inits`): "pissa" (top-r singular
        triplets; "pissa_niter_<n>": randomized SVD with n power iterations), "olora" (QR),
        "loftq" (4-bit bases: alternating quantization and SVD, `loftq_iter` rounds).
      loftq_iter: LoftQ's alternating rounds (init="loftq").
      siblings: groups of layer names that read the same input, e.g. attention's q/k/v: the
        adapters of the members of a group under one parent module run their first product
        as one (``x @ [A_q A_k A_v]``), forward and backward; each finishes with its own B.
        Applies to plain LoRA on 2-D kernels without dropout; a member called with another
        input, or computing otherwise (another layer class or einsum), computes its own
        product, so a wrong group costs time, never correctness.
        () turns it off. The default names the Llama family's q/k/v and gate/up.
      bias: which biases train in full beside the adapters, as PEFT's `bias`: "none", "all"
        (every parameter named "bias" in the model) or "lora_only" (the biases of the
        adapted layers). They are trainable extras like `trainable`'s: saved in the adapter
        files, left as trained by `merge`.
      param_dtype: storage dtype of the adapter parameters.
      trainable: regexes of extra base parameter paths to train in full, e.g.
        ``("lm_head/kernel",)`` or ``("norm/scale", ".*_layernorm/scale")`` (PEFT's
        modules_to_save), matched like `rank_pattern` keys against parameter paths.
      quantize: a `QuantConfig` to keep the frozen base kernels in 4 bits (QLoRA), or None.
      variant: "lora" (plain LoRA) or "dora" (DoRA, weight-decomposed LoRA: a trainable
        magnitude per output feature rescales the adapted kernel's columns; linear layers,
        embeddings and convolutions; on a 4-bit base too, QDoRA). See `lora_jax.adapters.dora`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()
    use_rslora: bool = False
    init: str = "kaiming"
    param_dtype: Any = jnp.float32
    trainable: tuple[str, ...] = ()
    quantize: QuantConfig | None = None
    variant: str = "lora"
    loftq_iter: int = 1
    bias: str = "none"
    siblings: tuple[tuple[str, ...], ...] = SIBLINGS

    def __post_init__(self) -> None:
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= self.dropout < 1.0)
        ):
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("targets", _as_names("targets", self.targets))
        if self.targets == ():
            raise ValueError("LoraConfig.targets is empty: name at least one module to adapt.")
        set_("exclude", _as_names("exclude", self.exclude))
        set_("rank_pattern", _as_pattern("rank_pattern", self.rank_pattern, _check_rank))
        set_("alpha_pattern", _as_pattern("alpha_pattern", self.alpha_pattern, _check_alpha))
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}.")
        if self.init not in INITS and not (
            isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)
        ):
            raise ValueError(
                f"LoraConfig.init must be one of {INITS} or 'pissa_niter_<n>', got {self.init!r}."
            )
        _check_rank("loftq_iter", self.loftq_iter)
        set_("param_dtype", float_dtype("LoraConfig.param_dtype", self.param_dtype))
        trainable = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable)
        for pattern in trainable:
            _compile("trainable", pattern)
        set_("trainable", trainable)
        if self.quantize is not None and not isinstance(self.quantize, QuantConfig):
            raise TypeError(
                f"LoraConfig.quantize must be a lora_jax.QuantConfig or None, got {self.quantize!r}."
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"LoraConfig.variant must be one of {VARIANTS}, got {self.variant!r}.")
        groups = self.siblings
        if (
            isinstance(groups, str)
            or not isinstance(groups, Sequence)
            or not all(
                not isinstance(g, str)
                and isinstance(g, Sequence)
                and len(g) >= 2
                and all(isinstance(n, str) and n for n in g)
                for g in groups
            )
        ):
            raise ValueError(
                "LoraConfig.siblings must be a sequence of groups of two or more layer names, "
                f"e.g. (('q_proj', 'k_proj', 'v_proj'),), got {groups!r}."
            )
        set_("siblings", tuple(tuple(g) for g in groups))
        if self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias must be one of {BIASES}, got {self.bias!r}.")
        base_init = self.base_init
        if base_init == "loftq" and self.quantize is None:
            raise ValueError(
                "LoraConfig(init='loftq') is for a 4-bit base: set LoraConfig.quantize, or use "
                "init='pissa' for a dense base."
            )
        if base_init in ("pissa", "olora") and self.quantize is not None:
            raise ValueError(
                f"LoraConfig(init={self.init!r}) replaces the base by a residual, which a 4-bit "
                "base cannot hold exactly: use init='loftq' with quantize, or quantize=None."
            )
        if base_init is not None and self.variant != "lora":
            raise ValueError(
                f"LoraConfig(init={self.init!r}) is defined for variant='lora', not "
                f"{self.variant!r}."
            )

    @property
    def base_init(self) -> str | None:
        """ "pissa", "olora" or "loftq" when `init` starts from the base weight, else None."""
        return (
            "pissa"
            if _PISSA_NITER.fullmatch(self.init)
            else (self.init if self.init in BASE_INITS else None)
        )

    @property
    def pissa_niter(self) -> int | None:
        """The power iterations of a randomized-SVD PiSSA init ("pissa_niter_<n>"), else None."""
        m = _PISSA_NITER.fullmatch(self.init)
        return int(m[1]) if m else None

    def is_target(self, path: str, *, linear: bool = True) -> bool:
        """Whether the module at `path` gets an adapter (`linear`: whether it is a linear
        layer, which "all-linear" needs to know)."""
        return matches_names(self.targets, path, linear=linear) and not (
            self.exclude and matches_names(self.exclude, path, linear=linear)
        )

    def rank_for(self, path: str) -> int:
        """The adapter rank for the module at `path` (first matching `rank_pattern`, else `rank`)."""
        return next((v for k, v in self.rank_pattern if matches_pattern(k, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha for the module at `path` (first matching `alpha_pattern`, else `alpha`)."""
        return next((v for k, v in self.alpha_pattern if matches_pattern(k, path)), self.alpha)

    def scale_for(self, path: str) -> float:
        """alpha / rank, or alpha / sqrt(rank) with `use_rslora`, for the module at `path`."""
        rank = self.rank_for(path)
        return float(self.alpha_for(path)) / (math.sqrt(rank) if self.use_rslora else rank)

    def sibling_group(self, name: str) -> tuple[str, ...] | None:
        """The `siblings` group that a layer's last path component belongs to, or None."""
        return next((g for g in self.siblings if name in g), None)

    def is_trainable_extra(self, param_path: str, adapted: bool | None = None) -> bool:
        """Whether a base parameter path is one of the `trainable` extras, or a bias that
        `bias` trains (`adapted`: whether its module has an adapter; None: the module is
        one the targets select)."""
        if any(matches_pattern(p, param_path) for p in self.trainable):
            return True
        module, _, leaf = param_path.rpartition("/")
        if leaf != "bias" or self.bias == "none":
            return False
        return self.bias == "all" or (self.is_target(module) if adapted is None else adapted)

    def check_patterns(self, targeted: Sequence[str]) -> None:
        """Raises if a `rank_pattern` / `alpha_pattern` key matches none of the targeted paths."""
        for field in ("rank_pattern", "alpha_pattern"):
            for key, _ in getattr(self, field):
                if not any(matches_pattern(key, p) for p in targeted):
                    raise ValueError(
                        f"LoraConfig.{field} key {key!r} matches none of the targeted modules "
                        f"{sorted(targeted)}."
                    )


def dtype_name(dtype: Any) -> str:
    """A dtype's canonical name, e.g. 'bfloat16' (for JSON files and messages)."""
    return np.dtype(dtype).name
