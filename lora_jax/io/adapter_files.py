"""lora_jax's own adapter files: safetensors for the tensors, JSON for everything else.

A directory holds `adapter.safetensors` (the trainable leaves by variables path:
``params/layers_0/self_attn/q_proj/kernel_lora_a``, trainable extras such as
``params/lm_head/kernel``) and `adapter_config.json`: the `LoraConfig`, each adapter's record
(geometry, rank, variant), the tensor file's sha256 and size, and the base model's
fingerprint: shape and dtype of every frozen leaf, and a few probes of the adapted kernels'
values before and after merging (so that an adapter is never loaded onto the merged model it
came from). Nothing is ever pickled.

The config is the truth: the scale of every adapter is computed from it when loading, and
the file's adapters must be exactly those the config targets.

Saving replaces the pair atomically: the new tensors are staged beside the old ones
(`adapter.safetensors.next`), the JSON file is replaced in one rename (the commit), then the
staged tensors take the tensor file's name. A crash at any point leaves one whole adapter,
old or new, which `load_adapter` finds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from lora_jax import _paths, _trees
from lora_jax.adapters.geometry import Geometry
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Adapter
from lora_jax.config import LoraConfig
from lora_jax.io import _assembly, _leaves
from lora_jax.io.config_json import config_from_dict, config_to_dict, dumps, table_hash
from lora_jax.ops.named import base_of, join_adapter, only_adapter
from lora_jax.quant.formats import QuantizedTensor, dequantize_matrix

PathLike = str | os.PathLike
ADAPTER_FORMAT, FORMAT_VERSION = "lora_jax.adapter", 2
ADAPTER_FILE, ADAPTER_CONFIG_FILE = "adapter.safetensors", "adapter_config.json"
STAGED_FILE = ADAPTER_FILE + ".next"
_PROBES = 4  # rows and columns probed per matrix (4 x 4 values, at two matrices of a stack)


def save_adapter(
    directory: PathLike, params: Mapping, config: LoraConfig, *, name: str | None = None
) -> Path:
    """Writes an adapter: its trainable leaves (safetensors) and its config (JSON).

    Args:
      directory: the adapter directory (created if missing; an adapter already there is
        replaced atomically: the directory always holds one whole adapter).
      params: the variables dict from `lora_jax.init` (or after training).
      config: the `LoraConfig` the adapters were made with (of adapter `name`).
      name: with several named adapters in `params`, the one to save (the file holds it
        alone; `load_adapter(..., name=...)` gives it a name again).

    Returns:
      The directory.

    Raises:
      ValueError: `params` has no adapters, or they do not fit `config`; `params` holds
        several adapters and `name` is not given, or names none of them.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.models import Llama, LlamaConfig
      >>> model = Llama(LlamaConfig.tiny())
      >>> x = jnp.zeros((1, 8), jnp.int32)
      >>> base = model.init(jax.random.key(0), x)
      >>> cfg = lj.LoraConfig(rank=4, targets=("q_proj", "v_proj"))
      >>> params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), x, base_params=base)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = lj.save_adapter(d, params, cfg)
      ...     loaded, loaded_cfg = lj.load_adapter(d, base)
      >>> loaded_cfg == cfg
      True
    """
    if isinstance(params, Mapping):
        params = only_adapter(params, name, "save_adapter", config if name else None)
    values, plan, trainable, frozen = _assembly.to_save(params, config)
    tensors = _trees.flat(trainable)
    flat_frozen = _trees.flat(frozen)
    base = {
        k: _leaves.spec(v) for k, v in flat_frozen.items() if not k.startswith(_paths.LORA + "/")
    }
    data = safetensors.numpy.save({k: np.asarray(v, order="C") for k, v in tensors.items()})
    description = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": config_to_dict(config),
        "adapters": [
            {"param": _paths.to_param(p), "name": n, **r.to_json()}
            for (p, n), r in sorted(plan.adapters.items())
        ],
        "extras": sorted(_paths.to_param(p) for p in plan.extras),
        "quantized": {
            _paths.to_param(p): dataclasses.asdict(m) for p, m in sorted(plan.quantized.items())
        },
        "tensors": {
            "file": ADAPTER_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        },
        "base_model": {
            "sha256": table_hash(base),
            "leaves": base,
            "probes": _probes(_trees.flat(values), plan),
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / STAGED_FILE, data)
    _write(directory / ADAPTER_CONFIG_FILE, (dumps(description) + "\n").encode())  # the commit
    os.replace(directory / STAGED_FILE, directory / ADAPTER_FILE)
    _sync_dir(directory)
    return directory


def load_adapter(
    directory: PathLike, base_params: Mapping, *, name: str | None = None
) -> tuple[dict, LoraConfig]:
    """Reads an adapter and adds it to the base model's parameters.

    Args:
      directory: a directory written by `save_adapter`.
      base_params: the base model's variables `{"params": ...}` or bare params dict, dense or
        quantized: their paths and shapes must be those the adapter was trained on (dtypes
        may differ).
      name: add the adapter under this name to `base_params`, which may hold other named
        adapters already (they are kept as they are).

    Returns:
      `(params, config)`: the variables dict that `lora_jax.init` would give, with the saved
      adapters and extras, and the saved `LoraConfig` (for `lora_jax.LoRA`), its `quantize`
      fitted to the base. Each adapter's scale is the config's.

    Raises:
      ValueError: a file is missing, truncated or corrupted (the file is named); the base does
        not fit (every mismatched path is named) or is the merged model of this adapter; the
        tensors are not those the config's targets call for (an edited `targets` or `rank`,
        a tensor that the config does not make trainable).
    """
    if name is not None:
        loaded, config = load_adapter(directory, base_of(base_params))
        return join_adapter(base_params, loaded, name, "load_adapter"), config
    directory = Path(directory)
    description = _read_description(directory / ADAPTER_CONFIG_FILE)
    tensors = _read_tensors(directory, description["tensors"])
    try:
        config = config_from_dict(description["lora_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"'{directory / ADAPTER_CONFIG_FILE}' holds an invalid config: {e}") from e
    boxed, flat = _assembly.base_leaves(base_params)
    where = f"The adapter in '{directory}'"
    if description["format_version"] == 1:
        plan, tensors = _plan_v1(tensors, flat, config)
    else:
        plan = _plan_v2(description, config, where)
    _check_base(where, description["base_model"], flat, tensors)
    _check_tensors(where, plan, tensors, flat, config)
    _check_not_merged(where, description["base_model"].get("probes", {}), flat, plan)
    return _assembly.assemble(config, plan, boxed, flat, tensors)


# --------------------------------------------------------------------------- checks


def _plan_v2(description: Mapping, config: LoraConfig, where: str) -> Plan:
    """The plan of a version-2 file, every scale taken from the config; raises naming every
    adapter that the config does not target or gives another rank."""
    adapters, problems = {}, []
    for entry in description.get("adapters", []):
        param, name = entry["param"], entry["name"]
        module = _paths.split(param)[0]
        if not config.is_target(module):
            problems.append(
                f"the file holds an adapter for '{param}', which LoraConfig.targets="
                f"{config.targets!r} (exclude={config.exclude!r}) does not select."
            )
            continue
        if entry["rank"] != config.rank_for(module):
            problems.append(
                f"'{param}' has rank {entry['rank']} in the file but LoraConfig gives "
                f"{config.rank_for(module)}."
            )
            continue
        record = Adapter.from_json(entry, scale=config.scale_for(module))
        adapters[_paths.to_variables(param), name] = record
    extras = frozenset(_paths.to_variables(p) for p in description.get("extras", []))
    _trees.raise_problems(
        f"{where} does not agree with its own config (was the JSON edited?)", problems
    )
    return Plan(adapters, extras, {})


def _plan_v1(
    tensors: dict[str, jax.Array], flat: Mapping[str, Any], config: LoraConfig
) -> tuple[Plan, dict]:
    """The plan of a version-1 file (lora_jax 0.1: scales and markers stored as tensors):
    geometry from the tensors' and kernels' shapes, scales from the config."""
    adapters, extras = {}, set()
    for path in list(tensors):
        if path.startswith(_paths.LORA + "/"):
            marker = tensors.pop(path)
            param = _paths.extra_param(path)
            if param is not None and bool(marker):
                extras.add(param)
    for path in [k for k in tensors if _paths.is_adapter_leaf(k)]:
        param, leaf, name = _paths.adapted_param(path)
        b = _paths.leaf_path(param, "b", name)
        if leaf != "a" or b not in tensors or param not in flat:
            continue
        a_shape, b_shape, w_shape = tensors[path].shape, tensors[b].shape, flat[param].shape
        n_batch = len(a_shape) + len(b_shape) - 2 - len(w_shape)
        n_in = len(a_shape) - 1 - n_batch
        module = _paths.split(_paths.to_param(param))[0]
        geometry = Geometry(tuple(w_shape), n_batch, n_in, int(a_shape[-1]))
        adapters[param, name] = Adapter(geometry, config.scale_for(module), "lora")
    return Plan(adapters, frozenset(extras), {}), tensors


def _check_tensors(
    where: str, plan: Plan, tensors: Mapping[str, Any], flat: Mapping[str, Any], config: LoraConfig
) -> None:
    """Every tensor is a leaf the plan calls for or a trainable extra the config selects, and
    every adapter leaf fits its record and its kernel."""
    expected = plan.adapter_leaves()
    problems = []
    for name in sorted(tensors):
        if name in expected:
            continue
        param = name.removeprefix(_paths.PARAMS + "/")
        if name in plan.extras and config.is_trainable_extra(param):
            if name not in flat:
                problems.append(f"the trainable extra '{name}' is not a leaf of base_params.")
            continue
        problems.append(
            f"the file holds tensor '{name}', which is neither an adapter leaf that the config "
            "targets nor a LoraConfig.trainable extra: it is not loaded over the base."
        )
    problems += [
        f"tensor '{k}' is missing from the file." for k in sorted(expected) if k not in tensors
    ]
    for (param, name), record in sorted(plan.adapters.items()):
        if param not in flat:
            problems.append(f"the adapted parameter '{param}' is not in base_params.")
            continue
        shapes = {
            leaf: tuple(tensors[p].shape)
            for p, (_, n, leaf) in expected.items()
            if n == name and p in tensors and _paths.adapted_param(p)[0] == param
        }
        problems += record.geometry.problems(_paths.to_param(param), flat[param].shape, shapes)
    _trees.raise_problems(f"{where} cannot be loaded", problems)


def _check_base(where: str, fingerprint: Mapping, flat: Mapping, tensors: Mapping) -> None:
    """Every frozen leaf of the fingerprint, and every trained extra, with the same shape."""
    expected = {k: {"shape": v["shape"]} for k, v in fingerprint["leaves"].items()}
    expected.update(
        {k: {"shape": list(v.shape)} for k, v in tensors.items() if not _paths.is_adapter_leaf(k)}
    )
    found = {k: {"shape": _leaves.spec(v)["shape"]} for k, v in flat.items()}
    _trees.raise_problems(
        f"{where} was made for another base model",
        _leaves.problems(found, expected, "in base_params"),
    )


# --------------------------------------------------------------------------- merged bases


def _matrices(value: Any, record: Adapter) -> tuple[Any, int, int, int]:
    """(value as (L, K, N), L, K, N) of an adapted parameter, stacked and batch axes folded
    into L; a 4-bit kernel dequantized to float32."""
    g = record.geometry
    if isinstance(value, QuantizedTensor):
        dense = dequantize_matrix(value, jnp.float32)
        lead = int(np.prod(dense.shape[:-2]))
        return dense.reshape(lead, g.fan_in, g.fan_out), lead, g.fan_in, g.fan_out
    lead = int(np.prod(value.shape[: g.stacked(value.shape) + g.n_batch]))
    return jnp.reshape(value, (lead, g.fan_in, g.fan_out)), lead, g.fan_in, g.fan_out


def _gather(w: Any, index: np.ndarray) -> np.ndarray:
    """float64 values of an (L, K, N) array at (l, k, n) rows of `index`."""
    return np.asarray(w[index[:, 0], index[:, 1], index[:, 2]].astype(jnp.float32), np.float64)


def _probes(flat: Mapping[str, Any], plan: Plan) -> dict:
    """A few values of each adapted kernel before and after merging, where ΔW is largest:
    rows of A and columns of B with the largest norms, at the first and last matrix."""
    out = {}
    for (param, name), record in sorted(plan.adapters.items()):
        if record.variant != "lora" or param not in flat:
            continue
        value = flat[param]
        w, lead, k, n = _matrices(value, record)
        a = jnp.reshape(flat[_paths.leaf_path(param, "a", name)], (lead, k, -1)).astype(jnp.float32)
        b = jnp.reshape(flat[_paths.leaf_path(param, "b", name)], (lead, -1, n)).astype(jnp.float32)
        dtype = value.dtype
        index, before, after = [], [], []
        for m in sorted({0, lead - 1}):
            rows = np.argsort(-np.asarray(jnp.linalg.norm(a[m], axis=1)))[:_PROBES]
            cols = np.argsort(-np.asarray(jnp.linalg.norm(b[m], axis=0)))[:_PROBES]
            grid = np.array([[m, r, c] for r in rows for c in cols])
            w0 = _gather(w, grid)
            delta = np.asarray(record.scale * (a[m][rows] @ b[m][:, cols]), np.float64).reshape(-1)
            w1 = np.asarray(
                jnp.asarray(w0 + delta, jnp.float32).astype(dtype).astype(jnp.float32), np.float64
            )
            keep = w1 != w0
            index += grid[keep].tolist()
            before += w0[keep].tolist()
            after += w1[keep].tolist()
        if index:
            out[_paths.to_param(param)] = {"index": index, "base": before, "merged": after}
    return out


def _check_not_merged(where: str, probes: Mapping, flat: Mapping[str, Any], plan: Plan) -> None:
    """Raises when the base holds the merged values at the probes (and never the base's)."""
    records = {param: record for (param, _), record in plan.adapters.items()}
    merged = base = 0
    for param, probe in probes.items():
        key = _paths.to_variables(param)
        if key not in flat or key not in records:
            continue
        w, lead, k, n = _matrices(flat[key], records[key])
        index = np.asarray(probe["index"], np.int64).reshape(-1, 3)
        if len(index) == 0 or (index >= np.array([lead, k, n])).any():
            continue
        values = _gather(w, index)
        before, after = np.asarray(probe["base"]), np.asarray(probe["merged"])
        half = np.abs(after - before) / 2
        merged += int(np.sum(np.abs(values - after) < half))
        base += int(np.sum(np.abs(values - before) < half))
    if merged and not base:
        raise ValueError(
            f"{where} would apply its ΔW twice: base_params hold the merged model of this very "
            f"adapter ({merged} probed kernel values equal W + ΔW, none equals W). Load it onto "
            "the original base model, or use the merged model as it is."
        )


# --------------------------------------------------------------------------- assembling


# --------------------------------------------------------------------------- files


def _write(path: Path, data: bytes) -> None:
    """Writes a file atomically: a crash leaves the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(directory: Path) -> None:
    """Makes the renames in a directory durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    if description.get("format_version") not in (1, FORMAT_VERSION) or not all(
        k in description for k in keys
    ):
        raise ValueError(
            f"'{path}' has format version {description.get('format_version')!r} or lacks one of "
            f"{keys}; this lora_jax reads versions 1 and {FORMAT_VERSION}."
        )
    fingerprint = description["base_model"]
    if table_hash(fingerprint.get("leaves", {})) != fingerprint.get("sha256"):
        raise ValueError(
            f"'{path}' is corrupted: its base model fingerprint does not match its hash."
        )
    return description


def _read_tensors(directory: Path, expected: Mapping) -> dict[str, jax.Array]:
    """The tensors the config names: the tensor file, or (after a save interrupted between
    its commit and its last rename) the staged file, whichever has the committed hash."""
    path = directory / ADAPTER_FILE
    candidates = [p for p in (path, directory / STAGED_FILE) if p.is_file()]
    if not candidates:
        raise ValueError(f"'{path}' is missing: the adapter directory is incomplete.")
    for candidate in candidates:
        data = candidate.read_bytes()
        if hashlib.sha256(data).hexdigest() == expected.get("sha256"):
            break
    else:
        data = candidates[0].read_bytes()
        raise ValueError(
            f"'{candidates[0]}' is corrupted or truncated: {len(data)} bytes with sha256 "
            f"{hashlib.sha256(data).hexdigest()}, but the adapter config expects "
            f"{expected.get('bytes')} bytes with sha256 {expected.get('sha256')}."
        )
    try:
        items = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        raise ValueError(f"'{candidate}' is not a valid safetensors file: {e}.") from None
    return {name: jnp.asarray(_assembly.tensor(candidate, name, item)) for name, item in items}
