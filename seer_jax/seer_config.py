"""`SeerConfig`: how a SeerAttention model chooses and computes its prefill blocks (gate structure, selection, score
source, dense first layers) and, optionally, its decode blocks (`DecodeConfig`), stored in adapters as `to_dict()`.

A model has prefill gates, decode gates or both: `gate=None` is a model without prefill gates (it prefills densely,
e.g. with only SeerAttention-R decode gates attached), `decode=None` one without decode gates (it decodes densely).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from pallas_kernels.block_sparse_attention import BLOCK_SIZE
from seer_jax.block_scores import RANKING_SOURCES, SOURCES
from seer_jax.decode_config import DecodeAllocation, DecodeConfig, check_quest_weight
from seer_jax.gate import GateConfig
from seer_jax.sparsity import BudgetAllocation, Selection

BLOCK_SOURCES: tuple[str, ...] = tuple(SOURCES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeerConfig:
    """How a SeerAttention model chooses and computes its prefill blocks and, optionally, its decode blocks.

    Attributes:
      gate: the prefill AttnGate structure; its `block_size` must be the kernel's 64. None: the model has no
        prefill gates and prefills densely, so `selection` must keep every block.
      selection: scores → block mask: method ("nz_ratio" | "threshold" | "budget"), nz_ratio, threshold, budget
        and its per-layer allocation, last_block_dense.
      source: where block scores come from, one of `BLOCK_SOURCES` (`seer_jax.block_scores.SOURCES`).
      quest_weight: w >= 0; with w > 0 the "gate" source ranks blocks by the gate's logits plus w times the "quest"
        source's scores (mean-pooled post-RoPE q · k, `block_scores.quest_scores`); 0 (the official gate): the
        logits alone. Other sources ignore it. This project's (docs/design.md §3).
      start_layer: layers with a smaller index attend densely.
      seed: seeds the "random" source (each layer folds in its index).
      decode: the decode gates and their selection (SeerAttention-R) with its per-layer allocation, or None: decode
        steps attend densely and the model has no decode gates.
    """

    gate: GateConfig | None = dataclasses.field(default_factory=GateConfig)
    selection: Selection = dataclasses.field(default_factory=Selection)
    source: str = "gate"
    quest_weight: float = 0.0
    start_layer: int = 0
    seed: int = 0
    decode: DecodeConfig | None = None

    def __post_init__(self):
        if self.gate is not None and not isinstance(self.gate, GateConfig):
            raise ValueError(f"gate must be a GateConfig or None, got {type(self.gate).__name__}")
        if not isinstance(self.selection, Selection):
            raise ValueError(f"selection must be a sparsity.Selection, got {type(self.selection).__name__}")
        if self.gate is None and not self.selection.is_dense:
            raise ValueError(
                f"gate is None (no prefill gates: dense prefill) but selection {self.selection} drops blocks; "
                "use a dense selection (Selection()) or prefill gates"
            )
        if self.gate is None and self.decode is None:
            raise ValueError("gate and decode are both None: a SeerConfig needs prefill gates, decode gates or both")
        if self.gate is not None and self.gate.block_size != BLOCK_SIZE:
            raise ValueError(
                f"gate.block_size must be {BLOCK_SIZE} (block_sparse_attention computes {BLOCK_SIZE}×{BLOCK_SIZE} "
                f"blocks), got {self.gate.block_size}"
            )
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {BLOCK_SOURCES}, got {self.source!r}")
        if self.source in RANKING_SOURCES and self.selection.method != "nz_ratio":
            raise ValueError(
                f"source {self.source!r} ranks blocks without probabilities: use selection method 'nz_ratio', "
                f"not {self.selection.method!r}"
            )
        check_quest_weight(self.quest_weight)
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be an int >= 0, got {self.start_layer!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.decode is not None and not isinstance(self.decode, DecodeConfig):
            raise ValueError(f"decode must be a DecodeConfig or None, got {type(self.decode).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`from_dict` reads it back). Fields added later are written only when set, so that what
        does not use them reads as before they existed: `selection.force_sink` when True, `decode.allocation` when
        not None, `quest_weight` and `decode.quest_weight` when not 0."""
        values = dataclasses.asdict(self)
        if not self.selection.force_sink:
            del values["selection"]["force_sink"]
        if self.decode is not None and self.decode.allocation is None:
            del values["decode"]["allocation"]
        if self.quest_weight == 0:
            del values["quest_weight"]
        if self.decode is not None and self.decode.quest_weight == 0:
            del values["decode"]["quest_weight"]
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SeerConfig":
        """Reads `to_dict`'s output; unknown keys raise `ValueError`."""
        data = dict(data)
        gate = data.pop("gate", {})
        if gate is not None:
            gate = _from_fields(GateConfig, gate, "seer_config.gate")
        selection = dict(data.pop("selection", {}))
        if selection.get("allocation") is not None:
            selection["allocation"] = _from_fields(
                BudgetAllocation, selection["allocation"], "seer_config.selection.allocation"
            )
        selection = _from_fields(Selection, selection, "seer_config.selection")
        decode = data.pop("decode", None)
        if decode is not None:
            decode = dict(decode)
            if decode.get("allocation") is not None:
                decode["allocation"] = _from_fields(
                    DecodeAllocation, decode["allocation"], "seer_config.decode.allocation"
                )
            decode = _from_fields(DecodeConfig, decode, "seer_config.decode")
        return _from_fields(cls, {**data, "gate": gate, "selection": selection, "decode": decode}, "seer_config")


def _from_fields(cls: type, data: Mapping[str, Any], where: str):
    unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    return cls(**data)
