"""`DecodeConfig`: the structure of SeerAttention-R's decode gate and how its scores select key blocks at decode.

Stored in `SeerConfig.decode` (None: decode steps are dense). The official config key of each field is given in
parentheses (docs/design.md §8); fields without one are this project's (docs/design.md, "Sparse decoding").

A budget (token budget or context fraction) is the same in every sparse layer unless the config carries a
`DecodeAllocation`: each layer's context fraction at calibration points (`seer_jax.decode_calibration`), from which
`DecodeConfig.for_layer` gives the budget one layer selects with.
"""

import dataclasses
import math
import re
from typing import Literal

from seer_jax.gate import POOLING_OPS
from seer_jax.sparsity import interpolate_layer_points, layer_points

Q_HEAD_POOLINGS = ("Qproj", "Qavgproj", "Qavg")
DecodeMethod = Literal["token_budget", "context_fraction", "threshold"]
DECODE_METHODS: tuple[str, ...] = ("token_budget", "context_fraction", "threshold")
# Where decode block scores come from (`seer_jax.decode_scores.DECODE_SOURCES` implements them under these names).
DECODE_SOURCE_NAMES: tuple[str, ...] = ("gate", "oracle", "quest", "streaming", "random")
RANKING_DECODE_SOURCES = ("streaming", "random")  # scores that are rankings, not logits: budget methods only
_K_POOLING = re.compile(r"K(?P<ops>(?:max|min|avg)+)")
# How a decode allocation's shares were measured (`seer_jax.decode_calibration`): which order fills the rows.
DECODE_ALLOCATION_RULES: tuple[str, ...] = ("recall", "coverage")


def check_quest_weight(weight: float) -> None:
    """Raises ValueError unless `weight` (a prefill or decode `quest_weight`) is a finite number >= 0."""
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"quest_weight must be a finite number >= 0, got {weight!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeAllocation:
    """How a decode budget is shared among layers: each layer's context fraction at calibration points, measured by
    `seer_jax.decode_calibration.decode_allocation` (one global order over every sparse layer's candidate blocks of
    a batch of distillation data) and interpolated linearly in between.

    Attributes:
      fractions: P calibration points, strictly increasing in (0, 1]: the mean context fraction over the sparse
        layers (`DecodeConfig.context_fraction`'s meaning: a row of n tokens picks floor(f · n / block_size) blocks
        by top-k, forced blocks on top).
      layer_fractions: P tuples of L floats in [0, 1]: each layer's context fraction at that point (1 for layers
        below the decode `start_layer` it was calibrated with); the mean over the sparse layers of each tuple is that
        point's fraction up to one block, so interpolating keeps the mean.
      length: the tokens per row of the calibration batch (a token budget is read as a fraction of it).
      rule: how the shares were measured, one of `DECODE_ALLOCATION_RULES` (for labels; None: not recorded).
    """

    fractions: tuple[float, ...]
    layer_fractions: tuple[tuple[float, ...], ...]
    length: int
    rule: str | None = None

    def __post_init__(self):
        # JSON gives lists; a DecodeConfig is a static jit argument, so everything it holds must hash.
        points, shares = layer_points(self.fractions, self.layer_fractions, "fractions", "layer_fractions")
        object.__setattr__(self, "fractions", points)
        object.__setattr__(self, "layer_fractions", shares)
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
            raise ValueError(f"length must be a positive int, got {self.length!r}")
        if self.rule is not None and self.rule not in DECODE_ALLOCATION_RULES:
            raise ValueError(f"rule must be one of {DECODE_ALLOCATION_RULES} or None, got {self.rule!r}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_fractions[0])

    def layer_fractions_at(self, fraction: float) -> tuple[float, ...]:
        """Each layer's context fraction at mean fraction `fraction`, interpolated between the calibration points;
        below the first the fractions scale with `fraction` (0 at 0)."""
        return interpolate_layer_points(fraction, self.fractions, self.layer_fractions)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """A decode gate's structure and its selection.

    Gate (docs/design.md §8):
      q_head_pooling: how the G query heads of a kv group become one gate query (`seerattn_q_head_pooling_type`):
        "Qproj" (a (G·H → E) linear per kv head, weight [K, G, H, E]), "Qavgproj" (group mean, then [K, H, E]) or
        "Qavg" (group mean, no weight; needs E == H).
      k_pooling: `K<ops>`, the ops pooling k over each block, in the order max, min, avg
        (`seerattn_k_seq_pooling_type`).
      hidden_size: E, the gate's projection and rotary size (`seerattn_gate_hidden_size`).
      block_size: key positions per block (`seerattn_gate_block_size`); the Mosaic decode kernel takes 64 or 32.
      qk_norm: RMSNorm (eps 1e-6, weight [E]) of the projected q and k before RoPE (`seerattn_use_qk_norm`).
      use_rope: rotate the gate's q (at the token's position) and blocks (at their first position)
        (`seerattn_use_rope`).
      rope_at_block_end: rotate a block completed while decoding at its last position, as the official code does
        (docs/design.md §8, deviation 1), to reproduce its numbers; False (the paper, training and prefill) rotates
        at its first.

    Selection (docs/design.md §8):
      source: where the block scores come from, one of `DECODE_SOURCE_NAMES` (`seer_jax.decode_scores`): "gate" (this
        decode gate, the default), "oracle", "quest", "streaming", "random"; this project's.
      method: "token_budget" (`seerattn_sparsity_method` 'token_budget'), "context_fraction" (this project's) or
        "threshold".
      token_budget: tokens chosen per step by top-k, as token_budget // block_size blocks
        (`seerattn_token_budget`); forced blocks come on top.
      context_fraction: a budget that is a fraction of the context: at a step whose row holds n real tokens (the
        decoded one included), top-k picks floor(context_fraction · n / block_size) blocks (float32), i.e. the
        token budget context_fraction · n; forced blocks come on top.
      threshold: keep blocks whose softmax probability over the scored blocks exceeds it (`seerattn_threshold`).
      quest_weight: w >= 0; with w > 0 the "gate" source scores a block by its gate logit plus w times Quest's
        bound on it (`seer_jax.decode_scores.quest_bound`, the max over the kv head's G query heads), and the
        compressed-K cache keeps each block's channel max/min of the rotated keys for it (`k_compression`);
        0 (the official gate): the gate's logits alone. Other sources ignore it. This project's (design §8).
      force_sink: always attend the row's first block (the attention sink; the official kernel does).
      sliding_window: always attend the blocks holding the row's last `sliding_window` tokens; 0 for none
        (`seerattn_sliding_window_size`, dead in the official code).
      start_layer: layers with a smaller index decode densely (`seerattn_start_layer`).
      allocation: "token_budget" and "context_fraction" only: each layer's share of the budget
        (`DecodeAllocation`, `for_layer`), or None: every sparse layer selects with the same budget.
    The block of the current token is always attended.
    """

    q_head_pooling: str = "Qproj"
    k_pooling: str = "Kmaxminavg"
    hidden_size: int = 128
    block_size: int = 64
    qk_norm: bool = False
    use_rope: bool = True
    rope_at_block_end: bool = False
    source: str = "gate"
    method: DecodeMethod = "token_budget"
    token_budget: int = 4096
    context_fraction: float = 0.1
    threshold: float = 0.0
    quest_weight: float = 0.0
    force_sink: bool = True
    sliding_window: int = 0
    start_layer: int = 0
    allocation: DecodeAllocation | None = None

    def __post_init__(self):
        if self.q_head_pooling not in Q_HEAD_POOLINGS:
            raise ValueError(f"q_head_pooling must be one of {Q_HEAD_POOLINGS}, got {self.q_head_pooling!r}")
        match = _K_POOLING.fullmatch(self.k_pooling) if isinstance(self.k_pooling, str) else None
        if match is None:
            raise ValueError(f"k_pooling must look like 'K<ops>' with ops from max, min, avg, got {self.k_pooling!r}")
        if self.k_ops != tuple(op for op in POOLING_OPS if op in self.k_ops):
            raise ValueError(f"k_pooling {self.k_pooling!r}: ops must appear once each, in the order max, min, avg")
        for name in ("hidden_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.use_rope and self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even with use_rope (RoPE rotates pairs), got {self.hidden_size}")
        for name in ("qk_norm", "use_rope", "rope_at_block_end", "force_sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.source not in DECODE_SOURCE_NAMES:
            raise ValueError(f"source must be one of {DECODE_SOURCE_NAMES}, got {self.source!r}")
        if self.method not in DECODE_METHODS:
            raise ValueError(f"method must be one of {DECODE_METHODS}, got {self.method!r}")
        if self.source in RANKING_DECODE_SOURCES and self.method == "threshold":
            raise ValueError(
                f"source {self.source!r} ranks blocks without probabilities: use a budget, not 'threshold'"
            )
        if not isinstance(self.context_fraction, int | float) or not 0.0 < self.context_fraction <= 1.0:
            raise ValueError(f"context_fraction must be in (0, 1], got {self.context_fraction!r}")
        for name in ("token_budget", "sliding_window", "start_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.threshold, int | float) or not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold!r}")
        check_quest_weight(self.quest_weight)
        if self.allocation is not None:
            if not isinstance(self.allocation, DecodeAllocation):
                raise ValueError(f"allocation must be a DecodeAllocation or None, got {type(self.allocation).__name__}")
            if self.method == "threshold":
                raise ValueError(
                    "allocation shares a budget among layers: it needs method 'token_budget' or "
                    "'context_fraction', not 'threshold'"
                )

    @property
    def k_ops(self) -> tuple[str, ...]:
        """The k pooling ops, in concatenation order."""
        ops = self.k_pooling[1:]
        return tuple(ops[start : start + 3] for start in range(0, len(ops), 3))

    @property
    def keeps_key_bounds(self) -> bool:
        """Whether the compressed-K cache keeps per-block key max/min: the "gate" source with quest_weight > 0."""
        return self.source == "gate" and self.quest_weight > 0

    @property
    def budget_blocks(self) -> int:
        """Blocks chosen by top-k per step under "token_budget" (token_budget // block_size)."""
        return self.token_budget // self.block_size

    def for_layer(self, layer_index: int) -> "DecodeConfig":
        """The config layer `layer_index` selects with: its own budget from `allocation` (and no allocation); without
        an allocation, this config.

          * "context_fraction": the layer's fraction at mean fraction `context_fraction` (`layer_fractions_at`); a
            layer whose fraction is 0 picks no block by top-k, written as the equivalent token budget 0 (a context
            fraction must be positive).
          * "token_budget": token_budget times the layer's share ratio (its fraction over the mean) at mean fraction
            token_budget / allocation.length (at most 1), rounded to whole blocks.
        """
        if self.allocation is None:
            return self
        if not 0 <= layer_index < self.allocation.num_layers:
            raise ValueError(
                f"layer {layer_index}: the decode allocation covers {self.allocation.num_layers} layers; calibrate it "
                "for this model"
            )
        if self.method == "context_fraction":
            fraction = min(self.allocation.layer_fractions_at(self.context_fraction)[layer_index], 1.0)
            if fraction <= 0.0:
                return dataclasses.replace(self, method="token_budget", token_budget=0, allocation=None)
            return dataclasses.replace(self, context_fraction=fraction, allocation=None)
        mean = min(self.token_budget / self.allocation.length, 1.0)
        if mean <= 0.0:
            return dataclasses.replace(self, allocation=None)
        ratio = self.allocation.layer_fractions_at(mean)[layer_index] / mean
        blocks = max(math.floor(self.token_budget * ratio / self.block_size + 0.5), 0)
        return dataclasses.replace(self, token_budget=blocks * self.block_size, allocation=None)
