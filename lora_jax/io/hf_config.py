"""Hugging Face config.json <-> the reference `LlamaConfig`.

Architectures: LlamaForCausalLM (Llama 2, 3, 3.1+, SmolLM, TinyLlama), MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM. `llama_config_from_hf` maps config.json to `LlamaConfig`:

- sizes: vocab_size, hidden_size, intermediate_size, num_hidden_layers -> num_layers,
  num_attention_heads -> num_heads, num_key_value_heads -> num_kv_heads (default: num_heads),
  head_dim (default hidden_size // num_heads; Qwen3: 128), max_position_embeddings ->
  max_seq_len, rms_norm_eps, tie_word_embeddings -> tie_embeddings;
- RoPE: the base from ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta``;
  the scaling from ``rope_parameters`` or ``rope_scaling``: type "default" or none, or
  "llama3" -> `RopeScaling` (any other type is an error naming it);
- biases: Llama ``attention_bias`` -> qkv_bias and o_bias, ``mlp_bias``; Qwen2 always
  qkv_bias; Qwen3 ``attention_bias`` -> qkv_bias and o_bias, and qk_norm;
- sliding window: Mistral ``sliding_window``; Qwen2/3 ``sliding_window`` when
  ``use_sliding_window`` puts it on every layer (on some layers only is an error);
- dtype and param_dtype: ``dtype`` / ``torch_dtype``, else the weights' own dtype.
  ``hidden_act`` other than "silu" and a ``quantization_config`` are errors.

`llama_config_to_hf` is the reverse, choosing the architecture from the config: Qwen3 when
qk_norm, Qwen2 when qkv_bias and not o_bias, Mistral when sliding_window, else Llama (a
combination none of them has is an error). It writes both the transformers 5 keys
(``rope_parameters``, ``dtype``) and the older ones (``rope_theta``, ``rope_scaling``,
``torch_dtype``), so transformers 4 reads the files too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.config import dtype_name, float_dtype
from lora_jax.io.hf_names import ARCHITECTURES
from lora_jax.models.llama import LlamaConfig
from lora_jax.models.rope import RopeScaling

CONFIG_FILE = "config.json"
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# What transformers 5 assumes when config.json leaves a key out, per model type.
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "max_window_layers": 28, "head_dim": 128},
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def llama_config_from_hf(
    hf: Mapping[str, Any],
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    where: str = CONFIG_FILE,
) -> LlamaConfig:
    """The `LlamaConfig` of a Hugging Face config.json (the mapping in the module docstring).

    Args:
      hf: the parsed config.json.
      dtype, param_dtype: compute and storage dtypes; default: the config's ``dtype`` /
        ``torch_dtype``, else float32.
      where: how errors name the config.

    Raises:
      ValueError: an architecture other than the supported ones, a missing size, an
        activation other than SiLU, a RoPE type other than "default"/"llama3", a quantized
        checkpoint, or values that `LlamaConfig` rejects.

    Example:
      >>> cfg = llama_config_from_hf({
      ...     "architectures": ["Qwen2ForCausalLM"], "vocab_size": 128, "hidden_size": 64,
      ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      ...     "num_key_value_heads": 2, "rope_parameters": {"rope_theta": 1e6},
      ...     "dtype": "bfloat16"})
      >>> cfg.head_dim, cfg.rope_theta, cfg.qkv_bias, cfg.o_bias, cfg.param_dtype.name
      (16, 1000000.0, True, False, 'bfloat16')
    """
    kind = MODEL_TYPES[architecture(hf, where)]
    get = lambda key, default=None: hf[key] if key in hf else _DEFAULTS[kind].get(key, default)
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"{where} lacks {missing}, which every {kind} config has.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where} has hidden_act {act!r}; the reference Llama uses 'silu'.")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ValueError(
            f"{where} describes a quantized checkpoint (quant_method {method!r}): load the "
            "unquantized weights (and pass quantize= for 4 bits)."
        )
    theta, scaling = _rope(hf, where)
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=get("max_position_embeddings"),
        qkv_bias=kind == "qwen2" or (kind in ("llama", "qwen3") and attention_bias),
        o_bias=kind in ("llama", "qwen3") and attention_bias,
        mlp_bias=kind == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=kind == "qwen3",
        sliding_window=_sliding_window(hf, kind, get, where),
    )
    stored = config_dtype(hf, where) or jnp.dtype(jnp.float32)
    fields["dtype"] = stored if dtype is None else dtype
    fields["param_dtype"] = stored if param_dtype is None else param_dtype
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_dtype(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> np.dtype | None:
    """The weights' dtype that config.json declares (``dtype``, or ``torch_dtype`` before
    transformers 5), or None."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name is None or name == "auto":
        return None
    return float_dtype(f"{where}: dtype", str(name).removeprefix("torch."))


def architecture(hf: Mapping[str, Any], where: str) -> str:
    names = hf.get("architectures") or []
    if not names and hf.get("model_type") in MODEL_TYPES.values():
        return next(a for a, t in MODEL_TYPES.items() if t == hf["model_type"])
    known = [n for n in names if n in ARCHITECTURES]
    if len(known) != 1 or len(names) != 1:
        raise ValueError(
            f"{where} names architectures {names!r} (model_type "
            f"{hf.get('model_type')!r}); supported: {', '.join(ARCHITECTURES)}."
        )
    return known[0]


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """The RoPE base and scaling, from transformers 5's rope_parameters or the older keys."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    typed = lambda d: "rope_type" in d or "type" in d
    scaling = params if typed(params) else (hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ValueError(
            f"{where} has RoPE type {kind!r}; supported: 'default' and 'llama3' (Llama 3.1)."
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"{where}: the 'llama3' RoPE scaling lacks {missing}.")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _sliding_window(
    hf: Mapping[str, Any], kind: str, get: Callable[..., Any], where: str
) -> int | None:
    if kind == "llama":
        return None
    window = get("sliding_window")
    if kind == "mistral" or window is None or not hf.get("use_sliding_window", False):
        return window if kind == "mistral" else None
    n, first = hf["num_hidden_layers"], get("max_window_layers")
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)
    ]
    sliding = {t == "sliding_attention" for t in types}
    if sliding == {True, False}:
        raise ValueError(
            f"{where} puts sliding-window attention on some layers only ({types}); "
            "LlamaConfig.sliding_window covers every layer or none."
        )
    return window if sliding == {True} else None


def llama_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face config.json of a `LlamaConfig` (architecture chosen from it).

    Raises:
      ValueError: no supported architecture has this combination of biases, q/k norms and
        sliding window (what is in the way is named).

    Example:
      >>> from lora_jax.models import LlamaConfig
      >>> hf = llama_config_to_hf(LlamaConfig.tiny(qk_norm=True))
      >>> hf["architectures"], hf["head_dim"], hf["rope_parameters"]["rope_theta"]
      (['Qwen3ForCausalLM'], 16, 10000.0)
      >>> llama_config_from_hf(hf) == LlamaConfig.tiny(qk_norm=True)
      True
    """
    arch = choose_architecture(cfg)
    kind = MODEL_TYPES[arch]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope |= {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    name = dtype_name(cfg.param_dtype)
    out = {
        "architectures": [arch],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": name,
        "torch_dtype": name,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if kind in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if kind == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if kind == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if kind in ("qwen2", "qwen3"):
        sliding = cfg.sliding_window is not None
        out |= {
            "use_sliding_window": sliding,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if sliding else cfg.num_layers,
            "layer_types": [("sliding" if sliding else "full") + "_attention"] * cfg.num_layers,
        }
    return out


def choose_architecture(cfg: LlamaConfig) -> str:
    if cfg.qk_norm:
        arch, why = "Qwen3ForCausalLM", "qk_norm"
        bad = ["mlp_bias"] * cfg.mlp_bias + ["qkv_bias != o_bias"] * (cfg.qkv_bias != cfg.o_bias)
    elif cfg.qkv_bias and not cfg.o_bias:
        arch, why, bad = "Qwen2ForCausalLM", "qkv_bias without o_bias", ["mlp_bias"] * cfg.mlp_bias
    elif cfg.sliding_window is not None:
        arch, why = "MistralForCausalLM", "sliding_window"
        bad = [n for n in ("qkv_bias", "o_bias", "mlp_bias") if getattr(cfg, n)]
    else:
        arch, why = "LlamaForCausalLM", "no q/k norms, Qwen2 biases or sliding window"
        bad = ["o_bias without qkv_bias"] * (cfg.o_bias and not cfg.qkv_bias)
    if bad:
        raise ValueError(
            f"No supported Hugging Face architecture has this LlamaConfig: {arch} (for {why}) "
            f"cannot express {', '.join(bad)}."
        )
    return arch
