"""PEFT LoRA adapters <-> lora_jax trees: `save_peft` and `load_peft`.

A PEFT adapter directory holds two files, read by ``peft.PeftModel.from_pretrained``:

- ``adapter_config.json``: PEFT's `LoraConfig` as a dict (every field PEFT 0.21 writes, keys
  sorted, ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``, ``modules_to_save``, ...);
- ``adapter_model.safetensors``: per adapted Hugging Face module ``<m>`` (e.g.
  ``model.layers.0.self_attn.q_proj``), ``base_model.model.<m>.lora_A.weight`` (rank, in) and
  ``base_model.model.<m>.lora_B.weight`` (out, rank); for an embedding
  ``base_model.model.<m>.lora_embedding_A`` (rank, vocab) and ``...lora_embedding_B``
  (features, rank); per module to save, its whole tensors as the model names them
  (``base_model.model.lm_head.weight``). PEFT also stores an adapted embedding's or head's
  base weights (``...base_layer.weight``), for resized vocabularies: `save_peft` leaves them
  out, `load_peft` checks that they are the base's own.

Layouts. A lora_jax kernel (in..., out...) is the Hugging Face weight (out, in) with its
input and output axes each flattened (`lora_jax.io.hf_names`), so lora_A is A (in..., rank)
flattened to (in, rank) and transposed, lora_B is B (rank, out...) flattened and transposed;
embedding A (vocab, rank) and B (rank, features) are transposed. An adapter with batch axes
(a per-head `nn.Einsum`) has no PEFT form.

Scales. PEFT does not store the scale: it computes lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora) per module, r and lora_alpha taken from the first ``rank_pattern`` /
``alpha_pattern`` key that matches the module's name (a regex matched against a '.'-boundary
suffix of the name). lora_jax computes alpha / rank from its `LoraConfig` the same way (as Python
floats), so both files carry exactly lora_jax's per-module ranks and alphas: `save_peft` keys
the patterns by Hugging Face module names, `load_peft` by lora_jax module paths, translating the
other side's keys where the translation gives every module the same rank and alpha, else
listing the modules one by one. Targets are translated the same way (PEFT's list rule, a name
or a '.'-suffix of one, is lora_jax's tuple rule with '/' for '.'; "all-linear" is the same
value on both sides), else written as the explicit list of adapted modules.

Tied embeddings. lora_jax's embedding adapter also acts on a tied output head (`nn.Embed.attend`);
PEFT does that only with ``ensure_weight_tying: true`` (its lm_head adapter then shares the
embedding's A and B), which `save_peft` writes for a model without an output head of its own
and `load_peft` requires there.

PEFT's ``bias`` ("all", "lora_only": the biases trained beside the adapters, saved by their
own names) is `LoraConfig.bias`; ``use_dora`` (a ``lora_magnitude_vector`` per linear layer) is
`LoraConfig(variant="dora")`. A PiSSA / OLoRA adapter goes to PEFT as a rank-2r LoRA over
the original base (`lora_jax.to_original_base`), as PEFT's own conversion writes it.

Not supported (each an error naming the field): peft_type other than "LORA", DoRA on a
tied embedding, layers_to_transform / layers_pattern, fan_in_fan_out, lora_bias, init_lora_weights that
change the base weights (a file that needs the changed base: PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA),
loftq_config, megatron_config, target_parameters, trainable_token_indices, layer_replication,
activated LoRA, QA-LoRA and the other PEFT variants, and any field this module does not know
that is set. Nothing is ever unpickled: a directory with only ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from lora_jax import _paths, _trees
from lora_jax.adapters.geometry import Geometry
from lora_jax.adapters.plan import Plan
from lora_jax.adapters.records import Adapter
from lora_jax.config import ALL_LINEAR, BIASES, LoraConfig, matches_names, matches_pattern
from lora_jax.io import _assembly
from lora_jax.io.hf_names import LLAMA, NameMap
from lora_jax.ops.named import base_of, join_adapter, only_adapter
from lora_jax.quant.formats import QuantizedTensor

PathLike = str | os.PathLike
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
OUTPUT_HEAD = "lm_head"  # PEFT's output embedding of a causal LM (tied models have none)
_LINEAR, _EMBED = "kernel", "embedding"  # the adapted parameters, by their lora_jax names
_SUFFIXES = {  # PEFT's tensor names of an adapter, by the lora_jax parameter and leaf
    (_LINEAR, "a"): "lora_A.weight",
    (_LINEAR, "b"): "lora_B.weight",
    (_EMBED, "a"): "lora_embedding_A",
    (_EMBED, "b"): "lora_embedding_B",
    (_LINEAR, "m"): "lora_magnitude_vector",  # DoRA's magnitude (use_dora)
    (_EMBED, "m"): "lora_magnitude_vector",
}
# PEFT 0.21's `LoraConfig().to_dict()` (peft_version left for PEFT to fill in: PEFT did not
# write the file); `save_peft` writes every field, its own values over these.
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": None,
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None,
    "target_modules": None,
    "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
    "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": False,
    "velora_config": None,
}  # fmt: skip
# Fields whose value changes the adapted model beyond plain LoRA: any value but the default
# is refused, with the reason.
_UNSUPPORTED = {
    "layers_to_transform": "layer selection by index is not translated",
    "layers_pattern": "layer selection by index is not translated",
    "fan_in_fan_out": "Conv1D weights (in, out) are not Llama-family linear layers",
    "lora_bias": "LoRA-B biases have no lora_jax leaf",
    "loftq_config": "LoftQ changes the base weights",
    "megatron_config": "Megatron parallel layers are not supported",
    "target_parameters": "LoRA on bare parameters (MoE experts) is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
    "layer_replication": "layer replication changes the model",
    "alora_invocation_tokens": "activated LoRA is not plain LoRA",
    "use_qalora": "QA-LoRA is not plain LoRA",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not plain LoRA",
    "use_bdlora": "BD-LoRA is not plain LoRA",
    "arrow_config": "Arrow routing is not plain LoRA",
    "kasa_config": "KaSA is not plain LoRA",
}
# Fields that never change the adapted model (PEFT bookkeeping, init-time-only options).
_IGNORED = frozenset(
    {"auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
     "task_type", "megatron_core", "qalora_group_size", "runtime_config", "eva_config",
     "corda_config", "lora_ga_config", "lora_dropout", "init_lora_weights"}
)  # fmt: skip
# init_lora_weights values that only decide the starting A and B (the base is untouched).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class _Model:
    """What PEFT sees of a params tree through a `NameMap`.

    Attributes:
      params: lora_jax parameter path -> value (unboxed).
      layers: the modules PEFT can adapt: Hugging Face name -> (lora_jax module path,
        "kernel" or "embedding").
      tensors: Hugging Face tensor name -> lora_jax parameter path.
      modules: every Hugging Face module name that holds a parameter, and its parents.
      tied: the model has an embedding and no output head of its own (it attends to the
        embedding).
    """

    params: Mapping[str, Any]
    layers: Mapping[str, tuple[str, str]]
    tensors: Mapping[str, str]
    modules: frozenset[str]
    tied: bool

    @classmethod
    def of(cls, params: Mapping[str, Any], names: NameMap) -> _Model:
        layers, tensors, modules = {}, {}, set()
        for param in params:
            module, leaf = _paths.split(param)
            if _paths.parse(leaf) is not None:
                continue  # an adapter leaf
            try:
                hf_module, hf_param = names.to_hf(module), names.param_to_hf(param)
            except ValueError:
                continue  # not a parameter the Hugging Face model has: nothing can name it
            tensors[hf_param] = param
            parts = hf_module.split(".")
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if leaf in (_LINEAR, _EMBED):
                layers[hf_module] = (module, leaf)
        tied = OUTPUT_HEAD not in layers and any(p == _EMBED for _, p in layers.values())
        return cls(params, layers, tensors, frozenset(modules), tied)

    @property
    def embedding(self) -> str | None:
        """The Hugging Face name of the (first) embedding."""
        return next((m for m, (_, p) in sorted(self.layers.items()) if p == _EMBED), None)

    def wrapped(self, to_save: Iterable[str]) -> set[str]:
        """The modules PEFT wraps as modules to save (`peft.utils.other._set_trainable`: every
        module whose name ends with an entry)."""
        to_save = list(to_save)
        return {m for m in self.modules if any(m.endswith(t) for t in to_save)}

    def saved_tensors(self, wrapped: Iterable[str]) -> dict[str, str]:
        """HF tensor name -> lora_jax parameter path of every parameter inside `wrapped`."""
        prefixes = tuple(m + "." for m in wrapped)
        return {k: p for k, p in self.tensors.items() if k.startswith(prefixes)}


# --------------------------------------------------------------------------- PEFT's rules


def _peft_list_match(targets: Iterable[str], name: str) -> bool:
    """PEFT's list rule for target_modules / exclude_modules: a name or a '.'-suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _peft_kept_out(modules_to_save: Iterable[str], name: str) -> bool:
    """Whether PEFT keeps a module out of the LoRA targets as (inside) a module to save."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _peft_key(key: str, name: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule (`peft.utils.other.get_pattern_key`)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _config_key(key: str, path: str) -> bool:
    """lora_jax's rank_pattern / alpha_pattern rule (`lora_jax.config.matches_pattern`)."""
    return re.fullmatch(f"(?:.*/)?(?:{key})", path) is not None


def _peft_selects(config: Mapping[str, Any], name: str, leaf: str) -> bool:
    """Whether PEFT puts a LoRA layer on the module `name` (`check_target_module_exists`;
    "all-linear" as PEFT resolves it for a causal LM: every linear layer but the head)."""
    exclude = config.get("exclude_modules")
    if exclude and (
        re.fullmatch(exclude, name) if isinstance(exclude, str) else _peft_list_match(exclude, name)
    ):
        return False
    if _peft_kept_out(config.get("modules_to_save") or [], name):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return leaf == _LINEAR and name != OUTPUT_HEAD
        return re.fullmatch(targets, name) is not None
    return _peft_list_match(targets or [], name)


def _plain(key: str, sep: str) -> bool:
    """Whether a pattern key is a plain path of names (its separators are separators)."""
    return re.fullmatch(rf"\w+(?:{re.escape(sep)}\w+)*", key) is not None


Pattern = tuple[tuple[str, Any], ...]


def _fit_pattern(
    want: Mapping[str, Any],
    default: Any,
    translated: Pattern,
    match: Callable[[str, str], bool],
    sep: str,
) -> Pattern:
    """Pattern pairs (first match wins) that give every module of `want` its value: the
    translated keys, after a key per module that they get wrong (its own name); keys that
    match no module are dropped."""
    resolve = lambda pattern, m: next((v for k, v in pattern if match(k, m)), default)
    key_of = lambda m: m if _plain(m, sep) else re.escape(m)
    fixes = tuple((key_of(m), v) for m, v in sorted(want.items()) if resolve(translated, m) != v)
    return tuple((k, v) for k, v in fixes + translated if any(match(k, m) for m in want))


def _resolves(pattern: Pattern, want: Mapping[str, Any], default: Any, match: Callable) -> bool:
    return all(next((v for k, v in pattern if match(k, m)), default) == v for m, v in want.items())


# --------------------------------------------------------------------------- save


def save_peft(
    path: PathLike,
    params: Mapping,
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    names: NameMap = LLAMA,
    name: str | None = None,
) -> Path:
    """Writes an adapter as PEFT does, for ``peft.PeftModel.from_pretrained``.

    The directory gets ``adapter_config.json`` and ``adapter_model.safetensors`` (the layout
    in the module docstring), replaced atomically: they are written to a staging directory
    beside it, which then takes its place (other files already in the directory, such as
    PEFT's README.md, are carried over; a stale ``adapter_model.bin`` is dropped).

    Args:
      path: the adapter directory (created if missing).
      params: the variables dict from `lora_jax.init` (or after training): plain LoRA
        adapters of the default name on unstacked linear kernels and embeddings; the
        modules of its `LoraConfig.trainable` extras become PEFT's ``modules_to_save`` (PEFT
        saves whole modules: every parameter of such a module is written).
      config: the `LoraConfig` the adapters were made with.
      base_model_name_or_path: written to the config (PEFT loads the base model from it
        when given the adapter alone).
      names: lora_jax module paths <-> Hugging Face module names.
      name: with several named adapters in `params`, the one to write (PEFT's file holds
        one adapter; PEFT names it when loading).

    Returns:
      The directory.

    Raises:
      TypeError: `config` is not a `LoraConfig`.
      ValueError: `params` hold no adapter or do not fit `config`; an adapter PEFT cannot
        hold (batch axes, a stacked layer, another variant or name, a parameter other than
        a kernel or an embedding); a module without a Hugging Face name; a trainable extra
        on an adapted module, a 4-bit kernel or a tied embedding; the directory holds a
        subdirectory (it is replaced whole).

    Example:
      >>> import json, os, pathlib, tempfile, jax, jax.numpy as jnp, lora_jax as lj
      >>> from lora_jax.models import Llama, LlamaConfig
      >>> model = Llama(LlamaConfig.tiny(num_layers=1))
      >>> x = jnp.zeros((1, 8), jnp.int32)
      >>> base = model.init(jax.random.key(0), x)
      >>> cfg = lj.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
      >>> params = lj.init(lj.LoRA(model, cfg), jax.random.key(1), x, base_params=base)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = save_peft(d, params, cfg)
      ...     files = sorted(os.listdir(d))
      ...     written = json.loads(pathlib.Path(d, "adapter_config.json").read_text())
      ...     loaded, loaded_cfg = load_peft(d, base)
      >>> files
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> written["r"], written["lora_alpha"], written["target_modules"]
      (4, 8.0, ['q_proj', 'v_proj'])
      >>> loaded_cfg.targets, loaded_cfg.scale_for("layers_0/self_attn/q_proj")
      (('q_proj', 'v_proj'), 2.0)
    """
    if isinstance(params, Mapping):
        params = only_adapter(params, name, "save_peft", config if name else None)
    values, plan, _, _ = _assembly.to_save(params, config)
    flat = _trees.flat(values)
    model = _Model.of({_paths.to_param(k): v for k, v in flat.items() if _in_params(k)}, names)
    problems: list[str] = []
    tensors, adapted = _adapter_tensors(plan, model, names, problems, config.variant)
    biases = _bias_tensors(plan, config, model, adapted, problems)
    plan = dataclasses.replace(
        plan, extras=plan.extras - {_paths.to_variables(p) for p in biases.values()}
    )
    to_save, saved = _modules_to_save(plan, model, names, adapted, problems)
    saved.update({k: np.asarray(model.params[p]) for k, p in biases.items()})
    _trees.raise_problems("save_peft: params hold what a PEFT adapter cannot", problems)
    peft_config = {
        **PEFT_DEFAULTS,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": to_save or None,
        "bias": config.bias,
        "use_dora": config.variant == "dora",
        "ensure_weight_tying": model.tied and model.embedding in adapted,
        "target_modules": _peft_targets(config, adapted, model, to_save),
        **_peft_patterns(config, adapted),
    }
    data = safetensors.numpy.save(
        {k: np.ascontiguousarray(v) for k, v in sorted({**tensors, **saved}.items())},
        metadata={"format": "pt"},
    )
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    return _replace_dir(Path(path), {CONFIG_FILE: text.encode(), WEIGHTS_FILE: data})


def _bias_tensors(
    plan: Plan,
    config: LoraConfig,
    model: _Model,
    adapted: Mapping[str, str],
    problems: list[str],
) -> dict[str, str]:
    """PEFT's tensor name -> lora_jax path of each bias that `config.bias` trains (PEFT saves
    them under the model's own names, beside the adapters, with ``bias`` in the config; an
    adapted layer's as ``<module>.base_layer.bias``)."""
    out = {}
    by_param = {p: k for k, p in model.tensors.items()}
    for var_path in sorted(plan.extras):
        param = _paths.to_param(var_path)
        if _paths.basename(param) != "bias" or config.bias == "none":
            continue
        if any(matches_pattern(t, param) for t in config.trainable):
            continue  # a module to save holds it
        if param not in by_param:
            problems.append(f"the bias '{param}' has no Hugging Face name.")
            continue
        name = by_param[param]
        module = name.removesuffix(".bias")
        out[PREFIX + (module + ".base_layer.bias" if module in adapted else name)] = param
    return out


def _in_params(var_path: str) -> bool:
    return var_path.startswith(_paths.PARAMS + "/")


def _adapter_tensors(
    plan: Plan, model: _Model, names: NameMap, problems: list[str], config_variant: str = "lora"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(PEFT's tensors of the adapters, adapted HF module -> lora_jax module path); a DoRA
    adapter's magnitude is PEFT's ``lora_magnitude_vector`` (use_dora)."""
    tensors, adapted = {}, {}
    for (var_path, name), record in sorted(plan.adapters.items()):
        param = _paths.to_param(var_path)
        module, leaf = _paths.split(param)
        g = record.geometry
        why = None
        if name != _paths.DEFAULT:
            why = f"it is the named adapter '{name}': a PEFT file holds one unnamed adapter"
        elif record.variant not in ("lora", "dora") or (record.variant == "dora") != (
            config_variant == "dora"
        ):
            why = f"variant '{record.variant}' has no PEFT form in this file"
        elif leaf not in (_LINEAR, _EMBED):
            why = f"PEFT adapts linear layers and embeddings, not a '{leaf}' parameter"
        elif g.n_batch:
            why = (
                f"it has batch axes {g.batch_shape} (one adapter per index, as for a per-head "
                "nn.Einsum), and PEFT's adapter is one (in, out) matrix"
            )
        elif len(model.params[param].shape) != len(g.shape):
            why = "its layer is stacked (nn.scan): unstack the layers first"
        if why is None:
            try:
                hf = names.to_hf(module)
            except ValueError as e:
                why = str(e).rstrip(".")
        if why is not None:
            problems.append(f"the adapter of '{param}' has no PEFT form: {why}.")
            continue
        a = np.asarray(model.params[_paths.join(module, _paths.adapter_leaf(leaf, "a"))])
        b = np.asarray(model.params[_paths.join(module, _paths.adapter_leaf(leaf, "b"))])
        a, b = a.reshape(g.fan_in, g.rank), b.reshape(g.rank, g.fan_out)
        tensors[f"{PREFIX}{hf}.{_SUFFIXES[leaf, 'a']}"] = a.T
        tensors[f"{PREFIX}{hf}.{_SUFFIXES[leaf, 'b']}"] = b.T
        if record.variant == "dora" and leaf == _EMBED and model.tied:
            problems.append(
                f"the DoRA adapter of '{param}' is on a tied embedding, which PEFT's DoRA "
                "adapts as the input embedding alone."
            )
            continue
        if record.variant == "dora":  # one magnitude per output feature, PEFT's row norms
            m = model.params[_paths.join(module, _paths.adapter_leaf(leaf, "m"))]
            tensors[f"{PREFIX}{hf}.{_SUFFIXES[leaf, 'm']}"] = np.asarray(m).reshape(g.fan_out)
        if leaf == _EMBED and model.tied:  # PEFT's tied head adapter: B and A, as a linear
            tensors[f"{PREFIX}{OUTPUT_HEAD}.{_SUFFIXES[_LINEAR, 'a']}"] = b
            tensors[f"{PREFIX}{OUTPUT_HEAD}.{_SUFFIXES[_LINEAR, 'b']}"] = a
        adapted[hf] = module
    return tensors, adapted


def _modules_to_save(
    plan: Plan, model: _Model, names: NameMap, adapted: Mapping[str, str], problems: list[str]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """PEFT's modules_to_save for the trainable extras (each module's last name where that
    selects it alone, else its full name) and the tensors of every parameter they hold."""
    wanted = set()
    for var_path in sorted(plan.extras):
        param = _paths.to_param(var_path)
        module = _paths.split(param)[0]
        try:
            hf = names.to_hf(module)
        except ValueError as e:
            problems.append(f"the trainable extra '{param}' has no PEFT form: {e}")
            continue
        if hf in adapted:
            problems.append(
                f"'{module}' has an adapter and a trainable extra: PEFT never adapts a module "
                "it saves whole."
            )
        elif model.tied and hf == model.embedding:
            problems.append(
                f"the trainable extra '{param}' is a tied embedding, which PEFT saves as two "
                "modules (input and output) where lora_jax trains one parameter."
            )
        else:
            wanted.add(hf)
    short = sorted({m.rpartition(".")[2] for m in wanted})
    to_save = short if model.wrapped(short) == wanted else sorted(wanted)
    if model.wrapped(to_save) != wanted:
        problems.append(
            f"modules_to_save {to_save} would make PEFT save "
            f"{sorted(model.wrapped(to_save) - wanted)} too (PEFT matches name endings)."
        )
    tensors = {}
    for name, param in sorted(model.saved_tensors(wanted).items()):
        value = model.params[param]
        if isinstance(value, QuantizedTensor):
            problems.append(f"'{param}' is a 4-bit kernel in a module to save.")
        elif _paths.basename(param) == _LINEAR and len(value.shape) != 2:
            problems.append(
                f"'{param}' has shape {tuple(value.shape)}: only an (in, out) kernel is a "
                "Hugging Face (out, in) weight."
            )
        else:
            array = np.asarray(value)
            tensors[PREFIX + name] = array.T if _paths.basename(param) == _LINEAR else array
    return to_save, tensors


def _peft_targets(
    config: LoraConfig, adapted: Mapping[str, str], model: _Model, to_save: list[str]
) -> str | list[str]:
    """PEFT's target_modules: "all-linear", the config's names ('/' -> '.') or the adapted
    modules' last names, where PEFT selects exactly the adapted modules with them; else the
    adapted modules' full names."""
    want = set(adapted)

    def selects(targets: str | list[str]) -> bool:
        config = {"target_modules": targets, "modules_to_save": to_save}
        got = {m for m, (_, leaf) in model.layers.items() if _peft_selects(config, m, leaf)}
        useful = isinstance(targets, str) or all(
            any(_peft_list_match([t], m) for m in want) for t in targets
        )
        return got == want and useful

    candidates: list[str | list[str]] = []
    if config.targets == ALL_LINEAR:
        candidates.append(ALL_LINEAR)
    elif isinstance(config.targets, tuple) and not config.exclude:
        candidates.append(sorted({t.replace("/", ".") for t in config.targets}))
    candidates.append(sorted({m.rpartition(".")[2] for m in want}))
    return next((c for c in candidates if selects(c)), sorted(want))


def _peft_patterns(config: LoraConfig, adapted: Mapping[str, str]) -> dict[str, dict]:
    """PEFT's rank_pattern and alpha_pattern, giving every adapted module lora_jax's rank and
    alpha as PEFT reads them back (keys sorted, as in the JSON file)."""
    out = {}
    for field, default, per_module in (
        ("rank_pattern", config.rank, config.rank_for),
        ("alpha_pattern", config.alpha, config.alpha_for),
    ):
        want = {hf: per_module(module) for hf, module in adapted.items()}
        translated = tuple(
            (k.replace("/", "."), v) for k, v in getattr(config, field) if _plain(k, "/")
        )
        pattern = tuple(sorted(_fit_pattern(want, default, translated, _peft_key, ".")))
        if not _resolves(pattern, want, default, _peft_key):  # the sort broke an order
            pattern = tuple(sorted(_fit_pattern(want, default, (), _peft_key, ".")))
        if not _resolves(pattern, want, default, _peft_key):
            raise ValueError(
                f"save_peft: no PEFT {field} gives each module its own value {want} (a "
                "module's name is a suffix of another's)."
            )
        out[field] = dict(pattern)
    return out


# --------------------------------------------------------------------------- load


def load_peft(
    path: PathLike, base_params: Mapping, *, names: NameMap = LLAMA, name: str | None = None
) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA adapter onto a base model's parameters.

    Args:
      path: a PEFT adapter directory (``adapter_config.json`` and
        ``adapter_model.safetensors``), made by PEFT's ``save_pretrained`` or `save_peft`.
      base_params: the base model's variables ``{"params": ...}`` or bare params dict, as
        `lora_jax.io.hf_checkpoint.load_pretrained` gives them (dense or 4-bit, boxed or
        not), without adapters.
      names: lora_jax module paths <-> Hugging Face module names.
      name: add the adapter under this name to `base_params`, which may then hold other
        named adapters (kept as they are).

    Returns:
      ``(params, config)``: the variables dict that `lora_jax.init` and `lora_jax.load_adapter`
      would give (``kernel_lora_a`` / ``kernel_lora_b`` beside each adapted kernel, the
      "lora" collection's records, the parameters of modules to save as
      `LoraConfig.trainable` extras holding the file's values), and a `LoraConfig` (for
      `lora_jax.LoRA`) whose targets, ranks, alphas, rsLoRA and extras give every module
      PEFT's scale exactly; its `quantize` describes a 4-bit base, its `param_dtype` is the
      file's adapter dtype.

    Raises:
      ValueError: a file is missing (a pickled ``adapter_model.bin`` is never read),
        corrupt or truncated; the config uses a feature beyond plain LoRA (the field is
        named); target_modules select modules without tensors, or the file holds tensors
        that the config does not select or that do not fit their module (each named); the
        base holds adapters or lacks a module.
    """
    if name is not None:
        loaded, config = load_peft(path, base_of(base_params), names=names)
        return join_adapter(base_params, loaded, name, "load_peft"), config
    path = Path(path)
    peft_config = _read_config(path / CONFIG_FILE)
    tensors = _read_weights(path)
    where = f"The PEFT adapter in '{path}'"
    boxed, flat = _assembly.base_leaves(base_params)
    model = _Model.of({_paths.to_param(k): v for k, v in flat.items() if _in_params(k)}, names)
    found = _Found.sort(tensors, peft_config, model, where)
    ranks = found.check(peft_config, model, where)
    config = _lora_config(peft_config, ranks, found, model, where)
    plan, values = found.tree(config, ranks, model)
    return _assembly.assemble(config, plan, boxed, flat, values)


@dataclasses.dataclass
class _Found:
    """A PEFT file's tensors, sorted out.

    Attributes:
      adapters: HF module -> {"a": lora_A, "b": lora_B}, in PEFT's layout.
      saved: lora_jax parameter path -> the tensor of a module to save (HF layout).
      copies: PEFT's copies of base weights (an adapted embedding's) by HF tensor name.
      missing: tensors of modules to save that the file lacks.
    """

    adapters: dict[str, dict[str, np.ndarray]]
    saved: dict[str, np.ndarray]
    copies: dict[str, np.ndarray]
    missing: list[str]

    @classmethod
    def sort(
        cls, tensors: Mapping[str, np.ndarray], config: Mapping, model: _Model, where: str
    ) -> _Found:
        to_save = list(config.get("modules_to_save") or [])
        wrapped = model.wrapped(to_save)
        saved_names = model.saved_tensors(wrapped)
        problems = [
            f"modules_to_save names '{t}', which is no module of base_params."
            for t in to_save
            if not model.wrapped([t])
        ]
        if model.tied and model.embedding in wrapped:
            problems.append(
                f"modules_to_save holds the tied embedding '{model.embedding}', which PEFT "
                "trains as two modules (input and output) and lora_jax as one parameter."
            )
        suffixes = {v: k for k, v in _SUFFIXES.items()}
        found = cls({}, {}, {}, [])
        for key, value in sorted(tensors.items()):
            name = key.removeprefix(PREFIX)
            ending = next((s for s in suffixes if name.endswith("." + s)), None)
            if not key.startswith(PREFIX):
                problems.append(f"tensor '{key}' does not start with '{PREFIX}'.")
            elif name in saved_names:
                found.saved[saved_names[name]] = value
            elif (
                config.get("bias", "none") != "none"
                and name.endswith(".bias")
                and name.replace(".base_layer.", ".") in model.tensors
            ):  # a bias PEFT trains (`bias`); an adapted layer's under its base_layer
                found.saved[model.tensors[name.replace(".base_layer.", ".")]] = value
            elif ending is not None:
                module = name.removesuffix("." + ending)
                found.adapters.setdefault(module, {})[suffixes[ending][1]] = value
            elif ".base_layer." in name:
                found.copies[name] = value
            else:
                problems.append(
                    f"tensor '{key}' is neither a LoRA A/B tensor nor a parameter of the "
                    f"modules_to_save {to_save}."
                )
        found.missing = [PREFIX + n for n in sorted(saved_names) if PREFIX + n not in tensors]
        _trees.raise_problems(f"{where} does not fit base_params", problems)
        return found

    def check(self, config: Mapping, model: _Model, where: str) -> dict[str, tuple[int, Any]]:
        """Raises unless the tensors are those the config calls for on this base; returns
        PEFT's (r, lora_alpha) per adapted module."""
        problems = self._tied_problems(config, model)
        problems += self._copy_problems(model)
        problems += self._target_problems(config, model)
        problems += [f"tensor '{k}' of a module to save is missing." for k in self.missing]
        _trees.raise_problems(f"{where} does not fit base_params", problems)
        ranks, problems = {}, []
        for module, pair in sorted(self.adapters.items()):
            path, leaf = model.layers[module]
            r = _peft_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = _peft_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            ranks[module] = (r, alpha)
            fan_in, fan_out = _fans(model.params[_paths.join(path, leaf)], leaf, pair.get("a"))
            dora = bool(config.get("use_dora"))
            if dora and model.tied and leaf == _EMBED:
                problems.append(
                    f"use_dora on the tied embedding '{module}': PEFT's DoRA adapts the input "
                    "embedding alone, lora_jax's the tied output head too."
                )
                continue
            if not dora and "m" in pair:
                problems.append(f"'{module}' has a magnitude vector but use_dora is false.")
            wanted = (("a", (r, fan_in)), ("b", (fan_out, r)))
            for x, want in (*wanted, ("m", (fan_out,))) if dora else wanted:
                key = f"{PREFIX}{module}.{_SUFFIXES[leaf, x]}"
                if x not in pair:
                    problems.append(f"tensor '{key}' is missing.")
                elif pair[x].shape != want:
                    problems.append(
                        f"tensor '{key}' has shape {pair[x].shape} but '{path}/{leaf}' with "
                        f"r={r} calls for {want}."
                    )
        for param, value in sorted(self.saved.items()):
            base = model.params[param]
            if isinstance(base, QuantizedTensor):
                problems.append(
                    f"the module to save holds '{param}', a 4-bit kernel in base_params: load "
                    "the base with that layer dense."
                )
                continue
            linear = _paths.basename(param) == _LINEAR
            shape = tuple(base.shape)[::-1] if linear else tuple(base.shape)
            if value.shape != shape or (linear and len(shape) != 2):
                problems.append(
                    f"the tensor of module to save '{param}' has shape {value.shape} but "
                    f"base_params' has {tuple(base.shape)}."
                )
        _trees.raise_problems(f"{where} does not fit base_params", problems)
        return ranks

    def _tied_problems(self, config: Mapping, model: _Model) -> list[str]:
        """With tied embeddings PEFT saves the head's adapter beside the embedding's (A and B
        swapped and transposed): a copy, checked and set aside."""
        if not model.tied:
            return []
        embedding = self.adapters.get(model.embedding)
        if embedding is not None and not config.get("ensure_weight_tying"):
            return [
                f"it adapts the tied embedding '{model.embedding}' without ensure_weight_tying: "
                "PEFT then adapts the input embedding only, while lora_jax's embedding adapter "
                "acts on the tied output head too."
            ]
        head = self.adapters.pop(OUTPUT_HEAD, None)
        if head is None or not config.get("ensure_weight_tying"):
            return [] if head is None else [f"it adapts '{OUTPUT_HEAD}', which is tied."]
        same = embedding is not None and all(
            x in head and y in embedding and np.array_equal(head[x], embedding[y].T)
            for x, y in (("a", "b"), ("b", "a"))
        )
        return [] if same else [f"its tied '{OUTPUT_HEAD}' adapter is not the embedding's."]

    def _copy_problems(self, model: _Model) -> list[str]:
        """PEFT saves the base weights of adapted embeddings and output heads beside their
        adapters (``<module>.base_layer.weight``); they must be the base's own values."""
        problems = []
        for name, value in sorted(self.copies.items()):
            module, _, hf_param = name.partition(".base_layer.")
            head = module == OUTPUT_HEAD and model.tied
            param = model.tensors.get(f"{model.embedding if head else module}.{hf_param}")
            if param is None or (module not in self.adapters and not head):
                problems.append(f"tensor '{PREFIX}{name}' is no adapted layer's base weight.")
                continue
            base = model.params[param]
            if isinstance(base, QuantizedTensor):
                continue  # a 4-bit base never equals the dense weights
            base = np.asarray(base)
            if _paths.basename(param) == _LINEAR:
                base = base.reshape(-1, value.shape[0] if value.ndim else 1).T
            if not _same_values(base, value):
                problems.append(
                    f"tensor '{PREFIX}{name}' holds other weights than base_params' '{param}' "
                    "(a resized or retrained layer): load the base the adapter was made on."
                )
        return problems

    def _target_problems(self, config: Mapping, model: _Model) -> list[str]:
        """The adapted modules are exactly those PEFT's target_modules select."""
        selected = {m for m, (_, leaf) in model.layers.items() if _peft_selects(config, m, leaf)}
        if model.tied and config.get("ensure_weight_tying"):
            if _peft_selects(config, OUTPUT_HEAD, _LINEAR) and model.embedding:
                selected.add(model.embedding)  # PEFT moves a tied head's target to the embedding
        problems = [
            f"the file holds LoRA tensors for '{m}', which "
            + (
                f"target_modules={config.get('target_modules')!r} does not select."
                if m in model.layers
                else "is no linear layer or embedding of base_params."
            )
            for m in sorted(set(self.adapters) - selected)
        ]
        problems += [
            f"target_modules selects '{m}' but tensor "
            f"'{PREFIX}{m}.{_SUFFIXES[model.layers[m][1], 'a']}' is missing."
            for m in sorted(selected - set(self.adapters))
        ]
        if not selected and not problems:
            problems.append(
                f"target_modules={config.get('target_modules')!r} selects no linear layer or "
                "embedding of base_params."
            )
        return problems

    def tree(
        self, config: LoraConfig, ranks: Mapping[str, tuple[int, Any]], model: _Model
    ) -> tuple[Plan, dict[str, Any]]:
        """The plan and the new leaves by variables path, in lora_jax's layout."""
        dtypes = {v.dtype for pair in self.adapters.values() for v in pair.values()}
        dtype = jnp.dtype(config.param_dtype)
        values, records = {}, {}
        for hf, pair in sorted(self.adapters.items()):
            module, leaf = model.layers[hf]
            param = _paths.to_variables(_paths.join(module, leaf))
            value = model.params[_paths.to_param(param)]
            g = Geometry(tuple(value.shape), 0, _n_in(value, leaf, pair["a"]), ranks[hf][0])
            shapes = [("a", g.a_shape), ("b", g.b_shape)]
            if config.variant == "dora":
                shapes.append(("m", g.out_shape))
            for x, shape in shapes:
                array = pair[x].T.reshape(shape)
                values[_paths.leaf_path(param, x)] = jnp.asarray(
                    array if len(dtypes) == 1 else array.astype(dtype)
                )
            records[param, _paths.DEFAULT] = Adapter(g, config.scale_for(module), config.variant)
        for param, tensor in self.saved.items():
            base = model.params[param]
            array = tensor.T if _paths.basename(param) == _LINEAR else tensor
            values[_paths.to_variables(param)] = jnp.asarray(array.astype(base.dtype))
        extras = frozenset(_paths.to_variables(p) for p in self.saved)
        return Plan(records, extras, {}), values


def _peft_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    return next((v for k, v in pattern.items() if _peft_key(k, name)), default)


def _same_values(mine: np.ndarray, theirs: np.ndarray) -> bool:
    """Equal shapes and values, compared in the coarser of the two dtypes."""
    if mine.shape != theirs.shape:
        return False
    eps = lambda a: float(jnp.finfo(a.dtype).eps) if jnp.issubdtype(a.dtype, jnp.floating) else 0
    coarse = mine.dtype if eps(mine) >= eps(theirs) else theirs.dtype
    return np.array_equal(mine.astype(coarse), theirs.astype(coarse))


def _fans(value: Any, leaf: str, a: np.ndarray | None) -> tuple[int, int]:
    """(in, out) of the Hugging Face module of a kernel or an embedding."""
    n_in = _n_in(value, leaf, a)
    shape = tuple(value.shape)
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _n_in(value: Any, leaf: str, a: np.ndarray | None) -> int:
    """The input axes of an adapted parameter: one for an embedding; a 4-bit kernel knows
    them; for a dense kernel, the leading axes whose product is lora_A's width (else one)."""
    if leaf == _EMBED:
        return 1
    if isinstance(value, QuantizedTensor):
        return len(value.in_shape)
    shape = tuple(value.shape)
    if a is not None and a.ndim == 2:
        for n in range(1, len(shape)):
            if math.prod(shape[:n]) == a.shape[1]:
                return n
    return 1


def _lora_config(
    peft_config: Mapping,
    ranks: Mapping[str, tuple[int, Any]],
    found: _Found,
    model: _Model,
    where: str,
) -> LoraConfig:
    """A LoraConfig that adapts exactly the file's modules with PEFT's rank and alpha for
    each, and trains exactly the parameters of its modules to save."""
    adapted = {model.layers[hf][0]: hf for hf in found.adapters}
    chosen = _config_targets(peft_config["target_modules"], adapted, model, where)
    dtypes = {v.dtype for pair in found.adapters.values() for v in pair.values()}
    fields: dict[str, Any] = dict(
        rank=peft_config["r"],
        alpha=peft_config["lora_alpha"],
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        targets=chosen,
        use_rslora=bool(peft_config.get("use_rslora", False)),
        init="gaussian" if peft_config.get("init_lora_weights") == "gaussian" else "kaiming",
        param_dtype=dtypes.pop() if len(dtypes) == 1 else np.float32,
        bias=peft_config.get("bias", "none"),
        variant="dora" if peft_config.get("use_dora") else "lora",
    )
    biases = LoraConfig(targets=chosen, bias=fields["bias"])
    fields["trainable"] = tuple(
        sorted(re.escape(p) for p in found.saved if not biases.is_trainable_extra(p))
    )
    for field, index, default in (
        ("rank_pattern", 0, fields["rank"]),
        ("alpha_pattern", 1, fields["alpha"]),
    ):
        want = {path: ranks[hf][index] for path, hf in adapted.items()}
        translated = tuple(
            (k.replace(".", "/"), v)
            for k, v in (peft_config.get(field) or {}).items()
            if _plain(k, ".")
        )
        fields[field] = _fit_pattern(want, default, translated, _config_key, "/")
    try:
        config = LoraConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: adapter_config.json gives no valid LoraConfig: {e}") from None
    rslora = config.use_rslora
    problems = []
    for path, hf in sorted(adapted.items()):
        r, alpha = ranks[hf]
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        linear = model.layers[hf][1] == _LINEAR
        got = (config.rank_for(path), config.scale_for(path))
        if not config.is_target(path, linear=linear) or got != (r, scale):
            problems.append(
                f"'{path}' gets rank {config.rank_for(path)} and scale {config.scale_for(path)} "
                f"where PEFT gives '{hf}' rank {r} and scale {scale}."
            )
    problems += [
        f"'{p}' is not a trainable extra." for p in found.saved if not config.is_trainable_extra(p)
    ]
    _trees.raise_problems(f"{where}: no LoraConfig reproduces it", problems)
    return config


def _config_targets(
    targets: Any, adapted: Mapping[str, str], model: _Model, where: str
) -> str | tuple[str, ...]:
    """LoraConfig.targets selecting exactly the adapted modules: PEFT's names ('.' -> '/')
    or "all-linear" where they do, else the adapted modules' last names, else their paths."""
    layers = {path: leaf == _LINEAR for path, leaf in model.layers.values()}
    candidates: list[str | tuple[str, ...]] = []
    if isinstance(targets, (list, tuple)) and all(_plain(t, ".") for t in targets):
        candidates.append(tuple(sorted({t.replace(".", "/") for t in targets})))
    candidates.append(ALL_LINEAR)  # also what PEFT saves for "all-linear": the modules' list
    candidates.append(tuple(sorted({_paths.basename(p) for p in adapted})))
    candidates.append(tuple(sorted(adapted)))

    def selects(names: str | tuple[str, ...]) -> bool:
        got = {p for p, linear in layers.items() if matches_names(names, p, linear=linear)}
        useful = isinstance(names, str) or all(
            any(matches_names((n,), p) for p in adapted) for n in names
        )
        return got == set(adapted) and useful

    chosen = next((c for c in candidates if selects(c)), None)
    if chosen is None:
        raise ValueError(
            f"{where}: no LoraConfig.targets selects exactly {sorted(adapted)} (a module path "
            "ends with another one)."
        )
    return chosen


# --------------------------------------------------------------------------- files


def _read_config(file: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what plain LoRA can hold."""
    if not file.is_file():
        raise ValueError(f"'{file}' is missing: not a PEFT adapter directory.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{file}' is corrupted or truncated: not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{file}' does not hold a JSON object.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"'{file}' has peft_type {config.get('peft_type')!r}: load_peft reads LoRA "
            'adapters (peft_type "LORA") only.'
        )
    problems = []
    for field, why in _UNSUPPORTED.items():
        if field in config and not _is_default(config[field], PEFT_DEFAULTS[field]):
            problems.append(f"{field}={config[field]!r}: {why}.")
    if config.get("bias", "none") not in BIASES:
        problems.append(f"bias={config['bias']!r}: PEFT's bias is one of {BIASES}.")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        problems.append(
            f"init_lora_weights={init!r}: this initialization changes the base weights, so "
            "the adapter fits only the residual model PEFT made with it (convert it with "
            "PEFT's path_initial_model_for_weight_conversion)."
        )
    known = set(PEFT_DEFAULTS) | set(_IGNORED)
    problems += [
        f"{field}={value!r}: a field load_peft does not know."
        for field, value in sorted(config.items())
        if field not in known and value not in (None, False, {}, [], "")
    ]
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            problems.append(f"{field}={value!r}: a positive number is required.")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            problems.append(f"{field}={config[field]!r}: a dict is required.")
    if config.get("target_modules") is None:
        problems.append("target_modules is missing.")
    problems += _regex_problems(config)
    _trees.raise_problems(f"'{file}' uses what load_peft does not support", problems)
    return config


def _regex_problems(config: Mapping[str, Any]) -> list[str]:
    """The fields PEFT reads as regular expressions that do not compile."""
    regexes = [
        (f, config.get(f))
        for f in ("target_modules", "exclude_modules")
        if isinstance(config.get(f), str)
    ]
    regexes += [("modules_to_save", m) for m in config.get("modules_to_save") or []]
    for field in ("rank_pattern", "alpha_pattern"):
        if isinstance(config.get(field), dict):
            regexes += [(field, k) for k in config[field]]
    out = []
    for field, regex in regexes:
        try:
            re.compile(regex)
        except (re.error, TypeError) as e:
            out.append(f"{field} holds {regex!r}, which is not a regular expression ({e}).")
    return out


def _is_default(value: Any, default: Any) -> bool:
    return value == default or (value in (None, [], {}, False, "") and default in (None, {}, False))


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    """adapter_model.safetensors, read without pickles and without the Hub."""
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise ValueError(
                f"'{file}' is missing and '{directory / PICKLE_FILE}' is a pickle, which "
                "lora_jax never loads (it can run code): convert it to safetensors "
                "(safetensors.torch.save_file(torch.load(..., weights_only=True), ...))."
            )
        raise ValueError(
            f"'{file}' is missing (PEFT would look for it on the Hugging Face Hub; load_peft "
            "reads local files only)."
        )
    data = file.read_bytes()
    try:
        items = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        raise ValueError(f"'{file}' is not a valid safetensors file: {e}.") from None
    return {name: _assembly.tensor(file, name, item) for name, item in items}


def _replace_dir(directory: Path, files: Mapping[str, bytes]) -> Path:
    """Makes `directory` hold `files` (and the other files it held), in one step: a staging
    directory beside it is filled and synced, then swapped in (one atomic exchange where the
    platform has it, else two renames with the old directory kept until the new one is in
    place). A crash leaves the old directory or the new one, whole."""
    directory = directory.resolve()  # a symlinked directory: its target is replaced
    directory.parent.mkdir(parents=True, exist_ok=True)
    old = list(directory.iterdir()) if directory.is_dir() else []
    nested = [p.name for p in old if p.is_dir() and not p.is_symlink()]
    if nested:
        raise ValueError(
            f"save_peft replaces '{directory}' whole, and it holds directories {nested}: save "
            "the adapter into a directory of its own."
        )
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"'{directory}' exists and is not a directory.")
    stage = _sibling(directory, "staging")
    try:
        if directory.is_dir():
            shutil.copymode(directory, stage)
        for p in old:
            if p.name not in files and p.name != PICKLE_FILE:
                _link_or_copy(p, stage / p.name)
        for name, data in files.items():
            with open(stage / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _sync_dir(stage)
        if not directory.exists():
            os.rename(stage, directory)
        elif not _exchange(stage, directory):
            retired = _sibling(directory, "old")
            os.rename(directory, retired / "adapter")
            os.rename(stage, directory)
            shutil.rmtree(retired, ignore_errors=True)
        _sync_dir(directory.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the old directory after an exchange
    return directory


def _sibling(directory: Path, tag: str) -> Path:
    """A new hidden directory beside `directory` (made with the process's umask)."""
    path = directory.with_name(f".{directory.name}.{tag}.{secrets.token_hex(8)}")
    path.mkdir()
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or the file system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
