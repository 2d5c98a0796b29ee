"""A compact Llama-style decoder in flax.linen: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Plain Flax that knows nothing of LoRA. Module names follow Hugging Face Llama, so parameter paths
read `layers_0/self_attn/q_proj/kernel` and LoRA targets read like PEFT's. Kernels are (in, out).
The config covers what sets the Llama family apart (Llama 2/3.x, Mistral, Qwen2, Qwen3): biases
(`qkv_bias`, `o_bias`, `mlp_bias`), per-head q/k norms (`qk_norm`), Llama 3.1 RoPE scaling
(`rope_scaling`), sliding-window attention (`sliding_window`), a free `head_dim` and tied
embeddings. Gemma is not covered (its norms, embedding scale and activation differ).

Cached decoding, the Flax way: a call with `cache_size=N` (prefill) makes a "cache" collection
and fills it from the prompt; calls with `decode=True` append tokens to it. Apply with
`mutable=["cache"]` and pass the returned cache back in (its layout: `lora_jax.models.kv_cache`):

    logits, state = model.apply(params, prompt, cache_size=64, mutable=["cache"])
    logits, state = model.apply({**params, **state}, next_ids, decode=True, mutable=["cache"])

`lora_jax.models.generate` runs the whole loop under `jax.jit`.

Options for scaling out (all off by default, so the parameter tree stays plain):
- `logical_axes`: every parameter carries Flax logical axis names (`nn.LogicallyPartitioned`):
  "vocab", "embed", "heads" (query heads × head_dim), "kv_heads", "mlp", "norm", and "layers"
  for the stacked axis of `scan_layers`. Map them to mesh axes with logical rules, e.g.
  `(("batch", "data"), ("embed", "fsdp"), ("heads", "model"), ("kv_heads", "model"),
  ("mlp", "model"), ("vocab", "model"))`.
- `scan_layers`: the blocks run under `nn.scan`; their parameters sit at `layers/...` with a
  leading axis of size `num_layers` instead of at `layers_0/...`, `layers_1/...`, and so do
  the cached keys and values. Variable collections other than "params" and "cache" are
  broadcast across the layers (shared, not stacked).
  `stack_layers` / `unstack_layers` convert between the two layouts.
- `remat`: each block is rematerialized (`nn.remat`) in the backward pass: wholly (`True`), or
  selectively with a `jax.checkpoint_policies` policy named in `REMAT_POLICIES` (not in
  cached calls, which are for inference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.core import DenyList, meta

from lora_jax.models import kv_cache
from lora_jax.models.kv_cache import Slots
from lora_jax.models.rope import RopeScaling, rope, rope_frequencies

Array = jax.Array


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# The `jax.checkpoint_policies` that take no arguments, by name: what `LlamaConfig.remat` accepts
# besides a bool.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and dtypes of `Llama`, validated on construction.

    The presets `tiny`, `small`, `llama_1b`, `llama_3b`, `llama3_8b` and `llama3_70b` take
    keyword overrides, applied before validation, so a derived `head_dim` follows an overridden
    `hidden_size` (whereas `dataclasses.replace` on a config keeps its resolved `head_dim`).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers: vocabulary and layer sizes.
      num_heads, num_kv_heads: query and key/value heads (GQA); num_kv_heads divides num_heads.
      head_dim: width of one head; None means hidden_size // num_heads.
      rope_theta, rms_norm_eps: the RoPE frequency base and the RMSNorm epsilon.
      tie_embeddings: compute the logits with the embedding matrix (no `lm_head`).
      max_seq_len: the longest sequence the model accepts.
      dtype, param_dtype: the compute dtype and the parameters' storage dtype.
      logical_axes: annotate the parameters with logical axis names (see the module docstring).
      scan_layers: run the blocks with `nn.scan`, parameters stacked on a leading layer axis.
      remat: rematerialize each block's activations in the backward pass (`nn.remat`):
        False; True (keep only each block's input, recompute the rest); or the name of a
        `jax.checkpoint_policies` policy for selective rematerialization, one of
        `REMAT_POLICIES`, e.g. "dots_with_no_batch_dims_saveable" (keep the outputs of the
        linear layers, recompute attention and the elementwise work).
      attention: `jax.nn.dot_product_attention`'s implementation: None (JAX's choice, the
        XLA path), "xla" or "cudnn" (fused flash attention on NVIDIA GPUs, bf16/fp16; needed
        for long sequences, where the XLA path keeps the full score matrix for the backward).
        Cached calls (`cache_size` / `decode`) always take the XLA path.
      qkv_bias: q_proj, k_proj and v_proj have a `bias` (Qwen2; Hugging Face Llama's
        `attention_bias` sets this and `o_bias`).
      o_bias: o_proj has a `bias`.
      mlp_bias: gate_proj, up_proj and down_proj have a `bias` (Hugging Face Llama's `mlp_bias`).
      qk_norm: Qwen3's per-head RMSNorm of the queries and keys over head_dim, before RoPE:
        modules `self_attn/q_norm` and `self_attn/k_norm` with a `scale` (head_dim,), epsilon
        `rms_norm_eps`.
      rope_scaling: None, or Llama 3.1's "llama3" frequency scaling (a `RopeScaling`).
      sliding_window: None, or Mistral's sliding-window attention in every layer: the query at
        index i sees the keys at indices j with i - sliding_window < j <= i (the window holds
        `sliding_window` tokens, the query's own included), as transformers masks it. Qwen2/3
        put the window on the layers from `max_window_layers` on only when
        `use_sliding_window` is set; this config takes the case where it covers every layer.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    logical_axes: bool = False
    scan_layers: bool = False
    remat: bool | str = False
    attention: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        number = lambda v, t: isinstance(v, t) and not isinstance(v, bool) and v > 0
        sizes = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ]
        sizes += [n for n in ("head_dim", "sliding_window") if getattr(self, n) is not None]
        for name in sizes:
            v = getattr(self, name)
            _check(number(v, int), f"LlamaConfig.{name} must be a positive int, got {v!r}.")
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "LlamaConfig.num_kv_heads must divide "
            f"num_heads ({self.num_heads}), got {self.num_kv_heads}.",
        )
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_heads == 0,
                "LlamaConfig.hidden_size "
                f"({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is given.",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _check(self.head_dim % 2 == 0, f"LlamaConfig.head_dim must be even, got {self.head_dim}.")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            _check(
                number(v, (int, float)), f"LlamaConfig.{name} must be a positive number, got {v!r}."
            )
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            try:
                ok = v is not None and jnp.issubdtype(jnp.dtype(v), jnp.floating)
            except TypeError:
                ok = False
            _check(ok, f"LlamaConfig.{name} must be a floating dtype, got {v!r}.")
            object.__setattr__(self, name, jnp.dtype(v))
        for name in ("logical_axes", "scan_layers", "qkv_bias", "o_bias", "mlp_bias", "qk_norm"):
            v = getattr(self, name)
            _check(isinstance(v, bool), f"LlamaConfig.{name} must be a bool, got {v!r}.")
        _check(
            isinstance(self.remat, bool) or self.remat in REMAT_POLICIES,
            "LlamaConfig.remat must be a bool or the name of a jax.checkpoint_policies policy "
            f"({', '.join(REMAT_POLICIES)}), got {self.remat!r}.",
        )
        _check(
            self.attention in (None, "xla", "cudnn"),
            f"LlamaConfig.attention must be None, 'xla' or 'cudnn', got {self.attention!r}.",
        )
        hint = (
            " Build it with lora_jax.models.RopeScaling(**that_dict) (Hugging Face's "
            "'rope_type' key left out)."
            if isinstance(self.rope_scaling, dict)
            else ""
        )
        _check(
            self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
            "LlamaConfig.rope_scaling must be None or a RopeScaling, got "
            f"{self.rope_scaling!r}.{hint}",
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """About 0.13M parameters: unit tests."""
        return cls(
            **{
                **dict(
                    vocab_size=256,
                    hidden_size=64,
                    intermediate_size=128,
                    num_layers=2,
                    num_heads=4,
                    num_kv_heads=2,
                    max_seq_len=128,
                ),
                **overrides,
            }
        )

    @classmethod
    def small(cls, **overrides: Any) -> LlamaConfig:
        """About 3.2M parameters (vocab 512): trains in minutes on a 2-core CPU."""
        return cls(
            **{
                **dict(
                    vocab_size=512,
                    hidden_size=256,
                    intermediate_size=704,
                    num_layers=4,
                    num_heads=8,
                    num_kv_heads=4,
                    max_seq_len=256,
                ),
                **overrides,
            }
        )

    @classmethod
    def llama_1b(cls, **overrides: Any) -> LlamaConfig:
        """Llama-3.2-1B shapes (1,235,814,400 parameters), bfloat16."""
        return cls(
            **{
                **dict(
                    vocab_size=128256,
                    hidden_size=2048,
                    intermediate_size=8192,
                    num_layers=16,
                    num_heads=32,
                    num_kv_heads=8,
                    head_dim=64,
                    rope_theta=500000.0,
                    tie_embeddings=True,
                    max_seq_len=8192,
                    dtype=jnp.bfloat16,
                    param_dtype=jnp.bfloat16,
                ),
                **overrides,
            }
        )

    @classmethod
    def llama_3b(cls, **overrides: Any) -> LlamaConfig:
        """Llama-3.2-3B shapes (3,212,749,824 parameters), bfloat16."""
        return cls(
            **{
                **dict(
                    vocab_size=128256,
                    hidden_size=3072,
                    intermediate_size=8192,
                    num_layers=28,
                    num_heads=24,
                    num_kv_heads=8,
                    head_dim=128,
                    rope_theta=500000.0,
                    tie_embeddings=True,
                    max_seq_len=8192,
                    dtype=jnp.bfloat16,
                    param_dtype=jnp.bfloat16,
                ),
                **overrides,
            }
        )

    @classmethod
    def llama3_8b(cls, **overrides: Any) -> LlamaConfig:
        """Llama-3-8B shapes (8,030,261,248 parameters), bfloat16."""
        return cls(
            **{
                **dict(
                    vocab_size=128256,
                    hidden_size=4096,
                    intermediate_size=14336,
                    num_layers=32,
                    num_heads=32,
                    num_kv_heads=8,
                    rope_theta=500000.0,
                    tie_embeddings=False,
                    max_seq_len=8192,
                    dtype=jnp.bfloat16,
                    param_dtype=jnp.bfloat16,
                ),
                **overrides,
            }
        )

    @classmethod
    def llama3_70b(cls, **overrides: Any) -> LlamaConfig:
        """Llama-3-70B shapes (70,553,706,496 parameters), bfloat16."""
        return cls(
            **{
                **dict(
                    vocab_size=128256,
                    hidden_size=8192,
                    intermediate_size=28672,
                    num_layers=80,
                    num_heads=64,
                    num_kv_heads=8,
                    rope_theta=500000.0,
                    tie_embeddings=False,
                    max_seq_len=8192,
                    dtype=jnp.bfloat16,
                    param_dtype=jnp.bfloat16,
                ),
                **overrides,
            }
        )

    def num_params(self) -> int:
        """Returns the exact number of parameters of `Llama(self)`."""
        h, d, m = self.hidden_size, self.head_dim, self.intermediate_size
        attention = 2 * h * d * (self.num_heads + self.num_kv_heads)
        attention += self.qkv_bias * d * (self.num_heads + 2 * self.num_kv_heads)
        attention += self.o_bias * h + self.qk_norm * 2 * d
        mlp = 3 * h * m + self.mlp_bias * (2 * m + h)
        block = attention + mlp + 2 * h
        head = 0 if self.tie_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * block + h + head


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a learned `scale`, computed in float32."""

    eps: float = 1e-5
    dtype: Any = jnp.float32  # of the output
    param_dtype: Any = jnp.float32
    logical_axes: bool = False  # annotate `scale` with the logical axis name "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes x (..., features); returns the same shape in `dtype`."""
        init = _annotated(self.logical_axes, nn.initializers.ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * jnp.broadcast_to(scale.astype(jnp.float32), x.shape)).astype(self.dtype)


def _annotated(
    logical_axes: bool, init: Callable[..., Any], names: tuple[str, ...]
) -> Callable[..., Any]:
    """`init`, boxed with logical axis names when `logical_axes` is on."""
    return nn.with_logical_partitioning(init, names) if logical_axes else init


def _dense(
    cfg: LlamaConfig, features: int, name: str, axes: tuple[str, str], bias: bool = False
) -> nn.Dense:
    init = _annotated(cfg.logical_axes, nn.initializers.normal(0.02), axes)
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=init,
        bias_init=_annotated(cfg.logical_axes, nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, cfg.logical_axes, name=name)


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE; softmax in float32."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, keep: Array | None, slots: Slots | None = None
    ) -> Array:
        """Attends each token to itself and the earlier tokens that `keep` allows.

        Args:
          x: hidden states, (batch, seq, hidden_size).
          positions: integer positions, (batch, seq).
          keep: None, or booleans (batch, seq), False at padding (hidden as a key).
          slots: None (no cache), or where the tokens go in this layer's cache (variables
            "cache"/key and "cache"/value, made on the first cached call); `keep` is then
            ignored in favour of `slots.keep`.

        Returns:
          (batch, seq, hidden_size) in `cfg.dtype`.
        """
        cfg = self.cfg
        b, s, _ = x.shape
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        def heads(name: str, n: int, axis: str) -> Array:
            dense = _dense(cfg, n * cfg.head_dim, name, ("embed", axis), cfg.qkv_bias)
            return dense(x).reshape(b, s, n, cfg.head_dim)

        q = heads("q_proj", cfg.num_heads, "heads")
        k = heads("k_proj", cfg.num_kv_heads, "kv_heads")
        v = heads("v_proj", cfg.num_kv_heads, "kv_heads")
        if cfg.qk_norm:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        # Query head i reads K/V head i // (num_heads // num_kv_heads), as HF's repeat_kv does.
        if slots is None:
            mask = None if keep is None else keep[:, None, None, :]  # (batch, 1, 1, keys)
            window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                is_causal=True,
                local_window_size=window,
                implementation=cfg.attention,
            )
        else:  # the XLA path: a query or a few against the whole cache, under a full mask
            k, v = kv_cache.write(self, k, v, slots, cfg.dtype)
            mask = kv_cache.mask(slots, s, cfg.sliding_window)
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        o_proj = _dense(cfg, cfg.hidden_size, "o_proj", ("heads", "embed"), cfg.o_bias)
        return o_proj(out.reshape(b, s, -1))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Maps (batch, seq, hidden_size) to the same shape in `cfg.dtype`."""
        cfg = self.cfg
        dense = lambda n, name, axes: _dense(cfg, n, name, axes, cfg.mlp_bias)
        gate = dense(cfg.intermediate_size, "gate_proj", ("embed", "mlp"))(x)
        up = dense(cfg.intermediate_size, "up_proj", ("embed", "mlp"))(x)
        return dense(cfg.hidden_size, "down_proj", ("mlp", "embed"))(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: x + self_attn(norm(x)), then x + mlp(norm(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, keep: Array | None, slots: Slots | None = None
    ) -> Array:
        """Maps (batch, seq, hidden_size) to the same shape; arguments as `LlamaAttention`."""
        cfg = self.cfg
        h = _norm(cfg, "input_layernorm")(x)
        x = x + LlamaAttention(cfg, name="self_attn")(h, positions, keep, slots)
        return x + LlamaMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))


class Llama(nn.Module):
    """Llama-style causal decoder with Hugging Face Llama's module names.

    Attributes:
      cfg: the shapes and dtypes.

    Example (cached decoding, one token at a time; `generate` runs this loop under jit):
      >>> import jax, jax.numpy as jnp
      >>> model = Llama(LlamaConfig.tiny())
      >>> ids = jnp.array([[5, 6, 7]])
      >>> params = model.init(jax.random.key(0), ids)
      >>> logits, state = model.apply(params, ids, cache_size=8, mutable=["cache"])
      >>> next_id = logits[:, -1:].argmax(-1)
      >>> logits, state = model.apply({**params, **state}, next_id, decode=True,
      ...                             mutable=["cache"])
      >>> logits.shape, int(state["cache"]["index"]), state["cache"]["position"].tolist()
      ((1, 1, 256), 4, [4])
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        *,
        cache_size: int | None = None,
        decode: bool = False,
        last_logits_only: bool = False,
    ) -> Array:
        """Computes next-token logits, optionally through a key/value cache.

        Args:
          input_ids: integer token ids, (batch, seq), seq at most `cfg.max_seq_len`.
          positions: optional integer positions, (batch, seq) or (seq,); default 0 .. seq-1,
            or with `decode` the cache's next position per row onwards. With left padding,
            give the first real token position 0.
          attention_mask: optional (batch, seq), 1 at tokens and 0 at padding; padding is
            hidden from every query, on top of the causal mask.
          cache_size: prefill: make a "cache" collection with this many slots (at least seq,
            at most `cfg.max_seq_len`) and write the tokens into its first slots. The
            variables must hold no cache yet; apply with ``mutable=["cache"]``.
          decode: append the tokens to the cache that a prefill made (pass it back in the
            variables; apply with ``mutable=["cache"]``); they see the cached real tokens.
          last_logits_only: compute the logits of the last token only, (batch, 1, vocab_size):
            what a prefill needs, without the (batch, seq, vocab_size) array.

        Returns:
          Logits, (batch, seq, vocab_size) (seq = 1 with `last_logits_only`), float32.
        """
        cfg = self.cfg
        _check(
            input_ids.ndim == 2 and input_ids.shape[1] <= cfg.max_seq_len,
            "Llama: input_ids "
            f"must be (batch, seq) with seq <= max_seq_len ({cfg.max_seq_len}), got shape "
            f"{input_ids.shape}.",
        )
        b, s = input_ids.shape
        keep = None
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask).astype(bool)
            _check(
                keep.shape == (b, s),
                f"Llama: attention_mask must be ({b}, {s}), got shape {keep.shape}.",
            )
        slots = None
        if cache_size is not None or decode:
            slots, positions = kv_cache.advance(
                self,
                (b, s),
                positions,
                keep,
                cache_size=cache_size,
                decode=decode,
                max_seq_len=cfg.max_seq_len,
            )
        positions = jnp.arange(s) if positions is None else jnp.asarray(positions)
        _check(
            positions.shape in ((s,), (b, s)),
            f"Llama: positions must be ({s},) or ({b}, {s}), got shape {positions.shape}.",
        )
        embed_init = _annotated(cfg.logical_axes, nn.initializers.normal(0.02), ("vocab", "embed"))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=embed_init,
            name="embed_tokens",
        )
        x, positions = embed(input_ids), jnp.broadcast_to(positions, (b, s))
        block = LlamaBlock
        if cfg.remat and slots is None:  # remat only changes the backward pass
            policy = None if cfg.remat is True else getattr(jax.checkpoint_policies, cfg.remat)
            block = nn.remat(LlamaBlock, prevent_cse=not cfg.scan_layers, policy=policy)
        if cfg.scan_layers:
            x, _ = _scan(cfg)(block(cfg, name=LAYERS), x, positions, keep, slots)
        else:
            for i in range(cfg.num_layers):
                x = block(cfg, name=f"{LAYERS}_{i}")(x, positions, keep, slots)
        if last_logits_only:
            x = x[:, -1:]
        x = _norm(cfg, "norm")(x)
        if cfg.tie_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return _dense(cfg, cfg.vocab_size, "lm_head", ("embed", "vocab"))(x).astype(jnp.float32)


LAYERS = "layers"  # the blocks' name: "layers_<i>" unrolled, "layers" stacked by scan_layers
STACKED = ("params", kv_cache.CACHE)  # the collections that scan_layers stacks per layer


def _scan_body(
    block: LlamaBlock, x: Array, positions: Array, keep: Array | None, slots: Slots | None
) -> tuple[Array, None]:
    return block(x, positions, keep, slots), None


def _scan(cfg: LlamaConfig) -> Callable[..., tuple[Array, None]]:
    """`nn.scan` over the blocks: "params" and "cache" stacked on axis 0 (logical name
    "layers"), every other variable collection broadcast (one shared value for all layers),
    rngs split per layer."""
    return nn.scan(
        _scan_body,
        variable_axes=dict.fromkeys(STACKED, 0),
        variable_broadcast=DenyList(STACKED),
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS},
    )


def stack_layers(variables: dict) -> dict:
    """Converts unrolled blocks (`layers_0`, `layers_1`, ...) to the `scan_layers` layout.

    Every "params" (and "cache") leaf under `layers_<i>` is stacked on a new leading axis
    under `layers` (sharding boxes get the logical axis name "layers"). Other collections are
    broadcast by the scan, so their per-layer values must be equal and are kept once.

    Args:
      variables: a variables dict (`{"params": ...}`, other collections allowed) or a bare
        params dict, with blocks `layers_0` ... `layers_<n-1>`.

    Returns:
      The same kind of dict, blocks replaced by one `layers` entry.

    Raises:
      ValueError: the blocks are missing, not numbered 0 .. n-1, or differ in structure, or a
        broadcast collection holds different values for different layers.
    """
    bare = _is_bare(variables)
    out = {}
    for collection, tree in ({"params": variables} if bare else variables).items():
        out[collection] = _stack_collection(collection, tree)
    return out["params"] if bare else out


def unstack_layers(variables: dict) -> dict:
    """Converts the `scan_layers` layout back to unrolled blocks `layers_0`, `layers_1`, ...

    The inverse of `stack_layers`: "params" and "cache" leaves under `layers` are split along
    their leading axis; other collections' `layers` entries are copied to every block.
    """
    bare = _is_bare(variables)
    out = {}
    for collection, tree in ({"params": variables} if bare else variables).items():
        tree = dict(tree)
        if LAYERS in tree:
            stacked = tree.pop(LAYERS)
            if collection in STACKED:
                n = _num_stacked(stacked)
                tree |= {
                    f"{LAYERS}_{i}": jax.tree.map(
                        lambda v, i=i: _take(v, i), stacked, is_leaf=is_box
                    )
                    for i in range(n)
                }
            else:
                tree |= {f"{LAYERS}_{i}": stacked for i in range(_count(variables, bare))}
        out[collection] = tree
    return out["params"] if bare else out


def _is_bare(variables: dict) -> bool:
    return not ("params" in variables and isinstance(variables["params"], dict))


def is_box(v: Any) -> bool:
    """A Flax metadata box (models import nothing of lora_jax's core, so not `_trees.is_box`)."""
    return isinstance(v, meta.AxisMetadata)


def _layer_keys(collection: str, tree: dict) -> list[str]:
    keys = [k for k in tree if k.startswith(f"{LAYERS}_")]
    suffixes = [k[len(LAYERS) + 1 :] for k in keys]
    numbers = sorted(int(n) for n in suffixes if n.isdigit())
    _check(
        numbers == list(range(len(keys))),
        f"stack_layers: '{collection}' has blocks "
        f"{sorted(keys)}; expected {LAYERS}_0 .. {LAYERS}_<n-1>.",
    )
    return [f"{LAYERS}_{i}" for i in numbers]


def _stack_collection(collection: str, tree: dict) -> dict:
    keys = _layer_keys(collection, tree)
    if not keys:
        return dict(tree)
    flats = [traverse_util.flatten_dict(tree[k], sep="/") for k in keys]
    for k, flat in zip(keys[1:], flats[1:], strict=True):
        _check(
            set(flat) == set(flats[0]),
            f"stack_layers: '{collection}/{k}' has leaves "
            f"{sorted(set(flat) ^ set(flats[0]))} that '{collection}/{keys[0]}' does not "
            "share (or the reverse).",
        )
    stacked = {}
    for path in flats[0]:
        values = [flat[path] for flat in flats]
        if collection in STACKED:
            stacked[path] = _stack(values)
        else:
            same = all(np.array_equal(meta.unbox(v), meta.unbox(values[0])) for v in values)
            _check(
                same,
                f"stack_layers: '{collection}/{LAYERS}_<i>/{path}' differs between "
                "layers, but the scan shares one value of it across all layers.",
            )
            stacked[path] = values[0]
    rest = {k: v for k, v in tree.items() if k not in keys}
    return rest | {LAYERS: traverse_util.unflatten_dict(stacked, sep="/")}


def _stack(values: list) -> Array | meta.AxisMetadata:
    if not is_box(values[0]):
        return jnp.stack(values)
    box = values[0].replace_boxed(jnp.stack([meta.unbox(v) for v in values]))
    return box.add_axis(0, {nn.PARTITION_NAME: LAYERS})


def _take(v: Any, i: int) -> Any:
    if not is_box(v):
        return v[i]
    return v.replace_boxed(meta.unbox(v)[i]).remove_axis(0, {nn.PARTITION_NAME: LAYERS})


def _num_stacked(stacked: dict) -> int:
    leaves = jax.tree.leaves(meta.unbox(stacked))
    _check(bool(leaves), f"unstack_layers: '{LAYERS}' holds no arrays.")
    return int(jnp.shape(leaves[0])[0])


def _count(variables: dict, bare: bool) -> int:
    params = variables if bare else variables["params"]
    _check(LAYERS in params, f"unstack_layers: no stacked 'params/{LAYERS}' to count layers from.")
    return _num_stacked(params[LAYERS])


def causal_lm_loss(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Mean next-token cross-entropy, in float32.

    Args:
      logits: (batch, seq, vocab), already aligned with `targets` (the caller shifts).
      targets: integer token ids, (batch, seq).
      mask: optional weights, (batch, seq); 0 drops a position. A mask of all zeros gives 0.

    Returns:
      The weighted mean, a float32 scalar.
    """
    mask_shape = None if mask is None else jnp.shape(mask)
    _check(
        logits.shape[:-1] == targets.shape and mask_shape in (None, targets.shape),
        "causal_lm_loss: expected logits (batch, seq, vocab), targets and mask (batch, seq); "
        f"got {logits.shape}, {targets.shape} and {mask_shape}.",
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    total = jnp.sum(mask)
    return jnp.sum(losses * mask) / jnp.where(total == 0, 1.0, total)
