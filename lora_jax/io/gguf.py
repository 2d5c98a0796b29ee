"""Llama GGUF files (llama.cpp's format) -> lora_jax's reference `Llama`: config and parameters.

`read_gguf` reads a file whose ``general.architecture`` is "llama" (Llama 1/2/3, SmolLM,
TinyLlama, Mistral 7B as llama.cpp converts them): the config from the ``llama.*`` metadata,
and every tensor dequantized through the `gguf` package (F32, F16, BF16, F64 and the
quantized types that `gguf.quants.dequantize` knows: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants,
...) into a plain NumPy parameter tree of `lora_jax.models.Llama`:

=====================================  ==============================================
GGUF tensor                            lora_jax parameter
=====================================  ==============================================
``token_embd.weight``                  ``embed_tokens/embedding`` (vocab, hidden)
``blk.{i}.attn_{q,k,v}.weight``        ``layers_{i}/self_attn/{q,k,v}_proj/kernel``
``blk.{i}.attn_output.weight``         ``layers_{i}/self_attn/o_proj/kernel``
``blk.{i}.ffn_{gate,up,down}.weight``  ``layers_{i}/mlp/{gate,up,down}_proj/kernel``
``blk.{i}.attn_norm.weight``           ``layers_{i}/input_layernorm/scale``
``blk.{i}.ffn_norm.weight``            ``layers_{i}/post_attention_layernorm/scale``
``output_norm.weight``                 ``norm/scale``
``output.weight`` (absent: tied)       ``lm_head/kernel`` (hidden, vocab)
=====================================  ==============================================

A GGUF linear weight is stored (out, in) like Hugging Face's; kernels are transposed to
(in, out). llama.cpp's converter permutes the rows of Q and K (each head's two rotary halves
interleaved, for its RoPE kernel); `read_gguf` undoes it, so that the model's rotate-half RoPE
sees Hugging Face's layout again (left permuted, the logits of SmolLM2 are off by up to 41).

The file is memory-mapped by `gguf.GGUFReader` and dequantized one tensor at a time: besides
the result, at most one tensor is held in float32.

`gguf` is an optional dependency (``pip install "lora_jax[hf]"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lora_jax.config import float_dtype
from lora_jax.models.llama import LlamaConfig

try:
    import gguf
except ImportError:  # an optional dependency: the error comes when a function needs it
    gguf = None

PathLike = str | os.PathLike
Params = dict[str, Any]

ARCHITECTURE = "llama"
# The tokenizer's vocabulary arrays, left out of the metadata that `read_gguf` returns
# (`lora_jax.io.tokenizer.Tokenizer.from_gguf` reads them).
VOCAB_KEYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.precompiled_charsmap",
)
_INSTALL = 'pip install "lora_jax[hf]"'


def require_gguf(what: str) -> None:
    """Raises an ImportError that says how to install `gguf` when it is missing."""
    if gguf is None:
        raise ImportError(f"{what} needs the 'gguf' package: {_INSTALL}.")


def read_gguf(path: PathLike, *, dtype: Any = None) -> tuple[LlamaConfig, Params, dict[str, Any]]:
    """Reads a Llama-architecture GGUF file into lora_jax's reference `Llama`.

    Args:
      path: the ``.gguf`` file (one file; split files are not read).
      dtype: the floating dtype of the returned arrays and of the config's `dtype` and
        `param_dtype` (e.g. ``jnp.bfloat16``); None means float32. Tensors are dequantized to
        float32, then cast.

    Returns:
      `(config, params, metadata)`: the `LlamaConfig`; the bare parameter tree of
      `Llama(config)` as NumPy arrays (apply with ``model.apply({"params": params}, ids)``);
      and the file's metadata, key -> value (``general.*``, ``llama.*``, ``tokenizer.*``), the
      tokenizer's vocabulary arrays (`VOCAB_KEYS`) left out.

    Raises:
      ImportError: the `gguf` package is not installed.
      ValueError: the file is not a readable GGUF file (e.g. truncated: the message names the
        tensors cut off), its architecture is not "llama", its metadata lacks a key or says
        something the reference model cannot represent (RoPE scaling, experts, partial
        rotary dimensions), or tensors are missing, unexpected, of the wrong shape or of a
        type that cannot be dequantized (each named, with the file).
      TypeError: `dtype` is not a floating dtype.
    """
    require_gguf("read_gguf")
    dtype = (
        np.dtype(np.float32) if dtype is None else float_dtype("read_gguf: dtype", dtype, TypeError)
    )
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    if metadata.get("split.count", 1) > 1:
        raise ValueError(
            f"'{os.fspath(path)}' is part {metadata.get('split.no', 0) + 1} of a model split into "
            f"{metadata['split.count']} files; merge them first (llama.cpp's "
            "llama-gguf-split --merge)."
        )
    config = _config(metadata, reader, path, dtype)
    plan = _plan(config)
    _check_tensors(reader, plan, path)
    params: Params = {}
    for tensor in reader.tensors:  # one at a time: the reader holds no data, only a memory map
        target, _, convert = plan[tensor.name]
        value = np.ascontiguousarray(convert(_dequantize(tensor, path)), dtype=dtype)
        if np.may_share_memory(value, tensor.data):  # F32 tensors come as views of the map
            value = value.copy()
        _insert(params, target, value)
    return config, params, metadata


def open_gguf(path: PathLike) -> Any:
    """Opens a GGUF file (memory-mapped) with `gguf.GGUFReader`.

    Raises:
      ValueError: the file is missing, is not a GGUF file, or ends before its tensors do
        (the message names the tensors cut off).
    """
    require_gguf("Reading a GGUF file")
    if not os.path.isfile(path):
        raise ValueError(f"No GGUF file at '{os.fspath(path)}'.")
    try:
        reader = _Reader(path)
    except Exception as e:  # the reader raises anything from struct/numpy on a bad header
        raise ValueError(
            f"'{os.fspath(path)}' is not a readable GGUF file ({type(e).__name__}: {e}); is it "
            "truncated in its header, or not a GGUF file at all?"
        ) from e
    size = len(reader.data)
    cut = [t for t in reader.tensors if t.data_offset + t.n_bytes > size]
    if cut:
        names = ", ".join(f"'{t.name}'" for t in cut[:5]) + (
            f" and {len(cut) - 5} more" if len(cut) > 5 else ""
        )
        first = cut[0]
        raise ValueError(
            f"'{os.fspath(path)}' is truncated: it holds {size:,} bytes, but tensor "
            f"'{first.name}' needs bytes {first.data_offset:,} to "
            f"{first.data_offset + first.n_bytes:,}. Tensors cut off: {names}. Download or "
            "convert the file again."
        )
    return reader


def read_metadata(reader: Any, *, vocab: bool = False) -> dict[str, Any]:
    """The metadata of an open GGUF file, key -> Python value (str, int, float, bool, list).

    Args:
      reader: a `gguf.GGUFReader` (from `open_gguf`).
      vocab: also read the tokenizer's vocabulary arrays (`VOCAB_KEYS`).
    """
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (key in VOCAB_KEYS and not vocab):
            continue
        out[key] = field.contents()
    return out


class _Reader(gguf.GGUFReader if gguf is not None else object):
    """`gguf.GGUFReader` that lets a tensor run past the end of a truncated file (read as
    zeros), so that `open_gguf` can name the tensors cut off instead of failing on a reshape.
    The header is read as strictly as `gguf.GGUFReader` reads it.

    It also slices a plain ndarray view of the memory map rather than the `np.memmap`
    itself: the reader takes a few slices per metadata string (a tokenizer holds about 10^5),
    and each `np.memmap` slice runs NumPy's Python-level memmap bookkeeping. Opening
    SmolLM2-135M's file: 1.96 -> 0.48 s. The arrays are the same bytes."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:  # set once, by `gguf.GGUFReader.__init__`
        self._mapped, self._plain = value, value.view(np.ndarray)

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
    ) -> np.ndarray:
        dtype, count, offset = np.dtype(dtype), int(count), int(offset)
        end = offset + dtype.itemsize * count
        if getattr(self, "data_offset", None) is not None and end > len(self._plain):
            return np.zeros(count, dtype)
        arr = self._plain[offset:end].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def _config(metadata: dict, reader: Any, path: PathLike, dtype: np.dtype) -> LlamaConfig:
    """The `LlamaConfig` that the ``llama.*`` metadata describes."""
    where = f"'{os.fspath(path)}'"
    arch = metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(
            f"{where} holds a model of architecture {arch!r} (general.architecture); read_gguf "
            f"reads '{ARCHITECTURE}' files only."
        )
    get = lambda key, default=None: _metadata_int(metadata, f"llama.{key}", where, default)
    _refuse_unrepresentable(metadata, reader, where)
    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    head_dim = get("attention.key_length", get("rope.dimension_count", hidden // num_heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        value = get(key, head_dim)
        if value != head_dim:
            raise ValueError(
                f"{where}: llama.{key} is {value} but the heads are {head_dim} wide; the "
                "reference Llama rotates and values whole heads (no partial rotary dimensions)."
            )
    tie = all(t.name != "output.weight" for t in reader.tensors)
    theta = metadata.get("llama.rope.freq_base", 10000.0)
    eps = metadata.get("llama.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise ValueError(f"{where} lacks the metadata key llama.attention.layer_norm_rms_epsilon.")
    try:
        return LlamaConfig(
            vocab_size=_vocab_size(metadata, reader, where),
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rms_norm_eps=float(eps),
            tie_embeddings=tie,
            max_seq_len=get("context_length"),
            dtype=dtype,
            param_dtype=dtype,
        )
    except ValueError as e:
        raise ValueError(f"{where}: the llama.* metadata gives an invalid config: {e}") from e


def _metadata_int(metadata: dict, key: str, where: str, default: Any = None) -> int:
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"{where} lacks the metadata key {key}.")
    if isinstance(value, list):  # per-layer values (llama.cpp allows them for head counts)
        if not value or any(v != value[0] for v in value):
            raise ValueError(
                f"{where}: {key} differs between layers ({value}); the reference Llama has "
                "the same shapes in every layer."
            )
        value = value[0]
    return int(value)


def _vocab_size(metadata: dict, reader: Any, where: str) -> int:
    if "llama.vocab_size" in metadata:
        return int(metadata["llama.vocab_size"])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embed = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if not embed:
        raise ValueError(f"{where} has no tensor 'token_embd.weight' and no llama.vocab_size.")
    return int(embed[0].shape[-1])


def _refuse_unrepresentable(metadata: dict, reader: Any, where: str) -> None:
    """Raises when the file describes something the reference Llama does not compute."""
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = metadata.get("llama.rope.scaling.factor")
        raise ValueError(
            f"{where} uses RoPE scaling {scaling!r} (llama.rope.scaling.type, factor {factor}), "
            "which read_gguf does not implement; logits would be wrong."
        )
    linear = metadata.get("llama.rope.scale_linear")
    if linear not in (None, 1.0):
        raise ValueError(
            f"{where} uses linear RoPE scaling {linear} (llama.rope.scale_linear), which "
            "read_gguf does not implement; logits would be wrong."
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            f"{where} holds 'rope_freqs.weight': Llama 3.1-style RoPE frequency factors, which "
            "read_gguf does not implement; logits would be wrong."
        )
    experts = metadata.get("llama.expert_count", 0)
    if experts:
        raise ValueError(
            f"{where} is a mixture of experts (llama.expert_count = {experts}); the reference "
            "Llama has one MLP per layer."
        )
    window = metadata.get("llama.attention.sliding_window")
    if window:
        raise ValueError(
            f"{where} uses sliding-window attention (llama.attention.sliding_window = "
            f"{window}), which read_gguf does not implement."
        )


# A planned tensor: lora_jax path, expected NumPy shape of the dequantized tensor (the GGUF
# dimensions reversed: (out, in) for a weight) and the conversion to lora_jax's layout.
_Planned = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _plan(cfg: LlamaConfig) -> dict[str, _Planned]:
    """GGUF tensor name -> (lora_jax path, expected shape, conversion), for every tensor."""
    h, d, m, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    same = lambda w: w
    kernel = lambda w: w.T
    unpermute = lambda heads: lambda w: _unpermute(w, heads).T
    plan = {
        "token_embd.weight": ("embed_tokens/embedding", (v, h), same),
        "output_norm.weight": ("norm/scale", (h,), same),
    }
    if not cfg.tie_embeddings:
        plan["output.weight"] = ("lm_head/kernel", (v, h), kernel)
    for i in range(cfg.num_layers):
        blk, layer = f"blk.{i}", f"layers_{i}"
        plan |= {
            f"{blk}.attn_norm.weight": (f"{layer}/input_layernorm/scale", (h,), same),
            f"{blk}.ffn_norm.weight": (f"{layer}/post_attention_layernorm/scale", (h,), same),
            f"{blk}.attn_q.weight": (
                f"{layer}/self_attn/q_proj/kernel",
                (q, h),
                unpermute(cfg.num_heads),
            ),
            f"{blk}.attn_k.weight": (
                f"{layer}/self_attn/k_proj/kernel",
                (kv, h),
                unpermute(cfg.num_kv_heads),
            ),
            f"{blk}.attn_v.weight": (f"{layer}/self_attn/v_proj/kernel", (kv, h), kernel),
            f"{blk}.attn_output.weight": (f"{layer}/self_attn/o_proj/kernel", (h, q), kernel),
            f"{blk}.ffn_gate.weight": (f"{layer}/mlp/gate_proj/kernel", (m, h), kernel),
            f"{blk}.ffn_up.weight": (f"{layer}/mlp/up_proj/kernel", (m, h), kernel),
            f"{blk}.ffn_down.weight": (f"{layer}/mlp/down_proj/kernel", (h, m), kernel),
        }
    return plan


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's permutation of the rows of Q or K, (heads * head_dim, in).

    llama.cpp's converter reorders each head's rows from [first half, second half]
    (rotate-half RoPE) to interleaved pairs: row 2j takes row j and row 2j + 1 takes row
    j + head_dim / 2. This puts them back.

    Example (one head of 8 rows, as llama.cpp stores them):
      >>> stored = np.array([[0], [4], [1], [5], [2], [6], [3], [7]])
      >>> _unpermute(stored, heads=1)[:, 0].tolist()
      [0, 1, 2, 3, 4, 5, 6, 7]
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_tensors(reader: Any, plan: dict[str, _Planned], path: PathLike) -> None:
    """Raises one ValueError listing every missing, unexpected or misshapen tensor."""
    found = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    problems = [
        f"  missing tensor '{name}' (for {plan[name][0]})" for name in plan if name not in found
    ]
    problems += [
        f"  unexpected tensor '{name}': the reference Llama has no parameter for it"
        for name in found
        if name not in plan
    ]
    problems += [
        f"  tensor '{name}' (for {plan[name][0]}) has shape {found[name]} but expected "
        f"{plan[name][1]} (GGUF dimensions {list(reversed(found[name]))})"
        for name in plan
        if name in found and found[name] != plan[name][1]
    ]
    if problems:
        raise ValueError(
            f"'{os.fspath(path)}' does not fit the Llama that its metadata describes "
            f"({len(problems)} problem(s)):\n" + "\n".join(problems)
        )


def _dequantize(tensor: Any, path: PathLike) -> np.ndarray:
    """One tensor as a float array of its NumPy shape (GGUF dimensions reversed)."""
    qtype = tensor.tensor_type
    try:
        if qtype == gguf.GGMLQuantizationType.F64:
            return np.asarray(tensor.data, np.float64)
        return gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise ValueError(
            f"'{os.fspath(path)}': tensor '{tensor.name}' is stored as {qtype.name}, which the "
            f"gguf package cannot dequantize ({e}). Convert the file to a supported type "
            "(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...)."
        ) from e


def _insert(tree: Params, path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
