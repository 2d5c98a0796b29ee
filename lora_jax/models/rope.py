"""Rotary position embeddings: the frequencies (plain or Llama 3.1 "llama3"-scaled) and the
rotation, in Hugging Face's rotate-half convention."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1's "llama3" RoPE frequency scaling (Hugging Face's `rope_scaling` /
    `rope_parameters` with ``rope_type: "llama3"``), validated on construction.

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` keep their
    frequency, those longer than ``original_max_position_embeddings / low_freq_factor`` are
    slowed down by `factor`, and the band in between is interpolated smoothly.

    Attributes:
      factor: how much the low frequencies are divided by (8.0 for Llama 3.1, 32.0 for 3.2).
      low_freq_factor: sets the long-wavelength edge of the band (1.0 in Llama 3.x).
      high_freq_factor: sets the short-wavelength edge of the band (4.0 in Llama 3.x);
        greater than `low_freq_factor`.
      original_max_position_embeddings: the context length of pre-training (8192).

    Example (Llama 3.2's values: 17 of the 32 frequencies of a 64-wide head change):
      >>> s = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
      ...                 original_max_position_embeddings=8192)
      >>> plain = rope_frequencies(64, 500000.0)
      >>> int((rope_frequencies(64, 500000.0, s) != plain).sum())
      17
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        positive = lambda v, t: isinstance(v, t) and not isinstance(v, bool) and v > 0
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            v = getattr(self, name)
            if not positive(v, (int, float)):
                raise ValueError(f"RopeScaling.{name} must be a positive number, got {v!r}.")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "RopeScaling.high_freq_factor must be greater than low_freq_factor "
                f"({self.low_freq_factor}), got {self.high_freq_factor}."
            )
        v = self.original_max_position_embeddings
        if not positive(v, int):
            raise ValueError(
                f"RopeScaling.original_max_position_embeddings must be a positive int, got {v!r}."
            )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The inverse frequencies of RoPE, in float32 as Hugging Face computes them.

    Args:
      head_dim: the (even) width of a head.
      theta: the base of the frequencies.
      scaling: None for plain RoPE, or Llama 3.1's frequency scaling (transcribed from
        transformers' `_compute_llama3_parameters`).

    Returns:
      A NumPy float32 array (head_dim // 2,).
    """
    f32 = np.float32
    half = head_dim // 2
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(half, dtype=f32) / f32(half)))
    if scaling is None:
        return inv_freq
    factor = f32(scaling.factor)
    low, high = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    context = f32(scaling.original_max_position_embeddings)
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope(x: Array, positions: Array, inv_freq: np.ndarray | Array) -> Array:
    """Rotary position embedding in Hugging Face's rotate-half convention, in float32.

    Args:
      x: queries or keys, (batch, seq, heads, head_dim).
      positions: integer positions, (batch, seq).
      inv_freq: the inverse frequencies, (head_dim // 2,) (see `rope_frequencies`).

    Returns:
      The rotated x, same shape and dtype.
    """
    freqs = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs[None, None, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # (batch, seq, 1, half)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
