"""The plan: which parameters of a tree are adapted, trained in full or kept in 4 bits.

`lora_jax.init` computes the plan once, by an abstract trace of the model, and writes it into
the tree's "lora" collection as records; `Plan.of(tree)` reads it back. The plan is what
merge, partition, sharding and the adapter files work from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_jax import _paths, _trees
from lora_jax.adapters.records import Adapter, Quantized, Trainable
from lora_jax.adapters.variant import variant_for


@dataclasses.dataclass(frozen=True)
class Plan:
    """The records of a tree's "lora" collection, by the variables path of what they describe.

    Attributes:
      adapters: (path of the adapted parameter, adapter name) -> its `Adapter` record, e.g.
        ``("params/layers_0/self_attn/q_proj/kernel", "default")``.
      extras: paths of the base parameters trained in full (`LoraConfig.trainable`).
      quantized: path of each 4-bit kernel -> its `Quantized` marker.
    """

    adapters: Mapping[tuple[str, str], Adapter] = dataclasses.field(default_factory=dict)
    extras: frozenset[str] = frozenset()
    quantized: Mapping[str, Quantized] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, tree: Mapping[str, Any]) -> Plan:
        """The plan recorded in a variables dict (empty when it has no "lora" collection)."""
        records = tree.get(_paths.LORA) if isinstance(tree, Mapping) else None
        if not isinstance(records, Mapping):
            return cls()
        adapters, extras, quantized = {}, set(), {}
        for path, record in _trees.flat({_paths.LORA: records}).items():
            if isinstance(record, Adapter):
                adapters[_paths.record_target(path)] = record
            elif isinstance(record, Trainable):
                extras.add(_paths.extra_param(path))
            elif isinstance(record, Quantized):
                quantized[_paths.quantized_param(path)] = record
            else:
                raise ValueError(
                    f"'{path}' is not a lora_jax record (found {type(record).__name__}): the "
                    f"'{_paths.LORA}' collection holds only what lora_jax.init puts there."
                )
        return cls(adapters, frozenset(extras), quantized)

    def records(self) -> dict:
        """The "lora" collection (a nested dict) that holds this plan."""
        flat: dict[str, Any] = {}
        for (param, name), record in self.adapters.items():
            flat[_paths.record_path(param, name)] = record
        for param in self.extras:
            module, leaf = _paths.split(_paths.to_param(param))
            flat[_paths.join(_paths.LORA, module, _paths.extra_leaf(leaf))] = Trainable()
        for param, marker in self.quantized.items():
            module, leaf = _paths.split(_paths.to_param(param))
            flat[_paths.join(_paths.LORA, module, _paths.quantized_leaf(leaf))] = marker
        return _trees.unflat(flat).get(_paths.LORA, {})

    def adapter_leaves(self) -> dict[str, tuple[str, str, str]]:
        """Variables path of every adapter leaf the plan calls for -> (adapted parameter,
        adapter name, leaf)."""
        out = {}
        for (param, name), record in self.adapters.items():
            for leaf in variant_for(record.variant).leaves(record.geometry):
                out[_paths.leaf_path(param, leaf, name)] = (param, name, leaf)
        return out
