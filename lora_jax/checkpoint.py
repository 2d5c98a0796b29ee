"""Checkpoints: orbax train-state checkpoints and small adapter files.

Two formats, for two jobs (docs/checkpoints.md describes both):

- `CheckpointManager` saves the train state to resume a run: the trainable leaves, the
  optimizer state, the step, an rng key and a data position. The frozen base parameters are
  never written: they come from the pretrained source. Saves are atomic (an interrupted save
  is never listed), asynchronous, and the last `max_to_keep` are kept; a restore can place
  the arrays on any device layout, and checks every leaf against a checksum taken at save.
- `save_adapter` / `load_adapter` write and read one adapter: its trainable leaves in one
  safetensors file and a JSON file with the `LoraConfig` and a fingerprint of the base model
  (path -> shape and dtype of every frozen leaf). Nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
from flax import traverse_util
from flax.core import meta

from lora_jax import quant
from lora_jax.config import A_SUFFIX, B_SUFFIX, LORA, LoraConfig, dtype_name
from lora_jax.tree import is_adapter, partition

PathLike = str | os.PathLike
TRAIN_STATE_FORMAT, ADAPTER_FORMAT, FORMAT_VERSION = "lora_jax.train_state", "lora_jax.adapter", 1
ADAPTER_FILE, ADAPTER_CONFIG_FILE = "adapter.safetensors", "adapter_config.json"
_STATE, _META = "state", "meta"
_MAX_LISTED = 10

# --------------------------------------------------------------------------- config <-> JSON


def config_to_dict(config: Any) -> dict:
    """A dataclass config (`LoraConfig`, and any dataclass in its fields) as JSON-ready data.

    Tuples become lists, dtypes their names ("bfloat16"), nested dataclasses nested dicts;
    every field is written, so fields added later are handled without change here.
    """
    return {f.name: _encode(getattr(config, f.name), f.name) for f in dataclasses.fields(config)}


def _encode(value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_encode(v, name) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return dtype_name(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"Config field {name!r} holds {value!r}, which has no JSON form: use tuples, "
            "numbers, strings, dtypes or dataclasses in configs."
        ) from None


def config_from_dict(data: Mapping, cls: type = LoraConfig) -> Any:
    """Rebuilds a dataclass config from `config_to_dict`'s output (the exact same config).

    Lists become tuples, a string in a field whose name ends with "dtype" becomes a dtype, a
    dict becomes the dataclass named by the field's type annotation. Missing fields take
    their defaults (files from older versions).

    Raises:
      ValueError: `data` names a field that `cls` does not have.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no field {unknown[0]!r} (fields: {sorted(fields)}): the file "
            "was written by a newer lora_jax or is not a lora_jax config."
        )
    hints = _type_hints(cls)
    return cls(**{k: _decode(v, k, hints.get(k)) for k, v in data.items()})


def _type_hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except NameError:
        import lora_jax

        return typing.get_type_hints(cls, localns=vars(lora_jax))


def _decode(value: Any, name: str, hint: Any) -> Any:
    if isinstance(value, Mapping):
        options = [hint, *typing.get_args(hint)]
        classes = [t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)]
        if not classes:
            raise ValueError(f"Config field {name!r} holds a dict but is not a dataclass field.")
        return config_from_dict(value, classes[0])
    if isinstance(value, list):
        return tuple(_decode(v, name, None) for v in value)
    if isinstance(value, str) and name.endswith("dtype"):
        return jnp.dtype(value)
    return value


def _config_diff(found: LoraConfig, expected: LoraConfig) -> list[str]:
    return [
        f"LoraConfig.{f.name} is {getattr(found, f.name)!r} in the checkpoint but "
        f"{getattr(expected, f.name)!r} here."
        for f in dataclasses.fields(expected)
        if getattr(found, f.name) != getattr(expected, f.name)
    ]


# --------------------------------------------------------------------------- trees and leaves


def _path(keypath) -> str:
    """One spelling of a path: '/'-joined dict keys, attribute names and indices."""
    names = (getattr(k, a) for k in keypath for a in ("key", "name", "idx") if hasattr(k, a))
    return "/".join(str(n) for n in names)


def _leaves(tree) -> dict[str, Any]:
    return {_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _spec(leaf) -> dict:
    """Shape and dtype of an array, a `jax.ShapeDtypeStruct` or a quantized tensor."""
    return {"shape": list(leaf.shape), "dtype": dtype_name(leaf.dtype)}


def _host(leaf) -> np.ndarray | None:
    """A leaf's value on this host, or None for an array this process cannot see in full."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0)) if leaf.is_fully_replicated else None
    return np.asarray(leaf)


def _crc32(leaf) -> str | None:
    """A checksum of a leaf's bytes (None where this process cannot see the whole leaf)."""
    value = _host(leaf)
    if value is None:
        return None
    return f"{zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8)):08x}"


def _problems(found: Mapping[str, dict], expected: Mapping[str, dict], where: str) -> list[str]:
    """chex-style lines for every leaf of another shape or dtype, missing, or extra."""
    out = [
        f"Leaf '{k}' has {_describe(found[k])} {where} but expected {_describe(expected[k])}."
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    out += [f"Leaf '{k}' is missing {where}." for k in expected if k not in found]
    out += [f"Leaf '{k}' is {where} but not expected here." for k in found if k not in expected]
    return out


def _describe(spec: dict) -> str:
    return f"shape {tuple(spec['shape'])}" + (f" {spec['dtype']}" if "dtype" in spec else "")


def _listing(problems: list[str]) -> str:
    more = len(problems) - _MAX_LISTED
    return (
        "\n  "
        + "\n  ".join(problems[:_MAX_LISTED])
        + (f"\n  ... and {more} more." if more > 0 else "")
    )


def _check_trainable(trainable: Any, config: LoraConfig | None, what: str) -> dict[str, Any]:
    """The flat trainable half, checked to hold no frozen leaf and to fit `config`."""
    if not isinstance(trainable, Mapping):
        raise TypeError(f"{what} must be a dict of arrays, got {type(trainable).__name__}.")
    if LORA in trainable:
        raise TypeError(
            f"{what} has a '{LORA}' collection: pass the trainable half, "
            "`lora_jax.partition(params)[0]`, not the whole tree (frozen leaves are not saved)."
        )
    flat = _leaves(trainable)
    if config is None:
        return flat
    problems = []
    for path, v in flat.items():
        module = path.removeprefix("params/").rsplit("/", 1)[0]
        if path.endswith(A_SUFFIX) and jnp.shape(v)[-1] != config.rank_for(module):
            problems.append(
                f"Leaf '{path}' has rank {jnp.shape(v)[-1]} but the config gives "
                f"'{module}' rank {config.rank_for(module)}."
            )
        elif not is_adapter(path) and not config.is_trainable_extra(path.removeprefix("params/")):
            problems.append(
                f"Leaf '{path}' is frozen: neither an adapter nor a LoraConfig.trainable "
                f"extra {config.trainable!r}."
            )
    if problems:
        raise ValueError(f"{what} does not fit the LoraConfig:{_listing(problems)}")
    return flat


# --------------------------------------------------------------------------- train state


class TrainState(NamedTuple):
    """What `CheckpointManager.restore` returns.

    Attributes:
      step: the step the checkpoint was saved at.
      trainable: the trainable half of the parameters (`combine` it with the frozen half).
      opt_state: the optimizer state.
      rng: the saved PRNG key (typed or raw, as saved), or None.
      data_state: the saved data position (JSON data: tuples come back as lists), or None.
      config: the saved `LoraConfig`, or None.
    """

    step: int
    trainable: Any
    opt_state: Any
    rng: jax.Array | None
    data_state: Any
    config: LoraConfig | None


class CheckpointManager:
    """Saves and restores train state with orbax: keeps the last few, saves asynchronously.

    A step directory holds the trainable leaves and the optimizer state (orbax arrays) and a
    JSON item: step, rng key, data position, `LoraConfig`, and shape, dtype and CRC-32 of
    every leaf. A save is committed atomically: a save interrupted by a crash is never
    listed (its temporary directory is removed when the next manager opens the directory).

    Args:
      directory: where the step directories go (created if missing).
      max_to_keep: how many of the latest checkpoints to keep (None: all).
      async_save: write in a background thread; `save` returns once the arrays are copied.

    Example:
      >>> mgr = lj.CheckpointManager("ckpt")  # doctest: +SKIP
      >>> mgr.save(step, trainable, opt_state, rng=key, data_state={"batch": 100}, config=cfg)
      >>> state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state, config=cfg)
    """

    def __init__(
        self, directory: PathLike, *, max_to_keep: int | None = 3, async_save: bool = True
    ):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META)
        )

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint, or None when there is none."""
        return self._mgr.latest_step()

    def save(
        self,
        step: int,
        trainable: Any,
        opt_state: Any,
        *,
        rng: jax.Array | None = None,
        data_state: Any = None,
        config: LoraConfig | None = None,
    ) -> None:
        """Saves a checkpoint for `step` (in the background with `async_save`).

        The leaves are copied to host memory (and checksummed) before `save` returns, so
        the next train step may donate their buffers; the files are written in the
        background. Boxed leaves (`flax.core.meta`, e.g. `nn.Partitioned`) are saved unboxed.

        Args:
          step: the step count, larger than that of every checkpoint already saved.
          trainable: the trainable half, `lora_jax.partition(params)[0]`.
          opt_state: the optimizer state.
          rng: a PRNG key to restore (typed `jax.random.key` or raw uint32 key data).
          data_state: the data position: anything JSON can hold, e.g. an int or a small dict.
          config: the `LoraConfig`; it is stored, checked against `trainable` now, and
            compared with the config given to `restore`.

        Raises:
          ValueError: `step` is not after the latest checkpoint, or `trainable` holds a leaf
            that `config` says is frozen.
          TypeError: `trainable` is the whole tree, or `data_state` is not JSON data.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"Cannot save step {step} in '{self.directory}': it already holds step {latest}. "
                "Steps must increase; use another directory, or delete() the later steps."
            )
        trainable, opt_state = meta.unbox(trainable), meta.unbox(opt_state)
        flat = _check_trainable(trainable, config, "trainable")
        leaves = {f"trainable/{k}": v for k, v in flat.items()}
        leaves.update({f"opt_state/{k}": v for k, v in _leaves(opt_state).items()})
        meta_item = {
            "format": TRAIN_STATE_FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "rng": _encode_rng(rng),
            "data_state": _json_data(data_state),
            "config": None if config is None else config_to_dict(config),
            "leaves": {k: {**_spec(v), "crc32": _crc32(v)} for k, v in leaves.items()},
        }
        state = {"trainable": trainable, "opt_state": opt_state}
        self._mgr.save(
            int(step),
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta_item)}
            ),
        )

    def restore(
        self,
        step: int | None = None,
        *,
        trainable_like: Any,
        opt_state_like: Any,
        shardings: Any = None,
        config: LoraConfig | None = None,
    ) -> TrainState:
        """Restores a checkpoint onto the device layout you ask for.

        Args:
          step: the step to restore; None restores the latest.
          trainable_like: the trainable half to restore into (arrays, or
            `jax.ShapeDtypeStruct`s): its paths, shapes and dtypes must match the checkpoint.
            Boxed leaves come back in the same boxes.
          opt_state_like: the optimizer state to restore into, likewise (e.g.
            `step.init(params)` or `jax.eval_shape(tx.init, trainable_like)`).
          shardings: where to place the arrays. None: each leaf where its `*_like` leaf is
            (an array's or a ShapeDtypeStruct's `.sharding`); optimizer leaves without one
            follow the trainable leaf they mirror (same path suffix and shape, e.g. Adam's
            moments) and others are replicated beside them; the rest goes to the default
            device. A `jax.sharding.Sharding`: every leaf there (one device, or replicated).
            A dict with "trainable" and/or "opt_state": a Sharding or a tree of Shardings
            for that part.
          config: the current `LoraConfig`; it must equal the saved one.

        Returns:
          A `TrainState`.

        Raises:
          ValueError: no such checkpoint; the checkpoint was made with another config or
            optimizer (every differing field and leaf path is named); or it is damaged (a
            file is missing or truncated, or a leaf's checksum does not match).
        """
        step = self._step(step)
        saved = self._read_meta(step)
        t_like, o_like = meta.unbox(trainable_like), meta.unbox(opt_state_like)
        self._check_fits(step, saved, t_like, o_like, config)
        target = _targets(t_like, o_like, shardings)
        try:
            restored = self._mgr.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )[_STATE]
        except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
            raise self._damaged(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        self._verify(step, saved, restored)
        cfg = saved["config"]
        return TrainState(
            step=step,
            trainable=meta.replace_boxed(trainable_like, restored["trainable"]),
            opt_state=meta.replace_boxed(opt_state_like, restored["opt_state"]),
            rng=_decode_rng(saved["rng"]),
            data_state=saved["data_state"],
            config=None if cfg is None else config_from_dict(cfg),
        )

    def delete(self, step: int) -> None:
        """Deletes the checkpoint of `step`."""
        self._mgr.delete(self._step(step))

    def wait(self) -> None:
        """Blocks until the saves in flight are committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight and releases the manager's resources."""
        self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- private

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"No checkpoint in '{self.directory}'.")
            return steps[-1]
        if step not in steps:
            raise ValueError(
                f"No checkpoint of step {step} in '{self.directory}' (steps: {steps})."
            )
        return int(step)

    def _damaged(self, step: int, why: str) -> ValueError:
        others = [s for s in self.all_steps() if s != step]
        hint = f"restore(step={others[-1]}) to use another" if others else "start over"
        return ValueError(
            f"Checkpoint '{self.directory / str(step)}' is damaged: {why}. Delete it and "
            f"{hint} (steps: {self.all_steps()})."
        )

    def _read_meta(self, step: int) -> dict:
        try:
            saved = self._mgr.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as e:
            raise self._damaged(step, f"its '{_META}' item cannot be read ({e})") from e
        if not isinstance(saved, Mapping) or saved.get("format") != TRAIN_STATE_FORMAT:
            raise self._damaged(step, f"its '{_META}' item is not a lora_jax train state")
        return dict(saved)

    def _check_fits(self, step, saved, trainable_like, opt_state_like, config) -> None:
        """Raises naming every config field and leaf that differs (optimizer leaves only when
        the trainable leaves agree: otherwise they differ for the same reason)."""
        _check_trainable(trainable_like, None, "trainable_like")
        found = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in saved["leaves"].items()}
        problems = []
        for part, like in (("trainable", trainable_like), ("opt_state", opt_state_like)):
            if not problems:
                expected = {f"{part}/{k}": _spec(v) for k, v in _leaves(like).items()}
                part_found = {k: v for k, v in found.items() if k.startswith(part + "/")}
                problems = _problems(part_found, expected, "in the checkpoint")
        saved_config = saved["config"] and config_from_dict(saved["config"])
        if config is not None and saved_config:
            problems = _config_diff(saved_config, config) + problems
        if problems:
            made_with = "" if config or not saved_config else f" (made with {saved_config})"
            raise ValueError(
                f"Checkpoint '{self.directory / str(step)}'{made_with} does not fit the state "
                f"to restore:{_listing(problems)}"
            )

    def _verify(self, step, saved, restored) -> None:
        leaves = {f"trainable/{k}": v for k, v in _leaves(restored["trainable"]).items()}
        leaves.update({f"opt_state/{k}": v for k, v in _leaves(restored["opt_state"]).items()})
        for path, leaf in leaves.items():
            expected = saved["leaves"][path]["crc32"]
            found = None if expected is None else _crc32(leaf)
            if found is not None and found != expected:
                raise self._damaged(
                    step, f"leaf '{path}' has CRC-32 {found} but {expected} was saved"
                )


def _encode_rng(rng) -> dict | None:
    if rng is None:
        return None
    typed = jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key)
    data = _host(jax.random.key_data(rng) if typed else rng)
    if data is None or data.dtype != np.uint32:
        raise TypeError(f"rng must be a PRNG key replicated on every device, got {rng!r}.")
    impl = str(jax.random.key_impl(rng)) if typed else None
    return {"impl": impl, "data": data.tolist(), "shape": list(data.shape)}


def _decode_rng(saved: dict | None):
    if saved is None:
        return None
    data = jnp.asarray(np.asarray(saved["data"], np.uint32).reshape(saved["shape"]))
    return data if saved["impl"] is None else jax.random.wrap_key_data(data, impl=saved["impl"])


def _json_data(value: Any) -> Any:
    default = lambda o: o.item() if isinstance(o, np.generic) else _not_json(o)
    try:
        return json.loads(json.dumps(value, default=default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"data_state must be JSON data (an int, or a small dict): {e}") from None


def _not_json(o):
    raise TypeError(f"{type(o).__name__} {o!r} is not JSON data")


def _targets(trainable_like, opt_state_like, shardings) -> dict:
    """Abstract arrays (ShapeDtypeStruct with a sharding) for orbax to restore into."""
    if isinstance(shardings, Mapping):
        unknown = sorted(set(shardings) - {"trainable", "opt_state"})
        if unknown:
            raise ValueError(f"shardings has key {unknown[0]!r}; use 'trainable', 'opt_state'.")
        get = shardings.get
    else:
        get = lambda _: shardings
    trainable = _placed(trainable_like, get("trainable"), "trainable", lambda *_: None)
    opt_state = _placed(opt_state_like, get("opt_state"), "opt_state", _mirror(trainable))
    return {"trainable": trainable, "opt_state": opt_state}


def _placed(like, spec, part: str, fallback):
    """`like` as ShapeDtypeStructs placed by `spec`, else by `like`, else by `fallback`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    if spec is None or isinstance(spec, jax.sharding.Sharding):
        specs = [spec] * len(flat)
    else:
        specs, spec_def = jax.tree.flatten(
            spec, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
        )
        if spec_def != treedef:
            raise ValueError(
                f"shardings[{part!r}] must be a Sharding or a tree of Shardings like "
                f"{part}_like: its structure differs."
            )
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = []
    for (keypath, leaf), sharding in zip(flat, specs, strict=True):
        sharding = sharding or getattr(leaf, "sharding", None)
        sharding = sharding or fallback(_path(keypath), leaf) or default
        out.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree.unflatten(treedef, out)


def _mirror(trainable):
    """Places an optimizer leaf like the trainable leaf whose path ends its path and whose
    shape it has (Adam's moments); other optimizer leaves are replicated on its mesh."""
    leaves = _leaves(trainable)
    first = next(iter(leaves.values()), None)
    replicated = None
    if first is not None and isinstance(first.sharding, jax.sharding.NamedSharding):
        mesh = first.sharding.mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def find(path: str, leaf):
        for p, v in leaves.items():
            if path.endswith("/" + p) and tuple(v.shape) == tuple(leaf.shape):
                return v.sharding
        return replicated

    return find


# --------------------------------------------------------------------------- adapter files


def save_adapter(directory: PathLike, params: Mapping, config: LoraConfig) -> Path:
    """Writes an adapter: its trainable leaves (safetensors) and its config (JSON).

    `adapter.safetensors` holds the adapter leaves, the `LoraConfig.trainable` extras and the
    "lora" collection (scales and markers), named by their paths
    (`params/layers_0/self_attn/q_proj/kernel_lora_a`, `lora/.../kernel_lora_scale`).
    `adapter_config.json` holds the `LoraConfig` (every field), the tensor file's sha256 and
    size, and the base model's fingerprint: shape and dtype of every frozen leaf by path,
    and a sha256 of that table. The base weights themselves are not written.

    Args:
      directory: the adapter directory (created if missing; its two files are replaced).
      params: the variables dict from `lora_jax.init` (or after training).
      config: the `LoraConfig` the adapters were made with.

    Returns:
      The directory.

    Raises:
      ValueError: `params` has no adapters, or they do not fit `config`.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_jax.LoraConfig, got {type(config).__name__}.")
    if not isinstance(params, Mapping) or LORA not in params:
        raise ValueError(
            f"params must be the whole tree from lora_jax.init, with its '{LORA}' collection."
        )
    trainable, frozen = partition(meta.unbox(params))
    tensors = _check_trainable(trainable, config, "params' trainable half")
    if not any(is_adapter(k) for k in tensors):
        raise ValueError("params holds no adapter leaf ('*_lora_a', '*_lora_b'): nothing to save.")
    flat_frozen = traverse_util.flatten_dict(frozen, sep="/")
    tensors.update({k: v for k, v in flat_frozen.items() if k.startswith(LORA + "/")})
    base = {k: _spec(v) for k, v in flat_frozen.items() if not k.startswith(LORA + "/")}
    data = safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in tensors.items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    description = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": config_to_dict(config),
        "tensors": {
            "file": ADAPTER_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        },
        "base_model": {"sha256": _table_hash(base), "leaves": base},
    }
    _write(directory / ADAPTER_FILE, data)
    _write(directory / ADAPTER_CONFIG_FILE, (_dumps(description) + "\n").encode())
    return directory


def load_adapter(directory: PathLike, base_params: Mapping) -> tuple[dict, LoraConfig]:
    """Reads an adapter and adds it to the base model's parameters.

    Args:
      directory: a directory written by `save_adapter`.
      base_params: the base model's variables `{"params": ...}` or bare params dict, dense or
        quantized: their paths and shapes must be those the adapter was trained on (dtypes
        may differ).

    Returns:
      `(params, config)`: the variables dict that `lora_jax.init` would give, with the saved
      adapters, extras and scales, and the saved `LoraConfig` (for `lora_jax.LoRA`).

    Raises:
      ValueError: a file is missing, truncated or corrupted (the file is named), or the base
        does not fit (every mismatched path is named).
    """
    directory = Path(directory)
    description = _read_description(directory / ADAPTER_CONFIG_FILE)
    tensors = _read_tensors(directory / ADAPTER_FILE, description["tensors"])
    try:
        config = config_from_dict(description["lora_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{directory / ADAPTER_CONFIG_FILE}' holds an invalid config: {e}") from e
    boxed = traverse_util.flatten_dict(_as_variables(base_params), sep="/")
    flat = {k: quant.unboxed(v) for k, v in boxed.items()}
    held = sorted(k for k in flat if is_adapter(k) or k.startswith(LORA + "/"))
    if held:
        raise ValueError(
            f"base_params already hold LoRA leaves ('{held[0]}'): pass the base model's own "
            "parameters."
        )
    _check_base(directory, description["base_model"], flat, tensors)
    boxed.update({k: _boxed_like(k, tensors, boxed) for k in tensors})
    return traverse_util.unflatten_dict(boxed, sep="/"), _fit_quantize(config, flat)


def _as_variables(base_params: Mapping) -> dict:
    if not isinstance(base_params, Mapping):
        raise TypeError(f"base_params must be a dict, got {type(base_params).__name__}.")
    base = dict(base_params)
    return base if "params" in base else {"params": base}


def _boxed_like(path: str, tensors: Mapping, boxed: Mapping):
    """An adapter leaf in its kernel's sharding box (rank axis None), as `lora_jax.init`
    boxes it; other leaves as they are."""
    value = tensors[path]
    stem = path[: -len(A_SUFFIX)]
    kernel = boxed.get(stem) if is_adapter(path) else None
    if not isinstance(kernel, meta.Partitioned) or stem + A_SUFFIX not in tensors:
        return value
    names = tuple(kernel.names)
    a_ndim = np.ndim(tensors[stem + A_SUFFIX])
    b_ndim = np.ndim(tensors.get(stem + B_SUFFIX, np.zeros(())))
    n_batch, cut = a_ndim + b_ndim - 2 - len(names), a_ndim - 1
    if path.endswith(A_SUFFIX):
        return kernel.replace(value=value, names=names[:cut] + (None,))
    return kernel.replace(value=value, names=names[:n_batch] + (None,) + names[cut:])


def _fit_quantize(config: LoraConfig, flat: Mapping) -> LoraConfig:
    """The config with `quantize` describing the base it is loaded onto: None for a dense
    base; for a 4-bit one, the tensors' format and the quantized layers as targets."""
    qts = {k: v for k, v in flat.items() if quant.is_quantized(v)}
    if not qts:
        return dataclasses.replace(config, quantize=None)
    kinds = {q.quant_config() for q in qts.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"base_params mix 4-bit formats {sorted(map(repr, kinds))}: one QuantConfig cannot "
            "describe them."
        )
    modules = tuple(sorted(k[len("params/") :].rsplit("/", 1)[0] for k in qts))
    kernel = config.quantize.kernel if config.quantize is not None else "auto"
    quantize = dataclasses.replace(kinds.pop(), targets=modules, kernel=kernel)
    return dataclasses.replace(config, quantize=quantize)


def _check_base(directory: Path, fingerprint: Mapping, flat: Mapping, tensors: Mapping) -> None:
    """Every frozen leaf of the fingerprint, and every trained extra, with the same shape."""
    expected = {k: {"shape": v["shape"]} for k, v in fingerprint["leaves"].items()}
    expected.update(
        {k: {"shape": list(v.shape)} for k, v in tensors.items() if k.startswith("params/")}
    )
    expected = {k: v for k, v in expected.items() if not is_adapter(k)}
    problems = _problems(
        {k: {"shape": _spec(v)["shape"]} for k, v in flat.items()}, expected, "in base_params"
    )
    if problems:
        raise ValueError(
            f"The adapter in '{directory}' was made for another base model ("
            f"{len(problems)} problems):{_listing(problems)}"
        )


def _dumps(obj: Any, depth: int = 0) -> str:
    """Indented JSON that keeps short lists and dicts (a leaf's shape and dtype) on one line."""
    flat = json.dumps(obj)
    nested = isinstance(obj, dict) and any(isinstance(v, dict) for v in obj.values())
    if not isinstance(obj, (dict, list)) or (len(flat) <= 80 and not nested):
        return flat
    pad = "  " * (depth + 1)
    if isinstance(obj, dict):
        rows = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in obj.items()]
    else:
        rows = [f"{pad}{_dumps(v, depth + 1)}" for v in obj]
    brackets = "{}" if isinstance(obj, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(rows) + "\n" + "  " * depth + brackets[1]


def _table_hash(table: Mapping) -> str:
    return hashlib.sha256(
        json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _write(path: Path, data: bytes) -> None:
    """Writes a file atomically: a crash leaves the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_description(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"'{path}' is missing: not an adapter directory written by save_adapter.")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{path}' is corrupted or truncated: not valid JSON ({e}).") from None
    keys = ("lora_config", "tensors", "base_model")
    if not isinstance(description, dict) or description.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f'\'{path}\' is not a lora_jax adapter config (no "format": "{ADAPTER_FORMAT}").'
        )
    if description.get("format_version") != FORMAT_VERSION or not all(
        k in description for k in keys
    ):
        raise ValueError(
            f"'{path}' has format version {description.get('format_version')!r} or lacks one of "
            f"{keys}; this lora_jax reads version {FORMAT_VERSION}."
        )
    fingerprint = description["base_model"]
    if _table_hash(fingerprint.get("leaves", {})) != fingerprint.get("sha256"):
        raise ValueError(
            f"'{path}' is corrupted: its base model fingerprint does not match its hash."
        )
    return description


def _read_tensors(path: Path, expected: Mapping) -> dict[str, jax.Array]:
    if not path.is_file():
        raise ValueError(f"'{path}' is missing: the adapter directory is incomplete.")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.get("sha256"):
        raise ValueError(
            f"'{path}' is corrupted or truncated: {len(data)} bytes with sha256 {digest}, but "
            f"the adapter config expects {expected.get('bytes')} bytes with sha256 "
            f"{expected.get('sha256')}."
        )
    try:
        items = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        raise ValueError(f"'{path}' is not a valid safetensors file: {e}.") from None
    return {name: jnp.asarray(_array(path, name, item)) for name, item in items}


def _array(path: Path, name: str, item: Mapping) -> np.ndarray:
    dtype = _DTYPES.get(item["dtype"])
    if dtype is None:
        raise ValueError(f"'{path}' tensor '{name}' has unsupported dtype {item['dtype']}.")
    return np.frombuffer(bytes(item["data"]), dtype=dtype).reshape(item["shape"])


_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "BF16": jnp.bfloat16, "F32": np.float32, "F64": np.float64,
}  # fmt: skip
