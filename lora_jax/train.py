"""A jit-compiled train step that differentiates the trainable leaves only.

Three traps that a whole-tree train step falls into (benchmarks/train_step_traps.py measures
them; figures in the README):
- A gradient of the whole tree compiles to the same FLOPs as one of the trainable half only
  while nothing reads the frozen gradients; a global-norm clip over the whole tree reads them
  all and costs more than full fine-tuning. Here the gradient exists only for trainable
  leaves, so every transform in `tx` (clipping included) sees only them.
- `optax.masked` passes frozen leaves' raw gradients through, so they move. Here frozen
  leaves never enter the optimizer, and `lora_jax.optimizer` gives them `set_to_zero`.
- Without buffer donation, `apply_updates` over the whole tree writes a new copy of every
  frozen weight each step. Here the jitted step updates only the trainable half and donates
  it and the optimizer state; frozen leaves are inputs only and are returned as the same
  arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from lora_jax.tree import Tree, combine, partition
from lora_jax.wrapper import LoRA

LossFn = Callable[..., Any]


class TrainStep:
    """`step(params, opt_state, batch, rng=None) -> (params, opt_state, loss)`.

    Build it with `make_train_step`. `step.init(params)` makes the optimizer state (over the
    trainable leaves); `step.jitted` is the underlying jitted function of
    (trainable, frozen, opt_state, batch, rngs), for lowering and inspection.
    """

    def __init__(self, lora_model: LoRA, loss_fn: LossFn, tx, *, has_aux: bool, donate: bool):
        self.lora_model, self.loss_fn, self.tx, self.has_aux = lora_model, loss_fn, tx, has_aux
        self._state_def = None
        self.jitted = jax.jit(self._step, donate_argnums=(0, 2) if donate else ())

    def init(self, params: Tree) -> optax.OptState:
        """Optimizer state for the trainable leaves of `params`."""
        return self.tx.init(partition(params)[0])

    def __call__(self, params: Tree, opt_state, batch, rng=None):
        trainable, frozen = partition(params)
        self._check_state(trainable, opt_state)
        rngs = {"dropout": rng} if rng is not None and not isinstance(rng, Mapping) else rng
        trainable, opt_state, loss = self.jitted(trainable, frozen, opt_state, batch, rngs)
        out = combine(trainable, frozen), opt_state
        return (*out, *loss) if self.has_aux else (*out, loss)

    def _step(self, trainable, frozen, opt_state, batch, rngs):
        def objective(trainable):
            variables = combine(trainable, frozen)
            apply = lambda *a, **kw: self.lora_model.apply(variables, *a, rngs=rngs, **kw)
            return self.loss_fn(apply, batch)

        value, grads = jax.value_and_grad(objective, has_aux=self.has_aux)(trainable)
        updates, opt_state = self.tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    def _check_state(self, trainable, opt_state) -> None:
        if self._state_def is None:
            self._state_def = jax.tree.structure(jax.eval_shape(self.tx.init, trainable))
        if jax.tree.structure(opt_state) != self._state_def:
            raise ValueError(
                "opt_state does not match the trainable leaves: build it with step.init(params) "
                "(or tx.init(lora_jax.partition(params)[0])), not tx.init(params) over the whole "
                "tree."
            )


def make_train_step(
    lora_model: LoRA,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> TrainStep:
    """Builds a jit-compiled train step that updates only the trainable leaves.

    Args:
      lora_model: the `LoRA` module.
      loss_fn: `loss_fn(apply, batch) -> loss` (or `(loss, aux)` with `has_aux`), where
        `apply(*inputs, **kw)` runs the LoRA model on the current parameters (with the
        step's rngs, e.g. dropout). Example:
        `lambda apply, b: causal_lm_loss(apply(b["inputs"]), b["targets"])`.
      tx: an optax optimizer; `lora_jax.optimizer(tx, params)` or a plain one — it only ever
        sees the trainable leaves.
      has_aux: `loss_fn` returns (loss, aux); the step then returns aux last.
      donate: donate the trainable parameters and the optimizer state to the step (their
        buffers are reused; do not read the arrays you passed in afterwards).

    Returns:
      A `TrainStep`: `params, opt_state, loss = step(params, opt_state, batch, rng=None)`;
      `rng` (a key, or a dict of keys by rng name) enables dropout.
    """
    if not isinstance(lora_model, LoRA):
        raise TypeError(
            f"make_train_step needs a lora_jax.LoRA module, got {type(lora_model).__name__}."
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    return TrainStep(lora_model, loss_fn, tx, has_aux=has_aux, donate=donate)
