"""Layer rules and their registry: which Flax layer classes get adapters, and how.

Register a rule for your own layer class with `register_rule`.
"""

from __future__ import annotations

import flax.linen as nn

from lora_jax.adapters.geometry import Split
from lora_jax.rules.base import Rule
from lora_jax.rules.conv import ConvRule
from lora_jax.rules.embed import EmbedRule
from lora_jax.rules.linear import LinearRule, dense_general_spec, dense_spec, einsum_spec

_RULES: dict[type, Rule] = {}


def register_rule(layer_class: type, rule: Rule) -> None:
    """Registers (or replaces) the LoRA rule for a layer class and its subclasses.

    Example:
      >>> import flax.linen as nn, lora_jax as lj
      >>> class MyLinear(nn.Module):
      ...   features: int
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
      ...     return x @ w
      >>> spec = lambda module, x, kwargs: ("...i", "io", "...o")
      >>> lj.rules.register_rule(MyLinear, lj.rules.LinearRule(spec=spec, param="w"))
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, nn.Module)):
        raise TypeError(f"register_rule needs a flax.linen Module class, got {layer_class!r}.")
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule needs a lora_jax.rules.Rule, got {rule!r}.")
    _RULES[layer_class] = rule


def rule_for(layer_class: type) -> Rule | None:
    """The rule for a layer class: its own, else the nearest registered base class's."""
    return next((_RULES[c] for c in layer_class.__mro__ if c in _RULES), None)


register_rule(nn.Dense, LinearRule(spec=dense_spec))
register_rule(nn.DenseGeneral, LinearRule(spec=dense_general_spec))
register_rule(nn.Einsum, LinearRule(spec=einsum_spec))
register_rule(nn.Embed, EmbedRule())
register_rule(nn.Conv, ConvRule())

__all__ = [
    "ConvRule",
    "EmbedRule",
    "LinearRule",
    "Rule",
    "Split",
    "register_rule",
    "rule_for",
]
