"""The key/value cache of the reference `Llama`, kept in the Flax "cache" variable collection.

A prefill call (`cache_size=N`) makes the collection and writes the prompt into its first
slots; decode calls (`decode=True`) append tokens after the last one written. All sequences
of a batch share the slot index: left-pad prompts of different lengths, so that their last
tokens share a slot. The collection holds, at the model's root,

- `index`: int32 scalar, the next free slot;
- `keep`: bool (batch, cache_size), True at the slots that hold a real (not padding) token;
- `position`: int32 (batch,), the position the next token of each sequence gets;

and in each attention layer `key` / `value`: (batch, cache_size, num_kv_heads, head_dim) in
the model's compute dtype, keys with RoPE applied.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

CACHE = "cache"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class Slots(NamedTuple):
    """Where a cached call's tokens go in every layer's cache.

    Attributes:
      index: the slot of the call's first token, an int32 scalar shared by the batch.
      keep: booleans (batch, cache_size), True at the slots that hold a real token, the
        call's own tokens included.
    """

    index: Array
    keep: Array


def advance(
    module: nn.Module,
    shape: tuple[int, int],
    positions: Array | None,
    keep: Array | None,
    *,
    cache_size: int | None,
    decode: bool,
    max_seq_len: int,
) -> tuple[Slots, Array]:
    """Starts (prefill) or continues (decode) the cache of `module`, the model's root, by one
    call's tokens, and updates its bookkeeping.

    Args:
      module: the bound root module whose "cache" collection holds `index`, `keep`, `position`.
      shape: the call's (batch, seq).
      positions: the tokens' positions, (batch, seq) or (seq,), or None: 0 .. seq-1 in a
        prefill, the cache's next position onwards in a decode call.
      keep: None, or booleans (batch, seq), False at padding.
      cache_size: the number of slots of a new cache (prefill), or None (decode).
      decode: continue the cache that the variables hold.
      max_seq_len: the most slots a cache may have.

    Returns:
      Where the tokens go, and their positions (batch, seq) as int32.

    Raises:
      ValueError: the collection is not mutable, or missing (decode), or present (prefill);
        cache_size, the batch or the positions do not fit; the cache is full.
    """
    b, s = shape
    _check(
        module.is_mutable_collection(CACHE),
        "Llama: a call with cache_size or decode=True writes the 'cache' collection: apply "
        'with mutable=["cache"].',
    )
    if decode:
        index, slots, position = _resume(module, b, s, cache_size)
        default = position.value[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    else:
        index, slots, position = _start(module, b, s, cache_size, max_seq_len)
        default = jnp.arange(s, dtype=jnp.int32)
    positions = default if positions is None else jnp.asarray(positions)
    _check(
        positions.shape in ((s,), (b, s)),
        f"Llama: positions must be ({s},) or ({b}, {s}), got shape {positions.shape}.",
    )
    positions = jnp.broadcast_to(positions, (b, s)).astype(jnp.int32)
    new_keep = jnp.ones((b, s), bool) if keep is None else keep
    start = index.value
    slots.value = jax.lax.dynamic_update_slice(slots.value, new_keep, (0, start))
    index.value = start + s
    position.value = positions[:, -1] + 1
    return Slots(start, slots.value), positions


def _start(
    module: nn.Module, b: int, s: int, cache_size: int | None, max_seq_len: int
) -> tuple[nn.Variable, nn.Variable, nn.Variable]:
    ok = isinstance(cache_size, int) and not isinstance(cache_size, bool)
    _check(
        ok and s <= cache_size <= max_seq_len,
        f"Llama: cache_size must be an int from seq ({s}) to max_seq_len ({max_seq_len}), "
        f"got {cache_size!r}.",
    )
    _check(
        not module.has_variable(CACHE, "index"),
        "Llama(cache_size=...) starts a new cache but the variables already hold 'cache': pass "
        "the variables without it (or continue with decode=True).",
    )
    return (
        module.variable(CACHE, "index", jnp.zeros, (), jnp.int32),
        module.variable(CACHE, "keep", jnp.zeros, (b, cache_size), bool),
        module.variable(CACHE, "position", jnp.zeros, (b,), jnp.int32),
    )


def _resume(
    module: nn.Module, b: int, s: int, cache_size: int | None
) -> tuple[nn.Variable, nn.Variable, nn.Variable]:
    _check(
        cache_size is None,
        "Llama: give cache_size (prefill: start a cache) or decode=True (append to one), not "
        f"both; got cache_size={cache_size!r}.",
    )
    _check(
        module.has_variable(CACHE, "index"),
        "Llama(decode=True) found no 'cache' in the variables: prefill first with "
        'cache_size=... and mutable=["cache"], then pass the returned cache back in.',
    )
    index, slots, position = (module.variable(CACHE, n) for n in ("index", "keep", "position"))
    held, size = slots.value.shape
    _check(
        held == b,
        f"Llama(decode=True): the cache holds {held} sequences but input_ids has batch {b}.",
    )
    if not isinstance(index.value, jax.core.Tracer):  # under jit the caller sizes the cache
        used = int(index.value)
        _check(
            used + s <= size,
            f"Llama(decode=True): the cache has {size} slots, {used} in use; no room for {s} "
            "more tokens. Prefill with a larger cache_size.",
        )
    return index, slots, position


def write(
    module: nn.Module, key: Array, value: Array, slots: Slots, dtype: jnp.dtype
) -> tuple[Array, Array]:
    """Writes one layer's new keys and values (batch, seq, kv_heads, head_dim) at
    `slots.index` of its "cache" `key` / `value` (made on the prefill call).

    Returns:
      The whole key and value caches, (batch, cache_size, kv_heads, head_dim).
    """
    shape = (key.shape[0], slots.keep.shape[1], *key.shape[2:])
    out = []
    for name, new in (("key", key), ("value", value)):
        var = module.variable(CACHE, name, jnp.zeros, shape, dtype)
        found = jnp.shape(var.value)
        path = "/".join(str(p) for p in module.scope.path)
        _check(
            found == shape,
            f"Llama: the cache '{path}/{name}' has shape {found} but this call needs {shape} "
            "(batch, cache_size, num_kv_heads, head_dim): the cache comes from another model "
            "or batch; prefill again with cache_size=...",
        )
        start = (0, slots.index, 0, 0)
        var.value = jax.lax.dynamic_update_slice(var.value, new.astype(dtype), start)
        out.append(var.value)
    return out[0], out[1]


def mask(slots: Slots, seq: int, window: int | None) -> Array:
    """The attention mask of a cached call, (batch, 1, seq, cache_size): the query in slot
    index + i sees the real tokens in the slots j <= index + i, and with a sliding window only
    those with j > index + i - window."""
    query = slots.index + jnp.arange(seq)[:, None]
    key = jnp.arange(slots.keep.shape[1])[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return allowed[None, None, :, :] & slots.keep[:, None, None, :]
