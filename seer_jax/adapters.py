"""Gate adapters: a SeerAttention model's AttnGate weights and settings, stored apart from its frozen base model.

Tensor names are the official ones, which are also the gates' state paths joined by dots:
`model.layers.{L}.self_attn.attn_gate.mask_linear_k.weight` ([N, Ck, E] single-linear, [K, Ck, E] double-linear)
and, double-linear only, `…attn_gate.mask_linear_q.weight` ([N, Cq, E]); see `seer_jax.gate`.

This project's format, a directory written by `save_adapter`:

    seer_adapter.json    {"format": 1, "base_model": <HF id or path>, "seer_config": SeerConfig.to_dict(),
                          "weights": "orbax" | "safetensors", "tensors": {name: {"shape": [...], "dtype": ...}},
                          "base_identity": {"config", "fingerprint"} (`seer_jax.base_identity`; optional)};
                         written last, so its presence means the directory is complete
    gates/               Orbax checkpoint of {name: array}           (weights "orbax")
    gates.safetensors    the same tensors                             (weights "safetensors")

The official format (microsoft/SeerAttention prefill adapters, docs/design.md §9), read by `read_adapter` too:

    config.json                       the base config plus `seerattn_*` keys and `base_model`
    attn_gate_weights.pth             torch state dict of the gate tensors (reading it needs torch:
                                      pip install 'seer-jax[torch]'), or
    attn_gate_weights.safetensors     the same tensors

`attach_gates(base, adapter)` checks the tensors against the model (every layer's gates present, nothing else,
shapes exact) and returns a `SeerCausalLM` sharing the base model's weights, selecting blocks as the adapter's
`seer_config` says or with the `Selection` passed as `selection=`; `load_seer_model` also loads the base model with
`seer_jax.checkpoint.load_model`.
"""

import dataclasses
import json
import logging
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
from seer_jax.gate import GateConfig, GateParam
from seer_jax.hf_weights import CheckpointError
from seer_jax.model import CausalLM
from seer_jax.multihost import is_primary, shared_staging_dir, sync, to_host
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
WeightsFormat = Literal["orbax", "safetensors"]

# Official prefill config keys and their defaults at the official HEAD (docs/design.md §9).
_OFFICIAL_DEFAULTS = {
    "seerattn_sparsity_method": "threshold",
    "seerattn_threshold": 0.0,
    "seerattn_nz_ratio": 1.0,
    "seerattn_gate_type": "Qavg_Kmaxminavg",
    "seerattn_gate_block_size": 64,
    "seerattn_gate_hidden_size": 128,
    "seerattn_last_block_dense": True,
    "seerattn_gate_force_double": False,
}
# Keys only SeerAttention-R decode adapters have.
_DECODE_KEYS = ("seerattn_k_seq_pooling_type", "seerattn_q_head_pooling_type", "seerattn_token_budget")
_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adapter:
    """Gates and settings without a base model.

    Attributes:
      seer_config: how the gated model selects blocks (gate structure included).
      base_model: the HF id or path of the base model the gates were trained on, or None if unknown.
      tensors: official tensor name → array [heads, in, E].
      base_identity: the base model's config and weight fingerprint (`seer_jax.base_identity`), None if unknown;
        `check_base_identity(adapter.base_identity, base, ...)` compares it with a base before attaching.
    """

    seer_config: SeerConfig
    base_model: str | None
    tensors: Mapping[str, jax.Array | np.ndarray]
    base_identity: Mapping[str, Any] | None = None


def gate_tensors(model: SeerCausalLM) -> dict[str, jax.Array]:
    """The model's gate weights by official tensor name."""
    state = nnx.state(model, GateParam)
    return {".".join(map(str, path)): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def save_adapter(
    model: SeerCausalLM, directory: str | Path, *, base_model: str, weights: WeightsFormat = "orbax"
) -> None:
    """Writes `model`'s gates and SeerConfig to a new `directory` (see the module docstring).

    Everything goes to a temporary sibling that is renamed at the end, so a failure never leaves a directory that
    looks complete. In a multi-process job every process calls this; process 0 writes (`seer_jax.multihost`).
    """
    if weights not in ("orbax", "safetensors"):
        raise ValueError(f"weights must be 'orbax' or 'safetensors', got {weights!r}")
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
        marker = {
            "format": FORMAT_VERSION,
            "base_model": base_model,
            "seer_config": model.seer_config.to_dict(),
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
    if marker.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} was written in adapter format {marker.get('format')}, this code reads {FORMAT_VERSION}"
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
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} has a malformed tensors or seer_config entry ({error!r})") from error
    if weights == "orbax":
        tensors = _restore_orbax(directory / ORBAX_DIR, target)
    else:
        tensors = _read_safetensors(directory / SAFETENSORS_FILE)
        found = {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in tensors.items()}
        if found != listing:
            raise CheckpointError(f"{directory / SAFETENSORS_FILE} does not hold the tensors {ADAPTER_FILE} lists")
    return Adapter(
        seer_config=seer_config,
        base_model=marker["base_model"],
        tensors=tensors,
        base_identity=marker.get("base_identity"),
    )


def _restore_orbax(path: Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing; the adapter is incomplete: re-export it")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path.absolute(), target)
    except READ_ERRORS as error:
        raise CheckpointError(f"{describe_read_error(path, error)}; the adapter is corrupt: re-export it") from None


def seer_config_from_official(config: Mapping[str, Any]) -> SeerConfig:
    """The SeerConfig of an official prefill adapter's config.json (defaults as the official code's, §9)."""
    keys = {key for key in config if key.startswith("seerattn_")}
    decode_keys = sorted(keys & set(_DECODE_KEYS))
    if decode_keys:
        raise CheckpointError(
            f"config.json has SeerAttention-R decode-gate keys {decode_keys}: only prefill adapters are supported"
        )
    if not keys:
        raise CheckpointError(
            "config.json has no seerattn_* keys: not a SeerAttention prefill adapter (V1 adapters are not supported)"
        )
    ignored = sorted(keys - set(_OFFICIAL_DEFAULTS))
    if ignored:
        _logger.warning("ignoring config.json keys this reader does not know: %s", ignored)
    values = {key: config.get(key, default) for key, default in _OFFICIAL_DEFAULTS.items()}
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
    return Adapter(
        seer_config=seer_config_from_official(config),
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
    except ImportError as error:
        raise ImportError(
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


def attach_gates(base: CausalLM, adapter: Adapter, *, selection: Selection | None = None) -> SeerCausalLM:
    """A `SeerCausalLM` with `base`'s weights (shared, not copied) and the adapter's gates, cast to the base dtype.

    selection: how the gates' scores become blocks; None keeps the adapter's (`adapter.seer_config.selection`).

    Raises `CheckpointError` naming the tensors when some are missing, unexpected (another layer count, decode
    gates) or of the wrong shape (another head count, head_dim, gate type or hidden size).
    """
    seer_config = adapter.seer_config
    if selection is not None:
        seer_config = dataclasses.replace(seer_config, selection=selection)
    seer = seer_with_abstract_gates(base, seer_config)
    graphdef, gates, rest = nnx.split(seer, GateParam, ...)
    targets = {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(gates)}
    unexpected = sorted(set(adapter.tensors) - set(targets))
    if unexpected:
        hint = " (SeerAttention-R decode gates are not supported)" if any("attngate" in n for n in unexpected) else ""
        raise CheckpointError(
            f"adapter tensors {_listing(unexpected)} match no gate of this {base.config.num_layers}-layer model"
            f"{hint}; check that the adapter belongs to this base model"
        )
    missing = sorted(set(targets) - set(adapter.tensors))
    if missing:
        raise CheckpointError(
            f"the adapter has no tensor for gate(s) {_listing(missing)}; it is incomplete or its seer_config "
            "(gate_type, hidden_size, force_double) does not describe these weights"
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


def load_seer_model(
    adapter_dir: str | Path,
    *,
    base_path: str | Path | None = None,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
    attention_implementation: str = "xla",
    allow_other_base: bool = False,
) -> SeerCausalLM:
    """Loads an adapter and its base model (`base_path`, else the adapter's `base_model`, which must then be a
    local converted or Hugging Face directory) and attaches the gates; dtypes as in `checkpoint.load_model`.
    A base other than the one the adapter recorded is refused (`CheckpointError`) unless `allow_other_base`."""
    adapter = read_adapter(adapter_dir)
    if base_path is None:
        if adapter.base_model is None or not Path(adapter.base_model).is_dir():
            raise CheckpointError(
                f"the adapter's base_model {adapter.base_model!r} is not a local directory; pass base_path"
            )
        base_path = adapter.base_model
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
