"""A compact Llama-style decoder in flax.linen: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Plain Flax that knows nothing of LoRA. Module names follow Hugging Face Llama, so parameter
paths read `layers_0/self_attn/q_proj/kernel`, `layers_0/mlp/down_proj/kernel`,
`embed_tokens/embedding`, `norm/scale`, `lm_head/kernel`, and LoRA targets read like PEFT's.
Kernels use the (in, out) layout of flax (HF Linear weights transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and dtypes of the decoder. Presets: `tiny`, `small`, `llama_1b`, `llama3_8b`."""

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

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_kv_heads must divide num_heads ({self.num_heads}), "
                f"got {self.num_kv_heads}."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}) unless head_dim is given."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}.")

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """About 0.1M parameters: unit tests."""
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=128,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, **overrides) -> LlamaConfig:
        """About 3.3M parameters at vocab 256: the CPU example."""
        base = dict(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=704,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            max_seq_len=256,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def llama_1b(cls, **overrides) -> LlamaConfig:
        """Llama-3.2-1B shapes (1.24B parameters), bfloat16."""
        base = dict(
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
        )
        return cls(**{**base, **overrides})

    @classmethod
    def llama3_8b(cls, **overrides) -> LlamaConfig:
        """Llama-3-8B shapes (8.03B parameters), bfloat16."""
        base = dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            rope_theta=500000.0,
            max_seq_len=8192,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
        )
        return cls(**{**base, **overrides})

    def num_params(self) -> int:
        """Exact parameter count."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * layer + h + head


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * scale).astype(self.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding (rotate-half) of x (batch, seq, heads, head_dim) at integer positions."""
    half = x.shape[-1] // 2
    freqs = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * freqs[None, None, :]  # (batch, seq, half)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _dense(cfg: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
        cfg = self.cfg
        b, s, _ = x.shape
        q = _dense(cfg, cfg.num_heads * cfg.head_dim, "q_proj")(x).reshape(
            b, s, cfg.num_heads, cfg.head_dim
        )
        k = _dense(cfg, cfg.num_kv_heads * cfg.head_dim, "k_proj")(x).reshape(
            b, s, cfg.num_kv_heads, cfg.head_dim
        )
        v = _dense(cfg, cfg.num_kv_heads * cfg.head_dim, "v_proj")(x).reshape(
            b, s, cfg.num_kv_heads, cfg.head_dim
        )
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(b, s, cfg.num_kv_heads, groups, cfg.head_dim)
        logits = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(cfg.head_dim))
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgqt,btkd->bqkgd", weights, v).reshape(
            b, s, cfg.num_heads * cfg.head_dim
        )
        return _dense(cfg, cfg.hidden_size, "o_proj")(out)


class LlamaMLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        gate = _dense(cfg, cfg.intermediate_size, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        x = x + LlamaAttention(cfg, name="self_attn")(norm("input_layernorm")(x), positions, mask)
        return x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))


class Llama(nn.Module):
    """Llama-style causal decoder: token ids (batch, seq) -> logits (batch, seq, vocab), float32."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self, input_ids: Array, positions: Array | None = None, attention_mask: Array | None = None
    ) -> Array:
        cfg = self.cfg
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        mask = jnp.tril(jnp.ones((s, s), bool))[None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(input_ids)
        for i in range(cfg.num_layers):
            x = LlamaBlock(cfg, name=f"layers_{i}")(x, positions, mask)
        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
        logits = (
            embed.attend(x) if cfg.tie_embeddings else _dense(cfg, cfg.vocab_size, "lm_head")(x)
        )
        return logits.astype(jnp.float32)


def causal_lm_loss(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Mean next-token cross-entropy in float32 (logits and targets already aligned).

    Args:
      logits: (batch, seq, vocab).
      targets: (batch, seq) token ids.
      mask: optional (batch, seq) weights; masked-out positions do not count.

    Returns:
      A scalar.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
