"""Train-state checkpoints with orbax: resume a run exactly, on any device layout.

`CheckpointManager` saves the train state to resume a run: the trainable leaves, the
optimizer state, the step, an rng key and a data position. The frozen base parameters are
never written: they come from the pretrained source. Saves are atomic (an interrupted save is
never listed), asynchronous, and the last `max_to_keep` are kept; a restore can place the
arrays on any device layout, and checks every leaf against a checksum taken at save.

One manager writes to a directory at a time: the first holds a lock on it for its lifetime,
and a second one opened on the same directory (an evaluator, say) only reads, so it can never
remove the first one's save in flight. A process that exits with a save in flight finishes
it first (or reports on stderr that it was lost); it never exits silently without it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.core import meta

from lora_jax import _paths, _trees
from lora_jax.config import LoraConfig
from lora_jax.io import _leaves
from lora_jax.io.config_json import config_diff, config_from_dict, config_to_dict

PathLike = str | os.PathLike
TRAIN_STATE_FORMAT, FORMAT_VERSION = "lora_jax.train_state", 1
_STATE, _META = "state", "meta"


class Checkpoint(NamedTuple):
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


def _check_trainable(trainable: Any, config: LoraConfig | None, what: str) -> dict[str, Any]:
    """The flat trainable half, checked to hold no frozen leaf and to fit `config`."""
    if not isinstance(trainable, Mapping):
        raise TypeError(f"{what} must be a dict of arrays, got {type(trainable).__name__}.")
    if _paths.LORA in trainable:
        raise TypeError(
            f"{what} has a '{_paths.LORA}' collection: pass the trainable half, "
            "`lora_jax.partition(params)[0]`, not the whole tree (frozen leaves are not saved)."
        )
    flat = _leaves.leaves(trainable)
    if config is not None:
        _trees.raise_problems(
            f"{what} does not fit the LoraConfig", _leaves.trainable_problems(flat, config)
        )
    return flat


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

    A second manager on a directory that another open manager writes to is read-only
    (`read_only`): it lists and restores, and `save` raises.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, lora_jax as lj
      >>> trainable = {"params": {"q": {"kernel_lora_a": jnp.ones((4, 2))}}}
      >>> opt_state = optax.adam(1e-3).init(trainable)
      >>> with tempfile.TemporaryDirectory() as d, lj.CheckpointManager(d) as mgr:
      ...     mgr.save(10, trainable, opt_state, data_state={"batch": 100})
      ...     mgr.wait()
      ...     state = mgr.restore(trainable_like=trainable, opt_state_like=opt_state)
      >>> state.step, state.data_state
      (10, {'batch': 100})
    """

    def __init__(
        self, directory: PathLike, *, max_to_keep: int | None = 3, async_save: bool = True
    ) -> None:
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _writer_lock(self.directory)
        self.read_only = self._lock is None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not self.read_only,
            read_only=self.read_only,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META)
        )
        self._pending: int | None = None
        _OPEN.add(self)

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first (a read-only manager looks
        again: the writer may have committed more)."""
        if self.read_only:
            self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

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
        if self.read_only:
            raise ValueError(
                f"Cannot save in '{self.directory}': another CheckpointManager (this or another "
                "process) is writing there, so this one only reads. Close the other one first, "
                "or save to another directory."
            )
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
        leaves.update({f"opt_state/{k}": v for k, v in _leaves.leaves(opt_state).items()})
        meta_item = {
            "format": TRAIN_STATE_FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "rng": _encode_rng(rng),
            "data_state": _json_data(data_state),
            "config": None if config is None else config_to_dict(config),
            "leaves": {
                k: {**_leaves.spec(v), "crc32": _leaves.crc32(v)} for k, v in leaves.items()
            },
        }
        state = {"trainable": trainable, "opt_state": opt_state}
        with _ctrl_c_after():  # orbax waits here for the save before
            self._mgr.save(
                int(step),
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta_item)}
                ),
            )
        self._pending = int(step)

    def restore(
        self,
        step: int | None = None,
        *,
        trainable_like: Any,
        opt_state_like: Any,
        shardings: Any = None,
        config: LoraConfig | None = None,
    ) -> Checkpoint:
        """Restores a checkpoint onto the device layout you ask for.

        Args:
          step: the step to restore; None restores the latest.
          trainable_like: the trainable half to restore into (arrays, or
            `jax.ShapeDtypeStruct`s): its paths, shapes and dtypes must match the checkpoint.
            Boxed leaves come back in the same boxes.
          opt_state_like: the optimizer state to restore into, likewise: the train step's
            own `step.init(params)` (or `jax.eval_shape(step.init, params)`). Not
            `tx.init`: `make_train_step` wraps `tx` (to skip non-finite updates), so the
            bare optimizer's state has another structure.
          shardings: where to place the arrays. None: each leaf where its `*_like` leaf is
            (an array's or a ShapeDtypeStruct's `.sharding`); optimizer leaves without one
            follow the trainable leaf they mirror (same path suffix and shape, e.g. Adam's
            moments) and others are replicated beside them; the rest goes to the default
            device. A `jax.sharding.Sharding`: every leaf there (one device, or replicated).
            A dict with "trainable" and/or "opt_state": a Sharding or a tree of Shardings
            for that part.
          config: the current `LoraConfig`; it must equal the saved one.

        Returns:
          A `Checkpoint`.

        Raises:
          ValueError: no such checkpoint; the checkpoint was made with another config or
            optimizer (every differing field and leaf path is named); a sharding does not
            divide a leaf (named); or it is damaged (a file is missing or truncated, or a
            leaf's checksum does not match).
        """
        step = self._step(step)
        saved = self._read_meta(step)
        t_like, o_like = meta.unbox(trainable_like), meta.unbox(opt_state_like)
        self._check_fits(step, saved, t_like, o_like, config)
        target = _targets(t_like, o_like, shardings)
        _check_divisible(target)
        try:
            restored = self._mgr.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )[_STATE]
        except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
            raise self._damaged(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        self._verify(step, saved, restored)
        cfg = saved["config"]
        return Checkpoint(
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
        with _ctrl_c_after():
            self._mgr.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Waits for the saves in flight and releases the manager's resources (and the
        directory's lock)."""
        try:
            with _ctrl_c_after():
                self._mgr.close()
            self._pending = None
        finally:
            _OPEN.discard(self)
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finish_at_exit(self) -> None:
        """At interpreter exit: commits a save still in flight, or says on stderr that it is
        lost. Runs before the interpreter stops its thread pools (which the save needs)."""
        step = self._pending
        try:
            self.close()
        except Exception as e:  # the process is exiting: report, never raise
            if step is not None:
                print(
                    f"lora_jax: the checkpoint of step {step} in '{self.directory}' was not "
                    f"committed before exit: {type(e).__name__}: {e}",
                    file=sys.stderr,
                )

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

    def _check_fits(
        self,
        step: int,
        saved: Mapping[str, Any],
        trainable_like: Any,
        opt_state_like: Any,
        config: LoraConfig | None,
    ) -> None:
        """Raises naming every config field and leaf that differs (optimizer leaves only when
        the trainable leaves agree: otherwise they differ for the same reason)."""
        _check_trainable(trainable_like, None, "trainable_like")
        found = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in saved["leaves"].items()}
        problems, hint = [], ""
        for part, like in (("trainable", trainable_like), ("opt_state", opt_state_like)):
            if not problems:
                expected = {f"{part}/{k}": _leaves.spec(v) for k, v in _leaves.leaves(like).items()}
                part_found = {k: v for k, v in found.items() if k.startswith(part + "/")}
                problems = _leaves.problems(part_found, expected, "in the checkpoint")
                if problems and part == "opt_state":
                    hint = (
                        " (make opt_state_like with the train step's own step.init(params): "
                        "make_train_step wraps the optimizer, so tx.init has another structure)"
                    )
        saved_config = saved["config"] and config_from_dict(saved["config"])
        if config is not None and saved_config:
            problems = config_diff(saved_config, config, "in the checkpoint") + problems
        made_with = "" if config or not saved_config else f" (made with {saved_config})"
        _trees.raise_problems(
            f"Checkpoint '{self.directory / str(step)}'{made_with} does not fit the state to "
            f"restore{hint}",
            problems,
        )

    def _verify(self, step: int, saved: Mapping[str, Any], restored: Mapping[str, Any]) -> None:
        leaves = {f"trainable/{k}": v for k, v in _leaves.leaves(restored["trainable"]).items()}
        leaves.update(
            {f"opt_state/{k}": v for k, v in _leaves.leaves(restored["opt_state"]).items()}
        )
        for path, leaf in leaves.items():
            expected = saved["leaves"][path]["crc32"]
            found = None if expected is None else _leaves.crc32(leaf)
            if found is not None and found != expected:
                raise self._damaged(
                    step, f"leaf '{path}' has CRC-32 {found} but {expected} was saved"
                )


def _encode_rng(rng: jax.Array | None) -> dict | None:
    if rng is None:
        return None
    typed = jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key)
    data = _leaves.host(jax.random.key_data(rng) if typed else rng)
    if data is None or data.dtype != np.uint32:
        raise TypeError(f"rng must be a PRNG key replicated on every device, got {rng!r}.")
    impl = str(jax.random.key_impl(rng)) if typed else None
    return {"impl": impl, "data": data.tolist(), "shape": list(data.shape)}


def _decode_rng(saved: dict | None) -> jax.Array | None:
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


def _not_json(o: Any) -> NoReturn:
    raise TypeError(f"{type(o).__name__} {o!r} is not JSON data")


def _targets(trainable_like: Any, opt_state_like: Any, shardings: Any) -> dict:
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


def _placed(like: Any, spec: Any, part: str, fallback: Callable[[str, Any], Any]) -> Any:
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
        sharding = sharding or fallback(_paths.keystr(keypath), leaf) or default
        out.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree.unflatten(treedef, out)


def _mirror(trainable: Any) -> Any:
    """Places an optimizer leaf like the trainable leaf it mirrors (`_trees.mirrored`: Adam's
    moments); other optimizer leaves are replicated on its mesh."""
    leaves = _leaves.leaves(trainable)
    first = next(iter(leaves.values()), None)
    replicated = None
    if first is not None and isinstance(first.sharding, jax.sharding.NamedSharding):
        mesh = first.sharding.mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def find(path: str, leaf: Any) -> Any:
        match = _trees.mirrored(path, leaf.shape, leaves)
        return leaves[match].sharding if match is not None else replicated

    return find


def _check_divisible(target: Mapping[str, Any]) -> None:
    """Raises naming every leaf whose sharding does not divide its shape (before orbax would
    fail on it and the failure would read like a damaged checkpoint)."""
    problems = []
    for path, leaf in _leaves.leaves(target).items():
        sharding = leaf.sharding
        try:
            sharding.shard_shape(tuple(leaf.shape))
        except ValueError as e:
            problems.append(f"Leaf '{path}' of shape {tuple(leaf.shape)}: {str(e).splitlines()[0]}")
    _trees.raise_problems(
        "The shardings to restore onto do not divide the checkpoint's leaves (the checkpoint "
        "is fine; choose shardings that divide them)",
        problems,
    )


# --------------------------------------------------------------------------- one writer


def _writer_lock(directory: Path) -> Any:
    """An exclusive lock on `directory` itself (a flock on its descriptor: no file is made),
    or None when another manager holds it. In a multi-process run only process 0 locks
    (orbax coordinates the rest)."""
    if jax.process_count() > 1 and jax.process_index() != 0:
        return _NotLocked()
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return _Locked(fd)


class _Locked:
    """A held directory lock; `close` releases it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)  # releases the flock


class _NotLocked:
    """The lock of a process that does not lock (not process 0 of a multi-process run)."""

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """Holds a Ctrl-C (SIGINT) back while orbax waits for a save, and raises it after.

    orbax's wait for a save's finalizing thread catches every exception, KeyboardInterrupt
    included, logs it and deletes that checkpoint: a Ctrl-C landing there was lost and so was
    the checkpoint (a run went on training; seen as a flaky test). Only in the main thread,
    and only where Python's own handler is installed (an ignored SIGINT stays ignored).
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


_OPEN: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


def _finish_all() -> None:
    for manager in list(_OPEN):
        manager._finish_at_exit()


# Before the interpreter shuts its thread pools down (atexit would run after that, too late
# for an async save, which then fails inside orbax and is lost).
getattr(threading, "_register_atexit", atexit.register)(_finish_all)
