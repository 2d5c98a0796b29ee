"""Optimizers that train only the trainable leaves.

`optimizer(tx, params)` is `optax.multi_transform` over the tree's labels: trainable leaves
get `tx`, frozen leaves get `optax.set_to_zero()` (no optimizer state, no movement). This is
safer than `optax.masked`, which passes frozen leaves' raw gradients through unchanged — with
a whole-tree gradient they would move. Labels are fixed by the tree given here and looked up
by path, so the same optimizer works on the whole tree and on its trainable half
(`partition(params)[0]`), which is what the train step feeds it.
"""

from __future__ import annotations

import optax
from flax import traverse_util

from lora_jax import _paths
from lora_jax.ops.partition import FROZEN, TRAINABLE, Tree, trainable_paths

LORA_B = "lora_b"


def optimizer(
    tx: optax.GradientTransformation,
    params: Tree,
    *,
    loraplus_lr_ratio: float | None = None,
) -> optax.GradientTransformation:
    """Wraps `tx` so that it updates only the trainable leaves of `params`.

    Args:
      tx: the optimizer for trainable leaves, e.g. `optax.adamw(1e-4)`; anything chained in
        it (gradient clipping included) sees trainable leaves only.
      params: the tree from `lora_jax.init` (its labels are fixed now).
      loraplus_lr_ratio: LoRA+: B matrices get updates scaled by this ratio (their learning
        rate is ratio × that of A), with their own `tx` state. Exact for optimizers whose
        updates are proportional to the learning rate (SGD, Adam, AdamW, Lion, ...).

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, lora_jax as lj
      >>> params = {"params": {"q": {"kernel": jnp.ones((4, 4)), "kernel_lora_a": jnp.ones((4, 2)),
      ...                            "kernel_lora_b": jnp.zeros((2, 4))}}}
      >>> tx = lj.optimizer(optax.adamw(1e-3), params)
      >>> trainable, _ = lj.partition(params)
      >>> state = tx.init(trainable)  # state for the two adapter leaves only
    """
    if loraplus_lr_ratio is not None and not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio!r}.")
    trainable = trainable_paths(params)
    use_b = loraplus_lr_ratio is not None

    def label(path: tuple[str, ...], _: object) -> str:
        key = "/".join(path)
        if key not in trainable:
            return FROZEN
        return LORA_B if use_b and _is_b(key) else TRAINABLE

    transforms = {TRAINABLE: tx, FROZEN: optax.set_to_zero()}
    if use_b:
        transforms[LORA_B] = optax.chain(tx, optax.scale(loraplus_lr_ratio))
    return optax.multi_transform(transforms, lambda tree: traverse_util.path_aware_map(label, tree))


def _is_b(path: str) -> bool:
    return _paths.is_adapter_leaf(path) and _paths.adapted_param(path)[1] == "b"
