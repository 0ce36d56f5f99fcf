"""The official adapters' format (microsoft/SeerAttention): which kind of gate an adapter holds, and what its
config.json means as a `SeerConfig` (docs/design.md §9).

An official adapter directory holds `config.json` (the base model's config plus `seerattn_*` keys and `base_model`)
and `attn_gate_weights.pth` (or `.safetensors`): the state dict of ONE kind of gate, both kinds under
`model.layers.{L}.self_attn.attn_gate.`:

    prefill (SeerAttention, official prefill_sparse/)     mask_linear_k.weight (+ mask_linear_q.weight)
    decode  (SeerAttention-R, official decode_sparse/)    attngate_linear_q.weight, attngate_linear_k.weight
                                                          (+ attngate_qnorm.weight, attngate_knorm.weight)

The tensor names tell the kind (`official_kind`); the config keys are then read as that kind's. Four keys exist
in both with different meanings (SEER_R_SPEC §8.3):

    key                        prefill adapter → SeerConfig.gate / .selection    decode adapter → SeerConfig.decode
    seerattn_sparsity_method   'nz_ratio' | 'threshold' (TopK per query-block    'token_budget' | 'threshold' (per
                               row, or softmax over its key blocks)              decode token, over its key blocks)
    seerattn_threshold         prefill probability threshold                      decode probability threshold
    seerattn_gate_block_size   GateConfig.block_size (64)                        DecodeConfig.block_size
    seerattn_gate_hidden_size  GateConfig.hidden_size                             DecodeConfig.hidden_size

Prefill-only keys: `PREFILL_KEYS`; decode-only keys: `DECODE_KEYS`; a key of the other kind is refused (the config
does not describe the tensors). Runtime and training keys of the decode code (`IGNORED_DECODE_KEYS`) are ignored.
A decode adapter becomes `SeerConfig(gate=None, decode=...)`: no prefill gates, dense prefill, as the official
decode models run.

Defaults are the official code's (configuration_*_seerattn.py at HEAD), except for a decode adapter:
  * no `seerattn_sparsity_method`: "token_budget" at `seerattn_token_budget` (4096), unless the config gives a
    positive `seerattn_threshold` (then "threshold", the official default method). The official default, threshold
    0.0, keeps every block; the released decode configs hold only training keys (SEER_R_SPEC §1.7), and the
    official evaluation passes a token budget at load time.
  * no `seerattn_use_qk_norm`: whether the tensors hold `attngate_qnorm`/`attngate_knorm` (the official loader
    would silently drop them: `load_state_dict(strict=False)` into a gate built without norms).
  * blocks completed while decoding are rotated at their first position (`DecodeConfig.rope_at_block_end`
    False, our fix of the official behaviour, docs/design.md §8 deviation 1); the sink block is always attended, as
    the official kernel does (`force_sink`).
"""

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import OFFICIAL_GATE
from seer_jax.gate import GateConfig
from seer_jax.hf_weights import CheckpointError
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection

OfficialKind = Literal["prefill", "decode"]
PREFILL_MARKER = f".{OFFICIAL_GATE}.mask_linear_"  # in every official prefill-gate tensor name
DECODE_MARKER = f".{OFFICIAL_GATE}.attngate_"  # in every official decode-gate tensor name
# Keys both kinds have, each with its own meaning (module docstring).
SHARED_KEYS = (
    "seerattn_sparsity_method",
    "seerattn_threshold",
    "seerattn_gate_block_size",
    "seerattn_gate_hidden_size",
)
# Prefill adapters: keys and their official defaults.
PREFILL_DEFAULTS = {
    "seerattn_sparsity_method": "threshold",
    "seerattn_threshold": 0.0,
    "seerattn_nz_ratio": 1.0,
    "seerattn_gate_type": "Qavg_Kmaxminavg",
    "seerattn_gate_block_size": 64,
    "seerattn_gate_hidden_size": 128,
    "seerattn_last_block_dense": True,
    "seerattn_gate_force_double": False,
}
PREFILL_KEYS = tuple(sorted(set(PREFILL_DEFAULTS) - set(SHARED_KEYS)))
# Decode adapters: key → DecodeConfig field (defaults: DecodeConfig's, which are the official ones, except those
# the module docstring lists).
DECODE_FIELDS = {
    "seerattn_q_head_pooling_type": "q_head_pooling",
    "seerattn_k_seq_pooling_type": "k_pooling",
    "seerattn_gate_hidden_size": "hidden_size",
    "seerattn_gate_block_size": "block_size",
    "seerattn_use_qk_norm": "qk_norm",
    "seerattn_use_rope": "use_rope",
    "seerattn_sparsity_method": "method",
    "seerattn_token_budget": "token_budget",
    "seerattn_threshold": "threshold",
    "seerattn_start_layer": "start_layer",
    "seerattn_sliding_window_size": "sliding_window",
}
IGNORED_DECODE_KEYS = (
    "seerattn_implementation",
    "seerattn_output_sparsity",
    "seerattn_loss_slice_ratio",
    "seerattn_training_threshold",
)
DECODE_KEYS = tuple(sorted((set(DECODE_FIELDS) | set(IGNORED_DECODE_KEYS)) - set(SHARED_KEYS)))
_logger = logging.getLogger(__name__)


def official_kind(names: Iterable[str]) -> OfficialKind:
    """The kind of gates an official state dict holds, from its tensor names (module docstring).

    Raises `CheckpointError` when it holds both kinds or neither.
    """
    names = list(names)
    prefill = any(PREFILL_MARKER in name for name in names)
    decode = any(DECODE_MARKER in name for name in names)
    if prefill and decode:
        raise CheckpointError(
            "the gate weights hold both prefill (attn_gate.mask_linear_*) and decode (attn_gate.attngate_*) tensors; "
            "an official adapter holds one kind: pass them as two adapters"
        )
    if not prefill and not decode:
        shown = ", ".join(sorted(names)[:3]) or "none"
        raise CheckpointError(
            f"the gate weights hold no official gate tensor (…{PREFILL_MARKER}* or …{DECODE_MARKER}*; found {shown})"
        )
    return "decode" if decode else "prefill"


def seer_config_from_official(
    config: Mapping[str, Any], kind: OfficialKind = "prefill", *, qk_norm_tensors: bool = False
) -> SeerConfig:
    """The SeerConfig of an official adapter's config.json, read as `kind`'s keys (module docstring).

    qk_norm_tensors: whether a decode adapter's tensors hold the q/k norms (the default of `seerattn_use_qk_norm`).
    Raises `CheckpointError` (one line) for keys of the other kind, unknown values or no `seerattn_*` key at all.
    """
    keys = {key for key in config if key.startswith("seerattn_")}
    if not keys:
        raise CheckpointError(
            "config.json has no seerattn_* keys: not a SeerAttention adapter (V1 adapters are not supported)"
        )
    foreign = sorted(keys & set(DECODE_KEYS if kind == "prefill" else PREFILL_KEYS))
    if foreign:
        other = "decode" if kind == "prefill" else "prefill"
        raise CheckpointError(
            f"config.json has {other}-gate keys {foreign}, but the tensors are {kind} gates: the config does not "
            "describe these weights"
        )
    known = set(PREFILL_DEFAULTS) if kind == "prefill" else set(DECODE_FIELDS) | set(IGNORED_DECODE_KEYS)
    unknown = sorted(keys - known)
    if unknown:
        _logger.warning("ignoring config.json keys this reader does not know: %s", unknown)
    try:
        if kind == "prefill":
            return _prefill_config(config)
        return SeerConfig(gate=None, decode=_decode_config(config, qk_norm_tensors))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"config.json: a {kind} adapter's seerattn_* keys are invalid ({error})") from None


def _prefill_config(config: Mapping[str, Any]) -> SeerConfig:
    values = {key: config.get(key, default) for key, default in PREFILL_DEFAULTS.items()}
    return SeerConfig(
        gate=GateConfig(
            gate_type=values["seerattn_gate_type"],
            hidden_size=values["seerattn_gate_hidden_size"],
            block_size=values["seerattn_gate_block_size"],
            force_double=bool(values["seerattn_gate_force_double"]),
        ),
        selection=Selection(
            method=values["seerattn_sparsity_method"],
            nz_ratio=float(values["seerattn_nz_ratio"]),
            threshold=float(values["seerattn_threshold"]),
            last_block_dense=bool(values["seerattn_last_block_dense"]),
        ),
    )


def _decode_config(config: Mapping[str, Any], qk_norm_tensors: bool) -> DecodeConfig:
    values = {field: config[key] for key, field in DECODE_FIELDS.items() if key in config}
    for field in ("qk_norm", "use_rope"):
        if field in values:
            values[field] = bool(values[field])
    if "threshold" in values:
        values["threshold"] = float(values["threshold"])
    values.setdefault("qk_norm", qk_norm_tensors)
    if "method" not in values:
        values["method"] = "threshold" if values.get("threshold", 0.0) > 0 else "token_budget"
    elif values["method"] == "nz_ratio":
        raise ValueError(
            "seerattn_sparsity_method 'nz_ratio' is not a decode method (the official decode code never implemented "
            "it); use 'token_budget' or 'threshold'"
        )
    return DecodeConfig(**values)
