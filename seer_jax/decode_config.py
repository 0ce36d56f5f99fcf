"""`DecodeConfig`: the structure of SeerAttention-R's decode gate and how its scores select key blocks at decode.

Stored in `SeerConfig.decode` (None: decode steps are dense). The official config key of each field is given in
parentheses (docs/design.md §8); fields without one are this project's (docs/design.md, "Sparse decoding").
"""

import dataclasses
import re
from typing import Literal

from seer_jax.gate import POOLING_OPS

Q_HEAD_POOLINGS = ("Qproj", "Qavgproj", "Qavg")
DecodeMethod = Literal["token_budget", "context_fraction", "threshold"]
DECODE_METHODS: tuple[str, ...] = ("token_budget", "context_fraction", "threshold")
# Where decode block scores come from (`seer_jax.decode_scores.DECODE_SOURCES` implements them under these names).
DECODE_SOURCE_NAMES: tuple[str, ...] = ("gate", "oracle", "quest", "streaming", "random")
RANKING_DECODE_SOURCES = ("streaming", "random")  # scores that are rankings, not logits: budget methods only
_K_POOLING = re.compile(r"K(?P<ops>(?:max|min|avg)+)")


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
      block_size: key positions per block (`seerattn_gate_block_size`); the Mosaic decode kernel takes 64.
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
      force_sink: always attend the row's first block (the attention sink; the official kernel does).
      sliding_window: always attend the blocks holding the row's last `sliding_window` tokens; 0 for none
        (`seerattn_sliding_window_size`, dead in the official code).
      start_layer: layers with a smaller index decode densely (`seerattn_start_layer`).
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
    force_sink: bool = True
    sliding_window: int = 0
    start_layer: int = 0

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

    @property
    def k_ops(self) -> tuple[str, ...]:
        """The k pooling ops, in concatenation order."""
        ops = self.k_pooling[1:]
        return tuple(ops[start : start + 3] for start in range(0, len(ops), 3))

    @property
    def budget_blocks(self) -> int:
        """Blocks chosen by top-k per step under "token_budget" (token_budget // block_size)."""
        return self.token_budget // self.block_size
