"""Rotary position embeddings (RoPE) with the scalings of Hugging Face's `modeling_rope_utils`.

`RopeConfig` holds the `rope_parameters` of an HF config (transformers 5) or its older `rope_theta` + `rope_scaling`
pair (transformers 4); `RopeConfig.from_hf` reads either. Supported `rope_type`s:

- `default`: inv_freq[i] = theta^(-2i / dim).
- `linear`: inv_freq / factor (position interpolation).
- `llama3`: Llama 3.1's band-wise scaling (low frequencies / factor, high ones kept, a smooth ramp between).
- `yarn`: YaRN's ramp between interpolated and extrapolated frequencies; cos and sin are multiplied by an attention
  scaling (`attention_factor`, by default 0.1 ln(factor) + 1), which scales q and k, so the logits by its square.

`apply_rope(x, positions, rope)` rotates any [B, T, heads, dim] tensor with frequencies computed for its own `dim`,
so the model's heads (H) and an AttnGate's hidden size (E) share one implementation. It uses HF's "rotate half"
layout: dimension i pairs with dimension i + dim / 2. Frequencies are float32 numpy constants computed as HF computes
them (they agree to about one ulp: float32 `pow` rounds differently in numpy and torch); rotation happens in float32
and the result is cast back to `x.dtype`.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """RoPE frequencies and their scaling; field names follow HF's `rope_parameters`.

    Attributes:
      rope_type: one of `ROPE_TYPES`.
      theta: base wavelength (`rope_theta`).
      factor: context extension factor (`linear`, `llama3`, `yarn`); 1.0 for `default`.
      low_freq_factor, high_freq_factor: `llama3` band edges, as fractions of `original_max_position_embeddings`.
      original_max_position_embeddings: pretraining context length (`llama3`, `yarn`).
      beta_fast, beta_slow: `yarn` ramp bounds, in rotations.
      attention_factor: `yarn` cos/sin scaling; None derives it from `factor`, `mscale` and `mscale_all_dim`.
      mscale, mscale_all_dim: `yarn` (DeepSeek-style) attention-factor terms; used only when both are set.
      truncate: `yarn` rounds the ramp bounds to whole dimensions.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if not self.theta > 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta}")
        if not self.factor > 0:
            raise ValueError(f"rope factor must be > 0, got {self.factor}")
        context = self.original_max_position_embeddings
        if self.rope_type in ("llama3", "yarn") and (context is None or context <= 0):
            raise ValueError(
                f"rope original_max_position_embeddings must be a positive int for rope_type {self.rope_type!r}, "
                f"got {context}"
            )
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope high_freq_factor ({self.high_freq_factor}) must be greater than low_freq_factor "
                f"({self.low_freq_factor})"
            )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> "RopeConfig":
        """Reads `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4).

        Missing `original_max_position_embeddings` defaults to `max_position_embeddings`, and a missing yarn `factor`
        to max_position_embeddings / original_max_position_embeddings, as transformers does.
        """
        params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        theta = params.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0
        partial_rotary_factor = params.pop("partial_rotary_factor", None) or hf_config.get("partial_rotary_factor")
        if partial_rotary_factor not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial_rotary_factor} is not supported (only full rotary dims)")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type", "theta"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"rope_parameters has keys {unknown} that rope_type {rope_type!r} does not support")
        values = {key: value for key, value in params.items() if value is not None}
        if rope_type in ("llama3", "yarn"):
            values.setdefault("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
        if rope_type == "yarn" and "factor" not in values:
            values["factor"] = hf_config["max_position_embeddings"] / values["original_max_position_embeddings"]
        if rope_type in ("linear", "llama3") and "factor" not in values:
            raise ValueError(f"rope_parameters.factor is required for rope_type {rope_type!r}")
        if rope_type == "default":
            values.pop("factor", None)
        return cls(rope_type=rope_type, theta=float(theta), **values)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_scaling(rope: RopeConfig) -> float:
    """The factor HF multiplies cos and sin by: 1.0 except for `yarn`."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def inverse_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """float32 [dim // 2]: the rotation speed (radians per position) of each dimension pair."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number, got {dim}")
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base_frequencies = np.float32(rope.theta) ** exponents  # float32, as HF computes them
    inv_freq = (1.0 / base_frequencies).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        return _llama3_frequencies(rope, inv_freq)
    return _yarn_frequencies(rope, dim, base_frequencies)


def _llama3_frequencies(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    context = rope.original_max_position_embeddings
    low_freq_wavelen = context / rope.low_freq_factor
    high_freq_wavelen = context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_frequencies(rope: RopeConfig, dim: int, base_frequencies: np.ndarray) -> np.ndarray:
    def correction_dim(num_rotations: float) -> float:
        context = rope.original_max_position_embeddings
        return dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp, as HF does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    extrapolated = 1.0 / base_frequencies
    interpolated = 1.0 / (np.float32(rope.factor) * base_frequencies)
    return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeConfig) -> jax.Array:
    """Rotates x [B, T, heads, dim] by integer positions [B, T]; returns [B, T, heads, dim] in x.dtype."""
    if x.ndim != 4 or positions.shape != x.shape[:2]:
        raise ValueError(
            f"apply_rope takes x [B, T, heads, dim] and positions [B, T], got {x.shape}, {positions.shape}"
        )
    inv_freq = jnp.asarray(inverse_frequencies(rope, x.shape[-1]))  # [dim / 2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dim / 2]
    scale = attention_scaling(rope)
    cos = (jnp.cos(angles) * scale)[:, :, None, :]  # [B, T, 1, dim / 2]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]  # [B, T, 1, dim / 2]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, heads, dim / 2] each
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
