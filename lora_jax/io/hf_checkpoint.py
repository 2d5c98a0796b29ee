"""Hugging Face checkpoints <-> the reference `Llama`: `load_pretrained` and `save_pretrained`.

A checkpoint is a directory with ``config.json`` and its weights in safetensors: one
``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``. A path ending in ``.gguf`` goes to `lora_jax.io.gguf`.

Architectures: LlamaForCausalLM (Llama 2, 3, 3.1+, SmolLM, TinyLlama), MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM; config.json <-> `LlamaConfig` is `lora_jax.io.hf_config`.

Checks. `load_pretrained` checks every tensor's name, shape and dtype against the config
from the file headers, before it reads any data, and lists every problem with its file.
Like transformers, it skips the rotary ``inv_freq`` buffers of old checkpoints and a tied
model's redundant ``lm_head.weight``.

Memory. Tensors are read one at a time, largest first (the embedding's transient copies
come while nothing else is loaded), each straight from the file into a buffer of its own
(a private anonymous memory map, not a map of the file); each is put on the device as stored
(on a CPU, the buffer itself becomes the array) and transposed (kernels) and cast there, by
XLA, which is much faster than NumPy at it. The next tensor is read while one is placed: at
any time at most two copies of one tensor and the next tensor exist besides what is already
loaded.
`save_pretrained` writes the safetensors format itself, one tensor at a time, with the same
bound.

Sharding. With a `mesh`, the returned model has ``logical_axes=True``: every parameter is an
`nn.LogicallyPartitioned` box (logical names such as "embed", "heads", "mlp", "vocab"; see
`lora_jax.models.llama`) whose array is already laid out on the mesh by `rules` (logical name
-> mesh axes; None or no rule: replicated). Each tensor goes from the host straight to its
shards (`jax.make_array_from_callback`); pass the same `rules` to `lora_jax.make_train_step`.

4 bits. With `quantize` (a `QuantConfig`), the selected kernels (its `targets`, spelled like
`LoraConfig.targets`; None means the seven linear layers of every decoder block,
`DECODER_LINEAR`) are quantized as they arrive, so only one of them is ever dense on the
device. `lora_jax.init` accepts such a base when its `LoraConfig.quantize` selects the same
kernels (e.g. ``LoraConfig(targets=DECODER_LINEAR, quantize=the same QuantConfig)``).
`save_pretrained` writes 4-bit kernels dense (dequantized to `param_dtype`): transformers
cannot read lora_jax's 4-bit layout.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import json
import math
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import SafetensorError, safe_open

from lora_jax import _paths, _trees
from lora_jax.config import QuantConfig, dtype_name, matches_names
from lora_jax.io._leaves import problems as leaf_problems
from lora_jax.io.hf_config import (
    CONFIG_FILE,
    architecture,
    choose_architecture,
    config_dtype,
    llama_config_from_hf,
    llama_config_to_hf,
)
from lora_jax.io.hf_names import ARCHITECTURES, LLAMA_IGNORED, NameMap
from lora_jax.models.llama import Llama, LlamaConfig
from lora_jax.quant.formats import QuantizedTensor, dequantize, quantize_array
from lora_jax.sharding import param_shardings, quantized_specs, shard

PathLike = str | os.PathLike

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' historical "5GB"
DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# safetensors' codes of the floating dtypes that load as they are.
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_CODES = {v: k for k, v in _DTYPES.items()}


# --------------------------------------------------------------------------- reading


class _Tensor(NamedTuple):
    """A tensor as a safetensors header describes it."""

    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' code: "BF16", "F32", ...
    offset: int  # of its first byte in the file
    stamp: tuple[int, int, int]  # the file's (inode, size, mtime in ns) when its header was read


class _Opened:
    """`safe_open` (numpy) whose failures are `ValueError`s naming the file."""

    def __init__(self, file: pathlib.Path) -> None:
        self.file = file
        try:
            self.handle = safe_open(str(file), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise _corrupt(file, e) from None

    def __enter__(self) -> Any:
        return self.handle.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


def _corrupt(file: pathlib.Path, error: Exception) -> ValueError:
    return ValueError(f"Cannot read '{file}' (a truncated or corrupt safetensors file?): {error}")


def _data_offsets(file: pathlib.Path) -> tuple[dict[str, int], tuple[int, int, int]]:
    """Where each tensor's bytes start in a safetensors file (whose header `safe_open` has
    already validated): 8 bytes of header length, the JSON header, then the data, each
    tensor at its ``data_offsets``; and the file's stamp, which `_reader` checks before it
    reads (a file rewritten since would put other bytes at these offsets). safetensors' API
    reads a tensor only into memory it allocates; `_reader` needs the offsets to read into
    an aligned buffer of its own."""
    try:
        with open(file, "rb") as f:
            stamp = _stamp(f)
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        offsets = {
            k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"
        }
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError) as e:
        raise _corrupt(file, e) from None
    return offsets, stamp


def _stamp(f: Any) -> tuple[int, int, int]:
    st = os.fstat(f.fileno())
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read_json(file: pathlib.Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read '{file}' as JSON: {e}") from None


def _headers(root: pathlib.Path) -> dict[str, _Tensor]:
    """Every tensor of the checkpoint's safetensors files, from their headers only."""
    single, index = root / WEIGHTS_FILE, root / INDEX_FILE
    if single.exists():
        files, weight_map = [single], None
    elif index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"'{index}' has no 'weight_map' of tensor names to files.")
        files = [root / f for f in sorted(set(weight_map.values()))]
        holds = lambda f: _trees.quoted(sorted(n for n, v in weight_map.items() if v == f.name))
        _trees.raise_problems(
            f"'{index}' names shards that '{root}' lacks",
            [f"'{f.name}' (holding {holds(f)})" for f in files if not f.exists()],
        )
    else:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise ValueError(
            f"'{root}' holds neither {WEIGHTS_FILE} nor {INDEX_FILE} (found {found[:10]}); "
            "only safetensors checkpoints are read (convert PyTorch .bin files first)."
        )
    tensors, problems = {}, []
    for file in files:
        with _Opened(file) as f:  # safetensors validates the header against the file
            offsets, stamp = _data_offsets(file)
            for name in f.keys():
                if name in tensors:
                    problems.append(
                        f"Tensor '{name}' is in both '{tensors[name].file.name}' and '{file.name}'."
                    )
                meta = f.get_slice(name)
                shape, dtype = tuple(meta.get_shape()), meta.get_dtype()
                tensors[name] = _Tensor(file, shape, dtype, offsets[name], stamp)
    for name, shard_name in (weight_map or {}).items():
        if name not in tensors or tensors[name].file.name != shard_name:
            problems.append(
                f"Tensor '{name}': '{INDEX_FILE}' puts it in '{shard_name}', "
                "which does not hold it."
            )
    _trees.raise_problems(f"The safetensors files of '{root}' disagree", problems)
    return tensors


def _abstract(cfg: LlamaConfig) -> dict[str, Any]:
    """The model's parameters as '/'-joined paths -> `jax.ShapeDtypeStruct` (boxed when
    `cfg.logical_axes`), without computing anything."""
    init = lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return _trees.flat(jax.eval_shape(init)[_paths.PARAMS])


def _expected(
    abstract: Mapping[str, Any], names: NameMap
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor name -> (lora_jax parameter path, Hugging Face shape), from the
    `_abstract` parameters of an unrolled (not `scan_layers`) model."""
    out = {}
    for path, leaf in abstract.items():
        shape = tuple(_trees.unbox(leaf).shape)
        out[names.param_to_hf(path)] = (path, _hf_shape(path, shape))
    return out


def _hf_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel (in, out) is Hugging Face's weight (out, in); other parameters keep theirs."""
    return shape[::-1] if path.endswith("/kernel") else shape


def _check_tensors(
    root: pathlib.Path,
    arch: str,
    cfg: LlamaConfig,
    tensors: Mapping[str, _Tensor],
    expected: Mapping[str, tuple[str, tuple[int, ...]]],
) -> None:
    """Raises listing every missing, unexpected, misshapen or non-float tensor."""
    problems = []
    for name, (path, shape) in expected.items():
        t = tensors.get(name)
        if t is None:
            problems.append(f"Tensor '{name}' is missing (the model's '{path}', shape {shape}).")
        elif t.shape != shape:
            problems.append(
                f"Tensor '{name}' in '{t.file.name}' has shape {t.shape} but config.json gives "
                f"{shape}."
            )
        elif t.dtype not in _DTYPES:
            problems.append(
                f"Tensor '{name}' in '{t.file.name}' has dtype {t.dtype}; expected a floating "
                f"dtype ({', '.join(_DTYPES)})."
            )
    problems += [
        f"Tensor '{name}' in '{t.file.name}' is not a parameter of {arch} with this config.json."
        for name, t in tensors.items()
        if name not in expected and not _ignored(name, cfg)
    ]
    _trees.raise_problems(
        f"The checkpoint '{root}' does not fit its config.json ({arch})", problems
    )


def _ignored(name: str, cfg: LlamaConfig) -> bool:
    """Tensors that transformers skips too: rotary buffers, and a tied model's lm_head."""
    if cfg.tie_embeddings and name == "lm_head.weight":
        return True
    return any(re.fullmatch(p, name) for p in LLAMA_IGNORED)


# --------------------------------------------------------------------------- placing


Reader = Callable[[], np.ndarray]


class _Source(NamedTuple):
    """Where a parameter's values come from: its size, a function that reads them, and
    whether they are a Hugging Face weight (out, in) to transpose into a kernel (in, out)."""

    size: int
    read: Reader
    transpose: bool


Placer = Callable[[str, _Source, list], Any]


def _placer(
    cfg: LlamaConfig,
    abstract: Mapping[str, Any],
    mesh: Mesh | None,
    rules: Sequence | None,
    quantize: QuantConfig | None,
) -> Placer:
    """The function that reads one tensor and turns it into its parameter leaf: on the
    default device or straight onto its shards, transposed and cast to `param_dtype` there
    (XLA transposes an order of magnitude faster than NumPy), or quantized; boxed. It holds
    the only reference to what it reads and drops each copy once the next one exists: at
    most two copies of the tensor at any time."""
    shardings = None
    if mesh is not None:
        named = param_shardings({_paths.PARAMS: _trees.unflat(abstract)}, mesh, rules=rules or ())
        shardings = _trees.flat(named[_paths.PARAMS])

    def place(path: str, source: _Source, box: list) -> Any:
        host, transpose = box.pop(), source.transpose  # `box` held the only reference
        quantized = quantize is not None and _quantized(path, quantize)
        dtype = host.dtype if quantized else jnp.dtype(cfg.param_dtype)
        if host.size < _XLA_MIN_SIZE and (transpose or host.dtype != dtype):
            host, transpose = np.ascontiguousarray(host.T if transpose else host, dtype), False
        if shardings is None:
            x = jax.device_put(host)
        else:  # the read layout's shards: the transposed spec for a weight (out, in)
            spec = tuple(shardings[path].spec) + (None,) * host.ndim
            spec = spec[: host.ndim][:: -1 if transpose else 1]
            sharding = NamedSharding(shardings[path].mesh, PartitionSpec(*spec))
            x = jax.make_array_from_callback(host.shape, sharding, host.__getitem__)
        jax.block_until_ready(x)
        del host
        if transpose or x.dtype != dtype:
            x = jax.block_until_ready(_relayout(x, transpose=transpose, dtype=dtype))
        if quantized:
            x = quantize_array(x, quantize, n_lead=0, n_in=1, path=path)
            if shardings is not None:
                wrap = lambda s: NamedSharding(shardings[path].mesh, s)
                x = shard(x, quantized_specs(x, shardings[path].spec, wrap))
            jax.block_until_ready(x)
        return _trees.rebox(abstract[path], x) if _trees.is_box(abstract[path]) else x

    return place


# Below this many elements a NumPy copy beats compiling an XLA transpose (or cast) for the shape.
_XLA_MIN_SIZE = 1 << 20


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _relayout(x: jax.Array, *, transpose: bool, dtype: np.dtype) -> jax.Array:
    return (x.T if transpose else x).astype(dtype)


def _quantized(path: str, quantize: QuantConfig) -> bool:
    """Whether the `quantize` config selects this parameter (a kernel) for 4 bits."""
    module, _, leaf = path.rpartition("/")
    if leaf != "kernel":
        return False
    if quantize.targets is None:
        chosen = module.startswith("layers_") and module.rsplit("/", 1)[-1] in DECODER_LINEAR
    else:
        chosen = matches_names(quantize.targets, module)
    return chosen and not (quantize.exclude and matches_names(quantize.exclude, module))


def _place_all(sources: Mapping[str, _Source], place: Placer) -> dict[str, Any]:
    """Reads and places every tensor, largest first: the transient copies of the big ones
    come while little else is loaded. The next tensor is read (a copy out of the file) in a
    second thread while this one is placed (onto the device, transposed, cast): one more
    tensor in host memory at a time, never the largest, which comes first."""
    order = sorted(sources, key=lambda p: -sources[p].size)
    out = {}
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora_jax-read") as pool:
        pending = pool.submit(sources[order[0]].read) if order else None
        for i, path in enumerate(order):
            box = [pending.result()]  # the future is dropped next: `box` is the only holder
            pending = pool.submit(sources[order[i + 1]].read) if i + 1 < len(order) else None
            out[path] = place(path, sources[path], box)
    return out


# --------------------------------------------------------------------------- load


def load_pretrained(
    path: PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    quantize: QuantConfig | None = None,
) -> tuple[Llama, dict]:
    """Loads a Hugging Face checkpoint (or a GGUF file) into the reference `Llama`.

    Args:
      path: a directory with config.json and model.safetensors (or shards and
        model.safetensors.index.json), or a ``.gguf`` file (read by `lora_jax.io.gguf`).
      dtype, param_dtype: the model's compute and storage dtypes; default: the checkpoint's.
      mesh: place every tensor straight onto its shards of this mesh; the model then has
        ``logical_axes=True`` and the parameters are `nn.LogicallyPartitioned` boxes.
      rules: logical axis rules for `mesh`, e.g. ``(("heads", "model"), ("mlp", "model"))``;
        None (or a name without a rule) replicates.
      quantize: store the selected kernels in 4 bits as they arrive (targets None: the
        seven linear layers of every block, `DECODER_LINEAR`).

    Returns:
      ``(model, variables)``: the `Llama`, and ``{"params": ...}`` with every leaf on the
      device(s), ready for ``lora_jax.init(lora_jax.LoRA(model, cfg), rng, sample,
      base_params=variables)`` or ``model.apply(variables, ids)``.

    Raises:
      ValueError: an unsupported architecture or config value (named); a missing shard;
        a truncated or corrupt file; missing, unexpected, misshapen or non-float tensors
        (all listed, each with its file).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from lora_jax.models import Llama, LlamaConfig
      >>> model = Llama(LlamaConfig.tiny())
      >>> ids = jnp.zeros((1, 4), jnp.int32)
      >>> variables = model.init(jax.random.key(0), ids)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, model, variables)
      ...     loaded, params = load_pretrained(d)
      >>> bool(jnp.all(loaded.apply(params, ids) == model.apply(variables, ids)))
      True
    """
    path = pathlib.Path(path)
    if rules is not None and mesh is None:
        raise ValueError("load_pretrained: rules= maps logical axes onto a mesh; pass mesh= too.")
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype, param_dtype, mesh, rules, quantize)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise ValueError(
            f"load_pretrained: '{path}' has no {CONFIG_FILE} (a Hugging Face model "
            "directory, or a .gguf file, was expected)."
        )
    hf = _read_json(config_file)
    arch = architecture(hf, str(config_file))
    tensors = _headers(path)
    # Default dtype: config.json's, else the embedding's own.
    stored = config_dtype(hf, str(config_file))
    embedding = tensors.get("model.embed_tokens.weight")
    if stored is None and embedding is not None and embedding.dtype in _DTYPES:
        stored = jnp.dtype(_DTYPES[embedding.dtype])
    cfg = llama_config_from_hf(
        hf,
        dtype=dtype if dtype is not None else stored,
        param_dtype=param_dtype if param_dtype is not None else stored,
        where=str(config_file),
    )
    cfg = dataclasses.replace(cfg, logical_axes=mesh is not None)
    names = ARCHITECTURES[arch]
    abstract = _abstract(cfg)
    expected = _expected(abstract, names)
    _check_tensors(path, arch, cfg, tensors, expected)
    sources = {
        param: _Source(math.prod(shape), _reader(tensors[name], name), param.endswith("/kernel"))
        for name, (param, shape) in expected.items()
    }
    place = _placer(cfg, abstract, mesh, rules, quantize)
    return Llama(cfg), {_paths.PARAMS: _trees.unflat(_place_all(sources, place))}


def _reader(tensor: _Tensor, name: str) -> Reader:
    """Reads one tensor as stored into a fresh buffer aligned to `_ALIGN` bytes (unless it
    is empty), after checking that the file is the one whose header gave its offset, with
    unbuffered reads (which release the GIL, so the next tensor is read while this one is
    placed). On a CPU, XLA adopts an aligned buffer as the device array without copying it."""
    dtype = np.dtype(jnp.dtype(_DTYPES[tensor.dtype]))

    def read() -> np.ndarray:
        buffer = _host_buffer(math.prod(tensor.shape) * dtype.itemsize)
        got = 0
        try:
            with open(tensor.file, "rb", buffering=0) as f:  # unbuffered: straight into `buffer`
                if _stamp(f) != tensor.stamp:
                    raise _corrupt(
                        tensor.file,
                        ValueError(f"it changed after its header was read (reading '{name}')"),
                    )
                f.seek(tensor.offset)
                while got < buffer.size:  # one call reads at most about 2 GB
                    n = f.readinto(buffer[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise _corrupt(tensor.file, e) from None
        if got != buffer.size:
            raise _corrupt(
                tensor.file, ValueError(f"tensor '{name}': {got} of {buffer.size} bytes read")
            )
        return buffer.view(dtype).reshape(tensor.shape)

    return read


# XLA's CPU client uses a host buffer as the array without a copy when it is aligned so.
_ALIGN = 64


def _host_buffer(nbytes: int) -> np.ndarray:
    """Fresh bytes, page-aligned (so `_ALIGN`-aligned), from a private anonymous memory map
    of their own (process memory like any other, copy-on-write across a fork). NumPy asks
    the kernel for huge pages for large arrays, whose first touch can cost a synchronous
    compaction: on a 2-core machine that made loads take 0.9-1.4x as long from run to run;
    4 KiB pages fault in at a steady cost."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    if hasattr(mmap, "MAP_PRIVATE"):  # POSIX; Windows' anonymous maps are private already
        return np.frombuffer(
            mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8
        )
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def _load_gguf(
    path: pathlib.Path,
    dtype: Any,
    param_dtype: Any,
    mesh: Mesh | None,
    rules: Sequence | None,
    quantize: QuantConfig | None,
) -> tuple[Llama, dict]:
    """A GGUF file through `lora_jax.io.gguf.read_gguf`, placed as a safetensors checkpoint."""
    try:
        gguf = importlib.import_module("lora_jax.io.gguf")
    except ModuleNotFoundError as e:
        if e.name != "lora_jax.io.gguf":
            raise
        raise ValueError(
            f"load_pretrained('{path}'): reading GGUF needs lora_jax.io.gguf, which this "
            "installation of lora_jax lacks; convert the file to a Hugging Face directory."
        ) from None
    cfg, tree, _ = gguf.read_gguf(path, dtype=param_dtype if param_dtype is not None else dtype)
    cfg = dataclasses.replace(
        cfg,
        dtype=cfg.dtype if dtype is None else dtype,
        param_dtype=cfg.param_dtype if param_dtype is None else param_dtype,
        logical_axes=mesh is not None,
        scan_layers=False,
    )
    flat = _trees.flat(_paths.as_variables(tree, "read_gguf's params")[_paths.PARAMS])
    del tree
    abstract = _abstract(cfg)
    found = {k: {"shape": list(np.shape(v))} for k, v in flat.items()}
    want = {k: {"shape": list(_trees.unbox(v).shape)} for k, v in abstract.items()}
    _trees.raise_problems(
        f"The parameters read from '{path}' do not fit its config",
        leaf_problems(found, want, f"in '{path.name}'"),
    )
    sources = {
        k: _Source(math.prod(np.shape(v)), lambda k=k: flat.pop(k), False) for k, v in flat.items()
    }
    place = _placer(cfg, abstract, mesh, rules, quantize)
    return Llama(cfg), {_paths.PARAMS: _trees.unflat(_place_all(sources, place))}


# --------------------------------------------------------------------------- writing


class _Entry(NamedTuple):
    """One tensor to write: its name, shape, safetensors dtype code and its data (a function
    giving the row-major data as one or more arrays, read when the tensor is written)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(_DTYPES[self.dtype]).itemsize


def _write_safetensors(file: pathlib.Path, entries: Sequence[_Entry]) -> None:
    """Writes one safetensors file tensor by tensor (the header first: every size is known),
    through a temporary name, so that a failed write leaves no file that looks whole."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for e in entries:
            written = 0
            for chunk in e.chunks():
                data = np.ascontiguousarray(chunk, dtype=_DTYPES[e.dtype]).reshape(-1)
                f.write(data.view(np.uint8).data)
                written += data.nbytes
            if written != e.nbytes:
                raise ValueError(
                    f"Tensor '{e.name}' gave {written} bytes for shape {e.shape} "
                    f"{e.dtype} ({e.nbytes} bytes)."
                )
    os.replace(tmp, file)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _write_checkpoint(
    root: PathLike, hf_config: Mapping[str, Any], entries: Sequence[_Entry], max_shard_bytes: int
) -> None:
    """Writes config.json and the entries in shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own), with an index when there are several."""
    if (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, int)
        or max_shard_bytes <= 0
    ):
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}.")
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[list[_Entry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(e)
    stale = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
    for old in root.iterdir():
        if stale.fullmatch(old.name):
            old.unlink()
    files = _shard_names(len(shards))
    for file, shard_entries in zip(files, shards, strict=True):
        _write_safetensors(root / file, shard_entries)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: f for f, s in zip(files, shards, strict=True) for e in s},
        }
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (root / CONFIG_FILE).write_text(json.dumps(dict(hf_config), indent=2) + "\n")


# --------------------------------------------------------------------------- save


def save_pretrained(
    path: PathLike, model: Llama, params: Mapping, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Writes a reference-`Llama` model as a Hugging Face directory.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads it (the architecture
    is chosen from the config, see `llama_config_to_hf`). Tensors are written one at a time
    in `model.cfg.param_dtype`; 4-bit kernels are written dense (dequantized). Earlier
    ``model*.safetensors`` files and index in `path` are replaced.

    Args:
      path: the directory (made if needed).
      model: the `Llama` the parameters belong to (`scan_layers` allowed).
      params: its variables ``{"params": ...}`` or the bare params dict: a plain model's, or
        ``lora_jax.merge(lora_params)`` (adapters must be merged first); boxes allowed.
      max_shard_bytes: the largest shard; more than one gives ``model-0000i-of-0000n``
        files and ``model.safetensors.index.json``.

    Raises:
      ValueError: the params hold adapters or do not fit the model (every leaf listed), no
        supported architecture has the config, or a leaf is not fully visible to this process.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp
      >>> from lora_jax.models import Llama, LlamaConfig
      >>> model = Llama(LlamaConfig.tiny())
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_pretrained(d, model, variables, max_shard_bytes=300_000)
      ...     sorted(os.listdir(d))
      ['config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """
    if not isinstance(model, Llama):
        raise TypeError(
            f"save_pretrained needs a lora_jax.models.Llama, got {type(model).__name__}."
        )
    cfg = model.cfg
    hf_config = llama_config_to_hf(cfg)
    flat = _params_to_save(cfg, params)
    _write_checkpoint(path, hf_config, _save_entries(cfg, flat), max_shard_bytes)


def _params_to_save(cfg: LlamaConfig, params: Mapping) -> dict[str, Any]:
    """The bare params by path, unboxed, checked against the model."""
    variables = _paths.as_variables(params, "params")
    flat = {k: _trees.unbox(v) for k, v in _trees.flat(variables).items()}
    lora = [k for k in flat if _paths.is_lora(k)]
    if lora:
        raise ValueError(
            f"save_pretrained: params hold LoRA adapters ({_trees.quoted(lora)}): save "
            "lora_jax.merge(params), the plain model's parameters."
        )
    other = sorted({k.split("/", 1)[0] for k in flat} - {_paths.PARAMS})
    if other:
        raise ValueError(f"save_pretrained: params hold collections {other} besides 'params'.")
    flat = {_paths.to_param(k): v for k, v in flat.items()}
    want = {k: {"shape": list(_trees.unbox(v).shape)} for k, v in _abstract(cfg).items()}
    found = {
        k: {"shape": list(np.shape(v) if not isinstance(v, QuantizedTensor) else v.shape)}
        for k, v in flat.items()
    }
    _trees.raise_problems(
        "save_pretrained: params do not fit the model", leaf_problems(found, want, "in params")
    )
    return flat


def _save_entries(cfg: LlamaConfig, flat: Mapping[str, Any]) -> list[_Entry]:
    """One entry per Hugging Face tensor, in the model's order; stacked (`scan_layers`)
    leaves give one tensor per layer."""
    code = _CODES.get(dtype_name(cfg.param_dtype))
    if code is None:
        raise ValueError(f"save_pretrained: safetensors has no dtype for {cfg.param_dtype}.")
    entries = []
    unrolled = _abstract(dataclasses.replace(cfg, scan_layers=False))
    for name, (path, shape) in _expected(unrolled, ARCHITECTURES[choose_architecture(cfg)]).items():
        source, layer = path, None
        if cfg.scan_layers and path.startswith("layers_"):
            head, rest = path.split("/", 1)
            source, layer = f"layers/{rest}", int(head.removeprefix("layers_"))
        entries.append(_Entry(name, shape, code, _host_tensor(cfg, flat, source, layer)))
    return entries


def _host_tensor(
    cfg: LlamaConfig, flat: Mapping[str, Any], path: str, layer: int | None
) -> Callable[[], Iterator[np.ndarray]]:
    """The Hugging Face layout of one tensor (kernels transposed on the device), on the host."""

    def chunks() -> Iterator[np.ndarray]:
        leaf = flat[path]
        if any(
            isinstance(a, jax.Array) and not a.is_fully_addressable for a in jax.tree.leaves(leaf)
        ):
            raise ValueError(
                f"save_pretrained: '{path}' spans devices of other processes; save from one "
                "process after gathering it (jax.experimental.multihost_utils.process_allgather)."
            )
        if layer is not None:
            leaf = jax.tree.map(lambda a: a[layer], leaf)
        if isinstance(leaf, QuantizedTensor):
            leaf = dequantize(leaf, cfg.param_dtype)
        transpose, dtype = path.endswith("/kernel"), jnp.dtype(cfg.param_dtype)
        if math.prod(leaf.shape) >= _XLA_MIN_SIZE and (transpose or leaf.dtype != dtype):
            leaf = _relayout(jnp.asarray(leaf), transpose=transpose, dtype=dtype)
            transpose = False
        host = np.asarray(leaf)
        yield np.ascontiguousarray(host.T if transpose else host, dtype)

    return chunks
