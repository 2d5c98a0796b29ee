"""Text generation with the reference `Llama` and its key/value cache, the whole loop under jit.

`generate` left-pads a batch of token-id prompts, prefills the cache in one call, then decodes
one token per step in a `lax.while_loop` that ends when every sequence has met a stop token or
`max_new_tokens` is reached. It takes a `Llama`, a `lora_jax.LoRA` wrapping one (adapters
active), or a `Llama` with merged parameters; token ids in, token ids out (no tokenizer here:
a chat caller encodes its template with its tokenizer and decodes `Generation.tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.llama import Llama, LlamaConfig

Array = jax.Array

MIN_BUCKET = 16  # prompts are left-padded to a power of two of at least this many tokens


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` made, per prompt, in the prompts' order.

    Attributes:
      tokens: the new token ids of each prompt, without padding and without the stop token
        that ended it.
      stop_token: the stop token that ended each sequence, or None where it ran to
        `max_new_tokens`.
    """

    tokens: tuple[tuple[int, ...], ...]
    stop_token: tuple[int | None, ...]


def generate(
    model: nn.Module,
    variables: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    rng: Array | None = None,
    adapter_ids: Sequence[int] | None = None,
) -> Generation:
    """Continues each prompt by up to `max_new_tokens` tokens.

    The prompts are left-padded to a common bucket (the next power of two of the longest, at
    least 16, within `max_seq_len`), with an attention mask and positions that give each
    prompt's first token position 0, so the result does not depend on the other prompts. The
    loop is one jitted function, compiled once per model, tree structure, batch size, bucket,
    `max_new_tokens`, number of stop tokens and greedy-or-sampling; temperature, top_p, the
    stop tokens' values and the rng are traced.

    Args:
      model: a `Llama`, or a `lora_jax.LoRA` wrapping one.
      variables: the variables that `model.apply` takes: `{"params": ...}` (and, for a LoRA
        model, the "lora" collection: the whole tree that `lora_jax.init` returns). A
        "cache" collection in it is ignored.
      prompts: token ids, one non-empty sequence per prompt (lengths may differ), each id in
        [0, vocab_size).
      max_new_tokens: the most tokens to generate per prompt, stop token included.
      temperature: 0 picks the most likely token (greedy); above 0 samples from the softmax of
        logits / temperature.
      top_p: nucleus sampling (with temperature > 0): sample among the most likely tokens
        whose probabilities, in decreasing order, sum to at least top_p (always the first);
        1.0 keeps every token. Transformers' `TopPLogitsWarper`, after the temperature.
      stop_tokens: ids that end a sequence (e.g. the tokenizer's eos and end-of-turn ids).
      pad_id: the id fed at padding (masked, so any valid id works).
      rng: a `jax.random` key; required when temperature > 0. Step i draws with
        `jax.random.fold_in(rng, i)`, so a fixed key reproduces the result.
      adapter_ids: with a `lora_jax.LoRA` model of several named adapters, the adapter of
        each prompt (an index into `LoRA.active`; -1: the base model), one per prompt: a
        batch for different tenants in one call.

    Returns:
      A `Generation`: the new tokens of each prompt (stop token excluded) and which stop
      token ended it.

    Example:
      >>> import jax
      >>> from lora_jax.models import Llama, LlamaConfig, generate
      >>> model = Llama(LlamaConfig.tiny())
      >>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 8), int))
      >>> out = generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=5)
      >>> [len(t) for t in out.tokens], out.stop_token
      ([5, 5], (None, None))
    """
    cfg = _llama_config(model)
    _check_options(max_new_tokens, temperature, top_p, rng)
    vocab = cfg.vocab_size
    stops = tuple(_token(t, vocab, "stop_tokens") for t in stop_tokens)
    pad_id = _token(pad_id, vocab, "pad_id")
    rows = _prompts(prompts, vocab)
    longest = max(len(r) for r in rows)
    room = cfg.max_seq_len - max_new_tokens + 1  # the last new token is never fed back
    if longest > room:
        raise ValueError(
            f"generate: the longest prompt ({longest} tokens) plus max_new_tokens "
            f"({max_new_tokens}) - 1 exceeds the model's max_seq_len ({cfg.max_seq_len})."
        )
    bucket = min(max(MIN_BUCKET, 1 << (longest - 1).bit_length()), room)
    ids = np.full((len(rows), bucket), pad_id, np.int32)
    mask = np.zeros((len(rows), bucket), np.int32)
    for i, r in enumerate(rows):
        ids[i, bucket - len(r) :], mask[i, bucket - len(r) :] = r, 1
    variables = {k: v for k, v in dict(variables).items() if k != "cache"}
    if adapter_ids is not None:
        if not hasattr(model, "active_names"):
            raise ValueError(
                f"generate: adapter_ids need a lora_jax.LoRA model, got {type(model).__name__}."
            )
        adapter_ids = np.asarray(adapter_ids)
        n = len(model.active_names)
        if adapter_ids.shape != (len(rows),) or not np.issubdtype(adapter_ids.dtype, np.integer):
            raise ValueError(
                f"generate: adapter_ids must be integers, one per prompt ({len(rows)}), got "
                f"{adapter_ids.dtype} of shape {adapter_ids.shape}."
            )
        bad = sorted({int(i) for i in adapter_ids if not -1 <= i < n})
        if bad:
            raise ValueError(
                f"generate: adapter_ids {bad} are out of range: each id indexes LoRA.active "
                f"{list(model.active_names)} (0..{n - 1}), or is -1 for no adapter."
            )
    greedy = temperature == 0
    out, length, stopped = _decode(
        model,
        variables,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.asarray(stops, jnp.int32).reshape(len(stops)),
        jnp.float32(temperature),
        jnp.float32(top_p),
        None if greedy else rng,
        jnp.int32(pad_id),
        None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )
    out, length, stopped = np.asarray(out), np.asarray(length), np.asarray(stopped)
    tokens = tuple(tuple(int(t) for t in row[:n]) for row, n in zip(out, length, strict=True))
    stop_token = tuple(
        int(row[n]) if s else None for row, n, s in zip(out, length, stopped, strict=True)
    )
    return Generation(tokens, stop_token)


def _llama_config(model: nn.Module) -> LlamaConfig:
    llama = model if isinstance(model, Llama) else getattr(model, "model", None)
    if not isinstance(llama, Llama):
        raise TypeError(
            "generate: model must be a lora_jax.models.Llama or a lora_jax.LoRA wrapping one, "
            f"got {type(model).__name__}."
        )
    return llama.cfg


def _check_options(
    max_new_tokens: int, temperature: float, top_p: float, rng: Array | None
) -> None:
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(
            f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}."
        )
    if not is_num(temperature) or not temperature >= 0:
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}.")
    if not is_num(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}.")
    if temperature > 0 and rng is None:
        raise ValueError(
            f"generate: sampling (temperature={temperature}) needs rng, a jax.random key "
            "(e.g. jax.random.key(0)); temperature=0 decodes greedily without one."
        )


def _token(t: Any, vocab: int, what: str) -> int:
    if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < vocab:
        raise ValueError(f"generate: {what} must hold token ids in [0, {vocab}), got {t!r}.")
    return int(t)


def _prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise TypeError(
            "generate: prompts must be a sequence of token-id sequences (one per prompt), got "
            f"{type(prompts).__name__}."
        )
    if len(prompts) == 0:
        raise ValueError("generate: prompts is empty; give at least one prompt.")
    rows = []
    for i, p in enumerate(prompts):
        row = np.asarray(p)
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"generate: prompts[{i}] must be a non-empty sequence of int token ids, got {p!r}."
            )
        bad = row[(row < 0) | (row >= vocab)]
        if bad.size:
            raise ValueError(
                f"generate: prompts[{i}] holds ids outside [0, {vocab}): {bad[:5].tolist()}."
            )
        rows.append(row.astype(np.int32))
    return rows


def _pick(logits: Array, greedy: bool, temperature: Array, top_p: Array, key: Array) -> Array:
    """The next token of each row of logits (batch, vocab): argmax, or a top-p sample."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    order = jnp.argsort(-logits, axis=-1)  # most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    ranked = jnp.where((before < top_p) | (top_p >= 1.0), ranked, -jnp.inf)
    choice = jax.random.categorical(key, ranked, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _decode(
    model: nn.Module,
    variables: dict,
    ids: Array,
    mask: Array,
    stops: Array,
    temperature: Array,
    top_p: Array,
    rng: Array | None,
    pad_id: Array,
    adapter_ids: Array | None,
    *,
    max_new_tokens: int,
    greedy: bool,
) -> tuple[Array, Array, Array]:
    """Prefill, then a while loop of one-token decode steps.

    Returns:
      The new tokens (batch, max_new_tokens), padded with pad_id after a stop token; the
      number of tokens before the stop token (or max_new_tokens); whether a stop token came.
    """
    b, length = ids.shape
    tenants = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, state = model.apply(
        variables,
        ids,
        positions,
        mask,
        cache_size=length + max_new_tokens - 1,
        last_logits_only=True,
        mutable=["cache"],
        **tenants,
    )
    key = lambda step: None if greedy else jax.random.fold_in(rng, step)
    pick = lambda logits, step: _pick(logits, greedy, temperature, top_p, key(step))
    token = pick(logits[:, -1], 0)
    done = jnp.isin(token, stops)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    length = jnp.where(done, 0, max_new_tokens)

    def more(carry: tuple) -> Array:
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry: tuple) -> tuple:
        step, state, token, done, out, length = carry
        logits, state = model.apply(
            {**variables, **state}, token[:, None], decode=True, mutable=["cache"], **tenants
        )
        token = jnp.where(done, pad_id, pick(logits[:, 0], step))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        stop = ~done & jnp.isin(token, stops)
        return step + 1, state, token, done | stop, out, jnp.where(stop, step, length)

    carry = (jnp.int32(1), state, token, done, out, length)
    _, _, _, done, out, length = jax.lax.while_loop(more, step_fn, carry)
    return out, length, done
