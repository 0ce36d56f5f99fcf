"""Gate adapters: a SeerAttention model's gate weights and settings, stored apart from its frozen base model.

An adapter holds prefill gates (SeerAttention), decode gates (SeerAttention-R) or both. Tensor names are the gates'
state paths joined by dots (docs/design.md §9):

    prefill  model.layers.{L}.self_attn.attn_gate.mask_linear_k.weight      [N, Ck, E] single-, [K, Ck, E] double-linear
             (double-linear only) ….attn_gate.mask_linear_q.weight            [N, Cq, E]           (`seer_jax.gate`)
    decode   model.layers.{L}.self_attn.decode_gate.attngate_linear_q.weight  [K, G, H, E] Qproj, [K, H, E] Qavgproj
             ….decode_gate.attngate_linear_k.weight                           [K, Ck, E]
             (qk_norm only) ….decode_gate.attngate_qnorm.weight, attngate_knorm.weight  [E]  (`seer_jax.decode_gate`)

The prefill names are the official ones; the decode names are the official SeerAttention-R ones with `attn_gate`
read as `decode_gate` (`seer_jax.decode_gate.official_name`), so both kinds live in one model and one adapter.
`seer_config.gate` is None in an adapter without prefill gates (dense prefill), `seer_config.decode` None in one
without decode gates (dense decode).

This project's format, a directory written by `save_adapter`:

    seer_adapter.json    {"format": 1 (2 when the selection is a "budget", 3 when the decode config holds a
                          per-layer allocation: older readers refuse them by number),
                          "base_model": <HF id, or the base directory's absolute path>,
                          "base_model_relative": <that directory relative to the adapter's; only for a directory>,
                          "seer_config": SeerConfig.to_dict(), the default selection included,
                          "measured_density": {"prefill"/"decode": {"density", "data"}} (optional),
                          "weights": "orbax" | "safetensors", "tensors": {name: {"shape": [...], "dtype": ...}},
                          "base_identity": {"config", "fingerprint"} (`seer_jax.base_identity`; optional)};
                         written last, so its presence means the directory is complete
    gates/               Orbax checkpoint of {name: array}           (weights "orbax")
    gates.safetensors    the same tensors                             (weights "safetensors")

The official format (microsoft/SeerAttention), read by `read_adapter` too: `config.json` (the base config plus
`seerattn_*` keys and `base_model`) and `attn_gate_weights.pth` (a torch state dict; reading it needs torch: pip
install 'seer-jax[torch]') or `attn_gate_weights.safetensors`, holding prefill or decode gates, told apart by the
tensor names; `seer_jax.official_format` says what each key means for each kind. Decode tensors are renamed to ours.

Default selection. An adapter's `seer_config.selection` (prefill) and `seer_config.decode` (decode) are what
`attach_gates` selects with unless told otherwise. `save_adapter` records the selection it is given, else the
model's own, except that a prefill selection keeping every block (distillation runs dense) is recorded as
`DEFAULT_SELECTION`; with `prefill_density` / `decode_density` it records the density that selection reached and
on what data (`MeasuredDensity`). `record_selection` replaces the default prefill selection (and its density) of an
existing adapter, e.g. with a calibrated budget (`seer_jax.calibration.budget_for_density`), and/or its decode
config, e.g. with a calibrated per-layer decode allocation (`seer_jax.decode_calibration.decode_allocation`).

Base model. `base_model` is recorded as given when it is not a local directory (a hub id), else as the directory's
absolute path plus its path relative to the adapter; `read_adapter` returns the first of those that exists, so an
adapter loads from any working directory and after moving the run directory (adapter and base together). Adapters
written before `base_model_relative` existed may hold a path relative to the working directory of the run that
wrote them: it is looked for there and under each ancestor of the adapter. The base identity check
(`seer_jax.base_identity`) confirms whichever directory is found.

`attach_gates(base, adapter)` checks the tensors against the model (every layer's gates present, nothing else,
shapes exact) and returns a `SeerCausalLM` sharing the base model's weights; `combine_adapters(prefill, decode)`
joins a prefill adapter and a decode adapter into one (e.g. the official DeepSeek-R1-Distill-Qwen-14B pair);
`load_seer_model` also loads the base model with `seer_jax.checkpoint.load_model`.
"""

import dataclasses
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.flax
from flax import nnx
from safetensors import SafetensorError

from seer_jax.base_identity import base_identity, check_base_identity, official_identity
from seer_jax.checkpoint import load_model
from seer_jax.decode_config import DecodeConfig
from seer_jax.decode_gate import DECODE_GATE, from_official_name
from seer_jax.gate import GateParam
from seer_jax.hf_weights import CheckpointError
from seer_jax.model import CausalLM
from seer_jax.model_path import ModelPathError, resolve_model_path
from seer_jax.multihost import is_primary, shared_staging_dir, sync, to_host
from seer_jax.official_format import DECODE_MARKER, official_kind, seer_config_from_official
from seer_jax.orbax_errors import READ_ERRORS, describe_read_error
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection

ADAPTER_FILE = "seer_adapter.json"
ORBAX_DIR = "gates"
SAFETENSORS_FILE = "gates.safetensors"
OFFICIAL_PTH = "attn_gate_weights.pth"
OFFICIAL_SAFETENSORS = "attn_gate_weights.safetensors"
FORMAT_VERSION = 1
# Format 2 is format 1 whose prefill selection may be a "budget" with a per-layer allocation, which format-1
# readers cannot read; adapters without one are still written as format 1.
BUDGET_FORMAT_VERSION = 2
# Format 3 is format 2 whose decode config may hold a per-layer allocation (`DecodeAllocation`), which format-2
# readers cannot read; written only when it does.
DECODE_ALLOCATION_FORMAT_VERSION = 3
# Format 4 is format 3 whose prefill or decode config may weigh Quest-style scores into the gate's (`quest_weight`),
# which format-3 readers cannot read; written only when a weight is not 0.
QUEST_WEIGHT_FORMAT_VERSION = 4
READABLE_FORMATS = (
    FORMAT_VERSION,
    BUDGET_FORMAT_VERSION,
    DECODE_ALLOCATION_FORMAT_VERSION,
    QUEST_WEIGHT_FORMAT_VERSION,
)
WeightsFormat = Literal["orbax", "safetensors"]
# The prefill selection an adapter records when the model it is saved from keeps every block (and no selection is
# given): TopK at nz_ratio 0.3 reaches ≈ 30% of the causal blocks by construction (docs/design.md §3) whatever the
# model and length, the density up to which the testbed's gates beat every training-free baseline (BENCHMARKS.md,
# +4.1% PPL at 8192 tokens); last_block_dense as the official inference default, so the prompt's end, which the
# first generated tokens read, is computed exactly.
DEFAULT_SELECTION = Selection(method="nz_ratio", nz_ratio=0.3, last_block_dense=True)
# DecodeConfig fields that describe the decode gates' weights; the others are its selection.
DECODE_GATE_FIELDS = ("q_head_pooling", "k_pooling", "hidden_size", "block_size", "qk_norm", "use_rope")
_DECODE_PATH = f".{DECODE_GATE}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeasuredDensity:
    """The block density an adapter's default selection reached, and on what data.

    Attributes:
      density: prefill: computed causal blocks over all causal blocks, mean over layers and heads (docs/design.md
        §3, `seer_jax.forwards.block_density`); decode: attended blocks over blocks holding real tokens, mean over
        layers (docs/design.md §8, `seer_jax.forwards.decode_logits_and_density`).
      data: what it was measured on, e.g. "distillation data: 8 sequences of 8192 tokens".
    """

    density: float
    data: str

    def __post_init__(self):
        if isinstance(self.density, bool) or not isinstance(self.density, int | float) or not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError(f"data must say what the density was measured on, got {self.data!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adapter:
    """Gates and settings without a base model.

    Attributes:
      seer_config: how the gated model selects blocks, gate structures included (`gate` None: no prefill gates;
        `decode` None: no decode gates).
      base_model: the HF id or local directory of the base model the gates were trained on (for our adapters a
        directory where `read_adapter` found one, module docstring), or None if unknown.
      tensors: tensor name (module docstring) → array.
      base_identity: the base model's config and weight fingerprint (`seer_jax.base_identity`), None if unknown;
        `check_base_identity(adapter.base_identity, base, ...)` compares it with a base before attaching.
      prefill_density, decode_density: the density the default prefill / decode selection reached, if measured.
    """

    seer_config: SeerConfig
    base_model: str | None
    tensors: Mapping[str, jax.Array | np.ndarray]
    base_identity: Mapping[str, Any] | None = None
    prefill_density: MeasuredDensity | None = None
    decode_density: MeasuredDensity | None = None


def gate_tensors(model: SeerCausalLM) -> dict[str, jax.Array]:
    """The model's gate weights (prefill and decode) by tensor name."""
    state = nnx.state(model, GateParam)
    return {".".join(map(str, path)): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def with_decode_selection(seer_config: SeerConfig, decode: DecodeConfig) -> SeerConfig:
    """`seer_config` decoding with `decode`, whose gate fields (`DECODE_GATE_FIELDS`) must equal the present decode
    gates'; only the selection may differ. Raises `ValueError` without decode gates or for another gate structure."""
    if seer_config.decode is None:
        raise ValueError("a decode selection needs decode gates; these gates are prefill gates only")
    changed = [
        f"{name} {getattr(seer_config.decode, name)!r} → {getattr(decode, name)!r}"
        for name in DECODE_GATE_FIELDS
        if getattr(seer_config.decode, name) != getattr(decode, name)
    ]
    if changed:
        raise ValueError(
            f"the decode config changes the decode gates' structure ({'; '.join(changed)}); only its selection may "
            "change"
        )
    return dataclasses.replace(seer_config, decode=decode)


def _recorded_seer_config(
    seer_config: SeerConfig, *, selection: Selection | None = None, decode: DecodeConfig | None = None
) -> SeerConfig:
    """The SeerConfig `save_adapter` records for a model with `seer_config` (module docstring, "Default
    selection"): `selection` and `decode` replace the model's; a prefill selection keeping every block becomes
    `DEFAULT_SELECTION` unless given explicitly."""
    if selection is None and seer_config.gate is not None and seer_config.selection.is_dense:
        selection = DEFAULT_SELECTION
    if selection is not None:
        seer_config = dataclasses.replace(seer_config, selection=selection)
    return seer_config if decode is None else with_decode_selection(seer_config, decode)


def save_adapter(
    model: SeerCausalLM,
    directory: str | Path,
    *,
    base_model: str | Path,
    weights: WeightsFormat = "orbax",
    selection: Selection | None = None,
    decode: DecodeConfig | None = None,
    prefill_density: MeasuredDensity | None = None,
    decode_density: MeasuredDensity | None = None,
) -> None:
    """Writes `model`'s gates (prefill, decode or both) and SeerConfig to a new `directory` (module docstring).

    Args:
      model: the gated model.
      directory: the adapter directory to create.
      base_model: the base model's HF id or directory (a directory is recorded by absolute and relative path).
      weights: how the tensors are stored.
      selection: the default prefill selection to record; None: the model's, or `DEFAULT_SELECTION` when the
        model's keeps every block.
      decode: the decode config to record (its selection: token budget, threshold, ...); None: the model's. Its gate
        fields must be the model's.
      prefill_density, decode_density: the density the recorded prefill / decode selection reached (recorded for
        users to see), if measured. prefill_density needs the selection it was measured with (`selection`, or a
        sparse selection of the model).

    Everything goes to a temporary sibling that is renamed at the end, so a failure never leaves a directory that
    looks complete. In a multi-process job every process calls this; process 0 writes (`seer_jax.multihost`).
    """
    if weights not in ("orbax", "safetensors"):
        raise ValueError(f"weights must be 'orbax' or 'safetensors', got {weights!r}")
    seer_config = _recorded_seer_config(model.seer_config, selection=selection, decode=decode)
    measured_selection = selection is not None or not model.seer_config.selection.is_dense
    if prefill_density is not None and (seer_config.gate is None or not measured_selection):
        raise ValueError("prefill_density needs the prefill selection it was measured with (selection=...)")
    if decode_density is not None and seer_config.decode is None:
        raise ValueError("decode_density given, but the model has no decode gates")
    directory = Path(directory).absolute()
    if directory.exists():
        raise CheckpointError(f"{directory} already exists; choose a new adapter directory or remove it")
    tensors = {name: to_host(value) for name, value in gate_tensors(model).items()}  # gathered: every process
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = shared_staging_dir(directory)
    try:
        if weights == "orbax":
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(staging / ORBAX_DIR, tensors)
                checkpointer.wait_until_finished()
        elif is_primary():
            safetensors.flax.save_file(tensors, str(staging / SAFETENSORS_FILE))
        listing = {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in tensors.items()}
        measured = {
            kind: dataclasses.asdict(value)
            for kind, value in (("prefill", prefill_density), ("decode", decode_density))
            if value is not None
        }
        marker = {
            "format": _format_version(seer_config),
            **_base_location(base_model, directory),
            "seer_config": seer_config.to_dict(),
            "measured_density": measured,
            "weights": weights,
            "tensors": listing,
            "base_identity": base_identity(model),
        }
        if is_primary():
            (staging / ADAPTER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            staging.rename(directory)
        sync(f"save_adapter {directory}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _format_version(seer_config: SeerConfig) -> int:
    decode = seer_config.decode
    if seer_config.quest_weight > 0 or (decode is not None and decode.quest_weight > 0):
        return QUEST_WEIGHT_FORMAT_VERSION
    if seer_config.decode is not None and seer_config.decode.allocation is not None:
        return DECODE_ALLOCATION_FORMAT_VERSION
    return BUDGET_FORMAT_VERSION if seer_config.selection.method == "budget" else FORMAT_VERSION


def record_selection(
    directory: str | Path,
    selection: Selection | None = None,
    *,
    decode: DecodeConfig | None = None,
    prefill_density: MeasuredDensity | None = None,
    decode_density: MeasuredDensity | None = None,
    quest_weight: float | None = None,
) -> None:
    """Makes `selection` the default prefill selection and/or `decode` the decode config of the adapter in
    `directory` (this project's format), each with the density it reached (or none recorded; a replaced selection's
    old density is dropped), and with `quest_weight` the prefill gates' `SeerConfig.quest_weight` (recorded with
    `selection`, which it was calibrated with); the weights are untouched. `decode` must keep the decode gates'
    structure (`with_decode_selection`). The marker file is replaced atomically. In a multi-process job every process
    calls this; process 0 writes."""
    if selection is None and decode is None:
        raise ValueError("record_selection needs a prefill selection, a decode config or both")
    path = Path(directory) / ADAPTER_FILE
    adapter = read_adapter(directory)  # checks the adapter is complete and ours
    if not path.is_file():
        raise CheckpointError(f"{directory} is not in this project's format; save it with save_adapter first")
    seer_config = adapter.seer_config
    # Tensor names hold the layer index (module docstring): model.layers.{L}.self_attn.attn_gate.…
    num_layers = 1 + max(int(name.split(".")[2]) for name in adapter.tensors)
    if quest_weight is not None and selection is None:
        raise ValueError("record_selection: a quest_weight is recorded with the prefill selection calibrated with it")
    if selection is not None:
        weight = seer_config.quest_weight if quest_weight is None else quest_weight
        seer_config = dataclasses.replace(seer_config, selection=selection, quest_weight=weight)  # validates both
        if seer_config.gate is None:
            raise ValueError(f"{directory} has no prefill gates: there is no prefill selection to record")
        if selection.allocation is not None and selection.allocation.num_layers != num_layers:
            raise ValueError(
                f"the budget allocation covers {selection.allocation.num_layers} layers, the adapter's gates "
                f"{num_layers}"
            )
    if decode is not None:
        seer_config = with_decode_selection(seer_config, decode)
        if decode.allocation is not None and decode.allocation.num_layers != num_layers:
            raise ValueError(
                f"the decode allocation covers {decode.allocation.num_layers} layers, the adapter's gates {num_layers}"
            )
    marker = json.loads(path.read_text())
    marker["format"] = _format_version(seer_config)
    marker["seer_config"] = seer_config.to_dict()
    measured = marker.get("measured_density", {})
    for kind, given, density in (("prefill", selection, prefill_density), ("decode", decode, decode_density)):
        if given is not None:
            measured.pop(kind, None)
            if density is not None:
                measured[kind] = dataclasses.asdict(density)
    marker["measured_density"] = measured
    if is_primary():
        staging = path.with_name(f".{ADAPTER_FILE}.tmp")
        staging.write_text(json.dumps(marker, indent=2) + "\n")
        staging.replace(path)
    sync(f"record_selection {directory}")


def _base_location(base_model: str | Path, directory: Path) -> dict[str, str]:
    """The base_model entries of seer_adapter.json: a local directory as absolute and relative path, else as is."""
    path = Path(base_model).expanduser()
    if not path.is_dir():
        return {"base_model": str(base_model)}
    path = Path(os.path.normpath(path.absolute()))
    return {"base_model": str(path), "base_model_relative": os.path.relpath(path, directory)}


def _locate_base(marker: Mapping[str, Any], directory: Path) -> str:
    """The recorded base model: the first local directory among its recorded locations (module docstring), else
    the recorded string (a hub id, or a directory that no longer exists)."""
    recorded = marker["base_model"]
    path = Path(recorded).expanduser()
    candidates = [path]
    if "base_model_relative" in marker:
        candidates.append(directory / marker["base_model_relative"])
    elif not path.is_absolute():  # an older adapter: relative to the working directory of the run that wrote it
        candidates += [ancestor / path for ancestor in directory.absolute().parents]
    for candidate in candidates:
        if candidate.is_dir():
            return os.path.normpath(candidate.absolute())
    return recorded


def read_adapter(directory: str | Path) -> Adapter:
    """Reads an adapter in this project's format or the official one (detected from the files present).

    Raises `CheckpointError` (one line naming the file) for a malformed or incomplete adapter, and for gate weights
    that hold NaN or inf.
    """
    directory = Path(directory)
    if (directory / ADAPTER_FILE).is_file():
        adapter = _read_own(directory)
    elif (directory / "config.json").is_file():
        adapter = _read_official(directory)
    else:
        raise CheckpointError(
            f"{directory} holds neither {ADAPTER_FILE} nor an official SeerAttention config.json; pass an adapter "
            "directory"
        )
    check_finite_gates(adapter.tensors, directory)
    return adapter


def check_finite_gates(tensors: Mapping[str, jax.Array | np.ndarray], directory: str | Path) -> None:
    """Raises `CheckpointError` naming the gate tensors of `directory` that hold NaN or inf."""
    bad = sorted(name for name, value in tensors.items() if not np.isfinite(np.asarray(value, np.float32)).all())
    if bad:
        raise CheckpointError(
            f"{directory}: gate tensor(s) {_listing(bad)} hold NaN/inf; the run that wrote them diverged or the file "
            "is corrupt: use an earlier adapter or retrain the gates"
        )


def _read_own(directory: Path) -> Adapter:
    path = directory / ADAPTER_FILE
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the adapter is corrupt: re-export it") from error
    if not isinstance(marker, dict):
        raise CheckpointError(f"{path} holds {type(marker).__name__}, not a JSON object; re-export the adapter")
    if marker.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{directory} was written in adapter format {marker.get('format')}, this code reads {READABLE_FORMATS}"
        )
    missing = [key for key in ("base_model", "seer_config", "weights", "tensors") if key not in marker]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(map(repr, missing))} entry; the adapter is incomplete")
    listing, weights = marker["tensors"], marker["weights"]
    if weights not in ("orbax", "safetensors"):
        raise CheckpointError(f"{path} names an unknown weights format {weights!r}")
    try:
        target = {name: jax.ShapeDtypeStruct(tuple(entry["shape"]), entry["dtype"]) for name, entry in listing.items()}
        seer_config = SeerConfig.from_dict(marker["seer_config"])
        measured = {kind: MeasuredDensity(**value) for kind, value in marker.get("measured_density", {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path} has a malformed tensors, seer_config or measured_density entry ({error!r})"
        ) from error
    if weights == "orbax":
        tensors = _restore_orbax(directory / ORBAX_DIR, target)
    else:
        tensors = _read_safetensors(directory / SAFETENSORS_FILE)
        found = {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in tensors.items()}
        if found != listing:
            raise CheckpointError(f"{directory / SAFETENSORS_FILE} does not hold the tensors {ADAPTER_FILE} lists")
    return Adapter(
        seer_config=seer_config,
        base_model=None if marker["base_model"] is None else _locate_base(marker, directory),
        tensors=tensors,
        base_identity=marker.get("base_identity"),
        prefill_density=measured.get("prefill"),
        decode_density=measured.get("decode"),
    )


def _restore_orbax(path: Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing; the adapter is incomplete: re-export it")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path.absolute(), target)
    except READ_ERRORS as error:
        raise CheckpointError(f"{describe_read_error(path, error)}; the adapter is corrupt: re-export it") from None


def _read_official(directory: Path) -> Adapter:
    try:
        config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON ({error})") from error
    if (directory / OFFICIAL_SAFETENSORS).is_file():
        tensors = _read_safetensors(directory / OFFICIAL_SAFETENSORS)
    elif (directory / OFFICIAL_PTH).is_file():
        tensors = _read_pth(directory / OFFICIAL_PTH)
    else:
        raise CheckpointError(f"{directory} has no {OFFICIAL_PTH} or {OFFICIAL_SAFETENSORS}")
    try:
        kind = official_kind(tensors)
        norms = any(".attngate_qnorm." in name or ".attngate_knorm." in name for name in tensors)
        seer_config = seer_config_from_official(config, kind, qk_norm_tensors=norms)
    except CheckpointError as error:
        raise CheckpointError(f"{directory}: {error}") from None
    if kind == "decode":
        tensors = {from_official_name(name): value for name, value in tensors.items()}
    return Adapter(
        seer_config=seer_config,
        base_model=config.get("base_model"),
        tensors=tensors,
        base_identity=official_identity(config),
    )


def _read_safetensors(path: Path) -> dict[str, jax.Array]:
    try:
        return safetensors.flax.load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:  # a CheckpointError (ValueError), so that the CLIs print it as one line
        raise CheckpointError(
            f"reading {path.name} needs torch: pip install 'seer-jax[torch]' "
            f"(or save its tensors as {OFFICIAL_SAFETENSORS})"
        ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors and is refused: unpickling them could run "
            f"arbitrary code (torch.load weights_only); save its tensors as a plain state dict or as "
            f"{OFFICIAL_SAFETENSORS}"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable torch file ({_first_line(error)}); it is truncated or corrupt"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    # numpy has no bfloat16: go through float32 (exact) and back to ml_dtypes' bfloat16.
    return {
        name: tensor.float().numpy().astype(jnp.bfloat16) if tensor.dtype == torch.bfloat16 else tensor.numpy()
        for name, tensor in state.items()
    }


def attach_gates(
    base: CausalLM,
    adapter: Adapter,
    *,
    selection: Selection | None = None,
    decode: DecodeConfig | None = None,
    quest_weight: float | None = None,
) -> SeerCausalLM:
    """A `SeerCausalLM` with `base`'s weights (shared, not copied) and the adapter's gates, cast to the base dtype.

    selection: how the prefill gates' scores become blocks; None keeps the adapter's (`adapter.seer_config.selection`).
    quest_weight: the prefill gates' `SeerConfig.quest_weight`; None keeps the adapter's.
    decode: the decode config to decode with (token budget, threshold, ..., with its per-layer allocation or none);
      None keeps the adapter's. Its gate fields must be the adapter's (`with_decode_selection`).

    Raises `CheckpointError` naming the tensors when some are missing, unexpected (another layer count, another
    kind of gate than the seer_config says) or of the wrong shape (another head count, head_dim, gate type or hidden
    size), and `ValueError` for a selection the gates cannot make (a sparse prefill selection without prefill gates,
    a decode config without decode gates or for another decode gate structure).
    """
    seer_config = adapter.seer_config
    if selection is not None:
        if seer_config.gate is None and not selection.is_dense:
            raise ValueError(
                "the adapter has no prefill gates (decode gates only): prefill is dense and cannot select blocks; "
                "combine it with a prefill adapter (combine_adapters) for sparse prefill"
            )
        seer_config = dataclasses.replace(seer_config, selection=selection)
    if quest_weight is not None:
        if seer_config.gate is None and quest_weight:
            raise ValueError("the adapter has no prefill gates: a prefill quest_weight has no gate scores to add to")
        seer_config = dataclasses.replace(seer_config, quest_weight=quest_weight)
    if decode is not None:
        seer_config = with_decode_selection(seer_config, decode)
    allocation = seer_config.selection.allocation
    if allocation is not None and allocation.num_layers != base.config.num_layers:
        raise ValueError(
            f"the budget allocation covers {allocation.num_layers} layers, the model has {base.config.num_layers}; "
            "calibrate it for this model (seer_jax.calibration.budget_for_density)"
        )
    decode_allocation = None if seer_config.decode is None else seer_config.decode.allocation
    if decode_allocation is not None and decode_allocation.num_layers != base.config.num_layers:
        raise ValueError(
            f"the decode allocation covers {decode_allocation.num_layers} layers, the model has "
            f"{base.config.num_layers}; calibrate it for this model (seer_jax.decode_calibration.decode_allocation)"
        )
    seer = seer_with_abstract_gates(base, seer_config)
    graphdef, gates, rest = nnx.split(seer, GateParam, ...)
    targets = {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(gates)}
    unexpected = sorted(set(adapter.tensors) - set(targets))
    if unexpected:
        raise CheckpointError(
            f"adapter tensors {_listing(unexpected)} match no gate of this {base.config.num_layers}-layer model"
            f"{_unexpected_hint(unexpected, seer_config)}; check that the adapter belongs to this base model"
        )
    missing = sorted(set(targets) - set(adapter.tensors))
    if missing:
        raise CheckpointError(
            f"the adapter has no tensor for gate(s) {_listing(missing)}; it is incomplete or its seer_config "
            "(gate_type, hidden_size, force_double; decode q_head_pooling, k_pooling, qk_norm) does not describe "
            "these weights"
        )
    mismatched = [
        f"{name} {list(adapter.tensors[name].shape)} (expected {list(variable.get_value().shape)})"
        for name, variable in targets.items()
        if tuple(adapter.tensors[name].shape) != variable.get_value().shape
    ]
    if mismatched:
        raise CheckpointError(
            f"adapter tensor shape(s) do not fit the model: {_listing(mismatched)}; the adapter was made for "
            "another base model or gate structure"
        )
    for name, variable in targets.items():
        variable.set_value(jnp.asarray(adapter.tensors[name], dtype=variable.get_value().dtype))
    return nnx.merge(graphdef, gates, rest)


def _unexpected_hint(names: list[str], seer_config: SeerConfig) -> str:
    if any(DECODE_MARKER in name for name in names):
        return " (official SeerAttention-R decode-gate names: read the adapter with read_adapter, which renames them)"
    if seer_config.decode is None and any(_DECODE_PATH in name for name in names):
        return " (decode gates, but the seer_config has no decode config)"
    decode = seer_config.decode
    if decode is not None and not decode.qk_norm and any(".attngate_qnorm." in name for name in names):
        return " (decode-gate q/k norm weights, but the decode config has qk_norm False)"
    if seer_config.gate is None and any(_DECODE_PATH not in name for name in names):
        return " (prefill gates, but the seer_config has no prefill gate config)"
    return ""


def combine_adapters(prefill: Adapter | None, decode: Adapter | None) -> Adapter:
    """One adapter with the prefill gates of `prefill` and the decode gates of `decode`; the other kind of gate in
    each is left out. Either may be None (that kind is then absent), not both.

    For example an official SeerAttention prefill adapter and an official SeerAttention-R decode adapter of the same
    base (DeepSeek-R1-Distill-Qwen-14B is the only one with both released): sparse prefill and sparse decode in one
    model. The prefill selection, `source` and `start_layer` come from `prefill`, the decode config from `decode`;
    so do each kind's measured density. The base model is `prefill`'s (`decode`'s without one).

    Raises `CheckpointError` when `prefill` has no prefill gates, `decode` no decode gates, or the two record
    different base models (configs or weight fingerprints).
    """
    if prefill is None and decode is None:
        raise ValueError("combine_adapters needs a prefill adapter, a decode adapter or both")
    if prefill is not None and prefill.seer_config.gate is None:
        raise CheckpointError("the prefill adapter holds no prefill gates (decode gates only)")
    if decode is not None and decode.seer_config.decode is None:
        raise CheckpointError("the decode adapter holds no decode gates (prefill gates only)")
    decode_config = None if decode is None else decode.seer_config.decode
    if prefill is None:
        seer_config = SeerConfig(gate=None, decode=decode_config)
    else:
        seer_config = dataclasses.replace(prefill.seer_config, decode=decode_config)
    tensors = {} if prefill is None else {k: v for k, v in prefill.tensors.items() if _DECODE_PATH not in k}
    if decode is not None:
        tensors.update({name: value for name, value in decode.tensors.items() if _DECODE_PATH in name})
    identities = [adapter.base_identity for adapter in (prefill, decode) if adapter is not None]
    return Adapter(
        seer_config=seer_config,
        base_model=prefill.base_model if prefill is not None and prefill.base_model is not None else decode.base_model,
        tensors=tensors,
        base_identity=_merged_identity(*identities),
        prefill_density=None if prefill is None else prefill.prefill_density,
        decode_density=None if decode is None else decode.decode_density,
    )


def _merged_identity(*identities: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """One base identity holding what each of `identities` records; `CheckpointError` if they disagree."""
    recorded = [identity for identity in identities if identity is not None]
    if not recorded:
        return None
    config, fingerprints, differences = {}, set(), []
    for identity in recorded:
        for name, value in identity.get("config", {}).items():
            if name in config and config[name] != value:
                differences.append(f"{name} {config[name]!r} ≠ {value!r}")
            config.setdefault(name, value)
        fingerprints |= {identity["fingerprint"]} if identity.get("fingerprint") else set()
    if len(fingerprints) > 1:
        differences.append("their base weights differ")
    if differences:
        raise CheckpointError(
            f"the prefill and decode adapters were trained on different base models: {'; '.join(differences)}"
        )
    return {"config": config, **({"fingerprint": fingerprints.pop()} if fingerprints else {})}


def load_seer_model(
    adapter_dir: str | Path,
    *,
    decode_adapter_dir: str | Path | None = None,
    base_path: str | Path | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
    attention_implementation: str = "xla",
    allow_other_base: bool = False,
) -> SeerCausalLM:
    """Loads an adapter (its gates, prefill, decode or both; with `decode_adapter_dir` the decode gates come from that
    adapter, `combine_adapters`) and its base model, and attaches the gates; dtypes as in `checkpoint.load_model`.

    The base model is `base_path`, else the adapter's `base_model` (a local directory, or a hub id in the local
    Hugging Face cache: `seer_jax.model_path`). A base other than the one the adapters recorded is refused
    (`CheckpointError`) unless `allow_other_base`.
    """
    adapter = read_adapter(adapter_dir)
    if decode_adapter_dir is not None:
        adapter = combine_adapters(adapter, read_adapter(decode_adapter_dir))
    if base_path is None:
        if adapter.base_model is None:
            raise CheckpointError(f"the adapter {adapter_dir} names no base model; pass base_path")
        try:
            base_path = resolve_model_path(adapter.base_model, flag="the adapter's base_model")
        except ModelPathError as error:
            raise CheckpointError(f"{error} as base_path") from None
    base, _ = load_model(
        base_path, dtype=dtype, param_dtype=param_dtype, attention_implementation=attention_implementation
    )
    check_base_identity(adapter.base_identity, base, adapter=str(adapter_dir), allow_other_base=allow_other_base)
    return attach_gates(base, adapter)


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (library errors can run to pages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
