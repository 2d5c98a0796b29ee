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

A non-finite loss or gradient (NaN, inf) skips the update by default: the parameters and the
optimizer state stay as they were and the skip is counted (`optax.apply_if_finite`, read with
`step.skipped(opt_state)`), so one bad batch cannot turn every adapter into NaN.

Given a mesh, the same step compiles to one SPMD program: `jax.jit` with in/out shardings for
the parameters (from explicit specs or logical axis rules, adapters sharded like their kernel,
see `lora_jax.sharding`), the optimizer state (like the parameters it tracks) and the batch.
Data parallel, FSDP and tensor parallel layouts are all just shardings; XLA inserts the
collectives. The same code runs on many hosts (`jax.distributed.initialize` first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax import _paths, _trees
from lora_jax import sharding as sh
from lora_jax.ops.partition import Tree, combine, partition

LossFn = Callable[..., Any]
ApplyFn = Callable[..., Any]
_NEVER = 2**31 - 1  # apply_if_finite's limit of consecutive skips: never apply a bad update


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a mesh step puts things: the mesh, the base's specs, the rules, the batch."""

    mesh: Mesh
    specs: Tree | None  # the base's specs as given (None: from the boxes, or replicated)
    rules: sh.Rules | None
    batch: NamedSharding

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The shardings and jitted functions for one parameter tree structure."""

    params: Tree  # a NamedSharding per leaf, shaped like unbox(params)
    trainable: Tree
    frozen: Tree
    state: Any
    init: Callable
    jitted: Callable


class TrainStep:
    """`step(params, opt_state, batch, rng=None) -> (params, opt_state, loss)`.

    Build it with `make_train_step`. `step.init(params)` makes the optimizer state (over the
    trainable leaves); `step.jitted` is the underlying jitted function of
    (trainable, frozen, opt_state, batch, rngs) over unboxed values, for lowering and
    inspection (with a mesh: the one built by the latest call; `step.lower` works in both
    cases). `step.skipped(opt_state)` counts the updates skipped for a non-finite loss or
    gradient.

    With a mesh, `step(...)` places its inputs where they belong (arrays already placed are
    used as they are, so pass the returned params and state back in) and returns params and
    optimizer state with their declared shardings; `step.shard(params)` places params up front.
    """

    def __init__(
        self,
        apply: ApplyFn,
        loss_fn: LossFn,
        tx: optax.GradientTransformation,
        *,
        has_aux: bool,
        donate: bool,
        skip_nonfinite: bool,
        layout: _Layout | None = None,
        adapters: tuple[str, ...] | None = None,
    ) -> None:
        self.apply, self.loss_fn, self.has_aux = apply, loss_fn, has_aux
        self.adapters = adapters
        self.skip_nonfinite = skip_nonfinite
        self.tx = optax.apply_if_finite(tx, _NEVER) if skip_nonfinite else tx
        self.mesh = None if layout is None else layout.mesh
        self._layout, self._donate = layout, (0, 2) if donate else ()
        self._plans: dict[Any, _Plan] = {}
        self._states: dict[Any, Any] = {}  # abstract optimizer state by trainable structure
        self.jitted = jax.jit(self._step, donate_argnums=self._donate) if layout is None else None

    def init(self, params: Tree) -> optax.OptState:
        """Optimizer state for the trainable leaves of `params` (placed on the mesh, if any)."""
        trainable = _trees.unbox_tree(partition(params, self.adapters)[0])
        if self._layout is None:
            return self.tx.init(trainable)
        plan = self._plan(params)
        return plan.init(sh.shard(trainable, plan.trainable))

    def skipped(self, opt_state: optax.OptState) -> int:
        """How many updates were skipped because the loss or a gradient was not finite
        (0 when the step was built with `skip_nonfinite=False`)."""
        if not self.skip_nonfinite:
            return 0
        if not isinstance(opt_state, optax.ApplyIfFiniteState):
            raise TypeError("skipped() needs the optimizer state of this step (step.init(params)).")
        return int(opt_state.total_notfinite)

    def shard(self, params: Tree) -> Tree:
        """`params` placed on the mesh with their shardings (boxes kept); needs a mesh."""
        return sh.shard(params, self.param_shardings(params))

    def param_shardings(self, params: Tree) -> Tree:
        """A `NamedSharding` per leaf of `unbox(params)`; needs a mesh."""
        return self._plan(params).params

    def state_shardings(self, params: Tree) -> Any:
        """The shardings of the optimizer state that `init(params)` makes; needs a mesh."""
        return self._plan(params).state

    def __call__(
        self, params: Tree, opt_state: optax.OptState, batch: Any, rng: Any = None
    ) -> tuple:
        jitted, args, (trainable, frozen) = self._prepare(params, opt_state, batch, rng)
        new, opt_state, loss = jitted(*args)
        out = (
            combine(_trees.rebox_tree(trainable, new), _trees.rebox_tree(frozen, args[1])),
            opt_state,
        )
        return (*out, *loss) if self.has_aux else (*out, loss)

    def lower(
        self, params: Tree, opt_state: optax.OptState, batch: Any, rng: Any = None
    ) -> jax.stages.Lowered:
        """Lowers the step for these arguments (nothing runs, nothing is donated), e.g.
        ``step.lower(params, opt_state, batch).compile().memory_analysis()``."""
        jitted, args, _ = self._prepare(params, opt_state, batch, rng)
        return jitted.lower(*args)

    def _prepare(self, params: Tree, opt_state: Any, batch: Any, rng: Any) -> tuple:
        trainable, frozen = partition(params, self.adapters)
        values, frozen_values = _trees.unbox_tree(trainable), _trees.unbox_tree(frozen)
        self._check_state(values, opt_state)
        rngs = {"dropout": rng} if rng is not None and not isinstance(rng, Mapping) else rng
        if self._layout is None:
            return self.jitted, (values, frozen_values, opt_state, batch, rngs), (trainable, frozen)
        plan = self._plan(params)
        replicated = self._layout.replicated
        args = (
            sh.shard(values, plan.trainable),
            sh.shard(frozen_values, plan.frozen),
            sh.shard(opt_state, plan.state),
            sh.shard_batch(batch, self._layout.batch),
            None if rngs is None else sh.shard(rngs, jax.tree.map(lambda _: replicated, rngs)),
        )
        self.jitted = plan.jitted
        return plan.jitted, args, (trainable, frozen)

    def _plan(self, params: Tree) -> _Plan:
        if self._layout is None:
            raise ValueError("This train step has no mesh: pass mesh= to make_train_step.")
        values = _trees.unbox_tree(params)
        key = jax.tree.structure(values), tuple(sh.shape_of(v) for v in jax.tree.leaves(values))
        if key not in self._plans:
            self._plans[key] = self._make_plan(params, self._layout)
        return self._plans[key]

    def _make_plan(self, params: Tree, layout: _Layout) -> _Plan:
        shardings = sh.param_shardings(params, layout.mesh, layout.specs, rules=layout.rules)
        _check_axes_used(layout, shardings)
        trainable, frozen = partition(shardings, self.adapters)
        abstract = jax.eval_shape(
            self.tx.init, _trees.unbox_tree(partition(params, self.adapters)[0])
        )
        state = _state_shardings(abstract, trainable, params, layout.replicated)
        value = (layout.replicated, None) if self.has_aux else layout.replicated
        jitted = jax.jit(
            self._step,
            in_shardings=(trainable, frozen, state, layout.batch, layout.replicated),
            out_shardings=(trainable, state, value),
            donate_argnums=self._donate,
        )
        init = jax.jit(self.tx.init, in_shardings=(trainable,), out_shardings=state)
        return _Plan(shardings, trainable, frozen, state, init, jitted)

    def _step(self, trainable: Tree, frozen: Tree, opt_state: Any, batch: Any, rngs: Any) -> tuple:
        def objective(trainable: Tree) -> Any:
            variables = combine(trainable, frozen)
            apply = lambda *a, **kw: self.apply(variables, *a, rngs=rngs, **kw)
            return _checked_loss(self.loss_fn(apply, batch), self.has_aux)

        value, grads = jax.value_and_grad(objective, has_aux=self.has_aux)(trainable)
        if self.skip_nonfinite:  # a non-finite loss marks the gradients, which the guard skips
            loss = value[0] if self.has_aux else value
            grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
        updates, opt_state = self.tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    def _check_state(self, trainable: Tree, opt_state: Any) -> None:
        """Raises unless `opt_state` is this step's state for these trainable leaves: same
        structure, and every leaf of the same shape and dtype (listed by path)."""
        key = jax.tree.structure(trainable), tuple(jnp.shape(v) for v in jax.tree.leaves(trainable))
        if key not in self._states:
            self._states[key] = jax.eval_shape(self.tx.init, trainable)
        expected = self._states[key]
        if jax.tree.structure(opt_state) != jax.tree.structure(expected):
            raise ValueError(
                "opt_state does not match the trainable leaves: build it with step.init(params) "
                "(not tx.init(params) over the whole tree, nor with another optimizer)."
            )
        found = dict(jax.tree_util.tree_leaves_with_path(opt_state))
        problems = []
        for key, want in jax.tree_util.tree_leaves_with_path(expected):
            got = found[key]
            shape, dtype = jnp.shape(got), jnp.result_type(got)
            if (tuple(shape), dtype) != (tuple(want.shape), want.dtype):
                problems.append(
                    f"Leaf '{_paths.keystr(key)}' has shape {tuple(shape)} {dtype} but the "
                    f"trainable leaves need {tuple(want.shape)} {want.dtype}."
                )
        _trees.raise_problems(
            "opt_state does not fit the trainable leaves (another rank or model? build it with "
            "step.init(params), or restore it for these params)",
            problems,
        )


def _checked_loss(out: Any, has_aux: bool) -> Any:
    """`loss_fn`'s output, checked: a scalar loss, or (loss, aux) with `has_aux`."""
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"loss_fn must return (loss, aux) with has_aux=True, got {type(out).__name__}."
            )
        loss = out[0]
    else:
        if isinstance(out, (tuple, list)):
            raise TypeError(
                f"loss_fn returned a {type(out).__name__} of {len(out)}: return a scalar loss, "
                "or pass has_aux=True to make_train_step to return (loss, aux)."
            )
        loss = out
    if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise TypeError(
            f"loss_fn must return a floating scalar loss, got shape {jnp.shape(loss)} "
            f"{jnp.result_type(loss)}."
        )
    return out


def _state_shardings(abstract_state: Any, trainable: Tree, params: Tree, replicated: Any) -> Any:
    """Optimizer-state shardings: a leaf that mirrors a trainable leaf (`_trees.mirrored`) is
    sharded like it; anything else (step counts, factored statistics) is replicated."""
    by_path = _trees.flat(trainable)
    shapes = {
        k: jax.ShapeDtypeStruct(sh.shape_of(v), jnp.float32)
        for k, v in _trees.flat(params).items()
        if k in by_path
    }

    def sharding(path: str, leaf: Any) -> Any:
        match = _trees.mirrored(path, leaf.shape, shapes)
        return by_path[match] if match is not None else replicated

    return _trees.map_with_path(sharding, abstract_state)


def _check_axes_used(layout: _Layout, shardings: Tree) -> None:
    """Raises if a mesh axis of size > 1 shards neither a parameter nor the batch."""
    used = sh.used_axes(shardings) | sh.used_axes(layout.batch)
    idle = [a for a in layout.mesh.axis_names if layout.mesh.shape[a] > 1 and a not in used]
    if idle:
        known = sorted(sh.rule_axes(layout.rules or ()))
        source = (
            f"the rules map logical axes to mesh axes {known} only"
            if layout.rules
            else f"the param shardings use mesh axes {sorted(sh.used_axes(shardings))} only"
        )
        raise ValueError(
            f"Mesh axes {idle} (mesh {dict(layout.mesh.shape)}) shard no parameter and not the "
            f"batch (batch_sharding {layout.batch.spec}; {source}), so every device along "
            "them would repeat the same work. Map a logical axis to them in the rules, shard "
            "the batch over them, or build the mesh without them."
        )


def _as_apply(model: Any) -> ApplyFn:
    """`model.apply` for a module (anything with `.apply`), or `model` if it is a function."""
    apply = getattr(model, "apply", None)
    if callable(apply):
        return apply
    if callable(model):
        return model
    raise TypeError(
        "make_train_step needs a model with an .apply method (a lora_jax.LoRA module) or an "
        f"apply function apply(variables, *inputs, rngs=None, **kw), got {type(model).__name__}."
    )


def make_train_step(
    model: Any,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    donate: bool = True,
    skip_nonfinite: bool = True,
    mesh: Mesh | None = None,
    param_shardings: Tree | None = None,
    rules: sh.Rules | None = None,
    batch_sharding: PartitionSpec | NamedSharding | None = None,
    adapters: Sequence[str] | str | None = None,
) -> TrainStep:
    """Builds a jit-compiled train step that updates only the trainable leaves.

    Args:
      model: what computes with the parameters: a `LoRA` module (anything with an `.apply`
        like a Flax module's), or an apply function
        ``apply(variables, *inputs, rngs=None, **kw)``.
      loss_fn: `loss_fn(apply, batch) -> loss` (or `(loss, aux)` with `has_aux`), where
        `apply(*inputs, **kw)` runs the model on the current parameters (with the step's
        rngs, e.g. dropout). Example:
        `lambda apply, b: causal_lm_loss(apply(b["inputs"]), b["targets"])`.
      tx: an optax optimizer; `lora_jax.optimizer(tx, params)` or a plain one — it only ever
        sees the trainable leaves.
      has_aux: `loss_fn` returns (loss, aux); the step then returns aux last.
      donate: donate the trainable parameters and the optimizer state to the step (their
        buffers are reused; do not read the arrays you passed in afterwards).
      skip_nonfinite: skip the update (parameters and optimizer state unchanged) when the loss
        or a gradient is NaN or inf, and count it (`step.skipped(opt_state)`); the optimizer
        state is then `optax.apply_if_finite`'s.
      mesh: a `jax.sharding.Mesh`: compile one SPMD program over its devices. Without
        `param_shardings` and sharding boxes the parameters are replicated (data parallel).
      param_shardings: the base's shardings: a tree of `PartitionSpec` (or `NamedSharding`)
        shaped like the pretrained params; adapters and the "lora" collection are derived
        (see `lora_jax.partition_specs`). Mesh axis names, or logical axis names with `rules`.
        None: read from the sharding boxes in the params (`nn.with_logical_partitioning`).
      rules: logical axis rules ``((logical_name, mesh_axes), ...)``, e.g.
        ``(("batch", "data"), ("embed", "fsdp"), ("heads", "model"), ("mlp", "model"))``.
      batch_sharding: a mesh-axis `PartitionSpec` applied to every batch leaf; default: the
        leading axis where the rules map "batch", else over the mesh axis "data". NumPy
        leaves hold this process's rows (on many hosts), `jax.Array`s the whole batch.
      adapters: the names of the adapters to train when the tree holds several; the others
        stay frozen, bit for bit. Default: a `LoRA` model's `active` adapters when it sets
        them (an inactive adapter gets no gradient, and weight decay would still shrink it),
        else every adapter.

    Returns:
      A `TrainStep`: `params, opt_state, loss = step(params, opt_state, batch, rng=None)`;
      `rng` (a key, or a dict of keys by rng name) enables dropout.

    Raises:
      ValueError: sharding options without a mesh, rules naming axes the mesh lacks; at the
        first call: a mesh axis that shards nothing, a dimension that does not divide evenly,
        an optimizer state that does not fit the trainable leaves (leaves listed).
      TypeError: at the first call: `loss_fn` returns something other than a scalar loss (or
        (loss, aux) with `has_aux`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
      >>> from lora_jax.models import Llama, LlamaConfig, causal_lm_loss
      >>> model = Llama(LlamaConfig.tiny())
      >>> x = jnp.zeros((2, 9), jnp.int32)
      >>> lora_model = lj.LoRA(model, lj.LoraConfig(targets=("q_proj", "v_proj")))
      >>> params = lj.init(lora_model, jax.random.key(0), x,
      ...                  base_params=model.init(jax.random.key(1), x))
      >>> loss_fn = lambda apply, b: causal_lm_loss(apply(b[:, :-1]), b[:, 1:])
      >>> step = lj.make_train_step(lora_model, loss_fn, optax.adamw(1e-3))
      >>> opt_state = step.init(params)
      >>> params, opt_state, loss = step(params, opt_state, x)
      >>> step.skipped(opt_state)
      0
    """
    apply = _as_apply(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    layout = None
    if mesh is None:
        given = [
            n
            for n, v in (
                ("param_shardings", param_shardings),
                ("rules", rules),
                ("batch_sharding", batch_sharding),
            )
            if v is not None
        ]
        if given:
            raise ValueError(f"make_train_step got {', '.join(given)} but no mesh: pass mesh=.")
    else:
        mesh = sh.auto_mesh(mesh)
        if rules is not None:
            sh.check_rules(rules, mesh)
        batch = sh.batch_sharding(mesh, batch_sharding, rules=rules)
        layout = _Layout(mesh, param_shardings, None if rules is None else tuple(rules), batch)
    if adapters is None:
        adapters = getattr(model, "active", None)
    if adapters is not None:
        adapters = (adapters,) if isinstance(adapters, str) else tuple(adapters)
    return TrainStep(
        apply,
        loss_fn,
        tx,
        has_aux=has_aux,
        donate=donate,
        skip_nonfinite=skip_nonfinite,
        layout=layout,
        adapters=adapters,
    )
