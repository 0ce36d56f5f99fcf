"""Hugging Face safetensors checkpoints → a model's parameter state, without torch, one tensor at a time.

Name map. An HF tensor name is the model's state path, with `weight` renamed by the kind of module that owns it:

| HF module name                         | HF leaf  | our leaf    | layout change          |
| -------------------------------------- | -------- | ----------- | ---------------------- |
| `embed_tokens`                         | `weight` | `embedding` | none ([V, D])          |
| `*norm` (`input_layernorm`, `q_norm`…) | `weight` | `scale`     | none                   |
| `*_proj`, `lm_head`                    | `weight` | `kernel`    | transpose [out, in] → [in, out] |
| any                                    | `bias`   | `bias`      | none                   |

and numeric parts become list indices: `model.layers.3.self_attn.q_proj.weight` ↔
`('model', 'layers', 3, 'self_attn', 'q_proj', 'kernel')`. `rotary_emb.inv_freq` buffers (in some older Llama
checkpoints) are derived from the config and skipped.

Loading is strict: every HF tensor must map to a parameter, every parameter must be filled, every shape must match;
each failure raises `CheckpointError` with one line that lists the offending names and says what to do. Tensors are
read lazily with `safetensors.safe_open(..., framework="flax")` (which handles bf16), transposed and cast to the
parameter's dtype one at a time, so peak memory is the model plus one tensor.
"""

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# (HF module-name pattern, our leaf name for its `weight`, transpose [out, in] → [in, out])
_WEIGHT_RULES = (
    (re.compile(r"(.+\.)?embed_tokens"), "embedding", False),
    (re.compile(r"(.+\.)?\w*norm"), "scale", False),
    (re.compile(r"(.+\.)?(\w+_proj|lm_head)"), "kernel", True),
)
_SKIPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LEAF_TO_HF = {"embedding": "weight", "scale": "weight", "kernel": "weight", "bias": "bias"}

StatePath = tuple[str | int, ...]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


def hf_name_to_state_path(name: str) -> tuple[StatePath, bool] | None:
    """HF tensor name → (state path, whether to transpose), or None when no rule applies."""
    module, _, leaf = name.rpartition(".")
    if leaf == "bias":
        ours, transpose = "bias", False
    elif leaf == "weight":
        rule = next((rule for rule in _WEIGHT_RULES if rule[0].fullmatch(module)), None)
        if rule is None:
            return None
        _, ours, transpose = rule
    else:
        return None
    parts = tuple(int(part) if part.isdigit() else part for part in module.split("."))
    return (*parts, ours), transpose


def state_path_to_hf_name(path: StatePath) -> str:
    """The inverse of `hf_name_to_state_path` (for messages)."""
    *module, leaf = path
    return ".".join(str(part) for part in (*module, _LEAF_TO_HF.get(str(leaf), leaf)))


def list_hf_tensors(hf_dir: str | Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from `model.safetensors.index.json` or a single `model.safetensors`."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory; pass a Hugging Face model directory")
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index ({error!r}); re-download the checkpoint"
            ) from error
        files = {name: hf_dir / file for name, file in weight_map.items()}
        missing = sorted({str(path.name) for path in files.values() if not path.is_file()})
        if missing:
            raise CheckpointError(
                f"{INDEX_FILE} in {hf_dir} lists shard files that are missing: {_listing(missing)}; "
                "re-download the checkpoint"
            )
        for file in sorted(set(files.values())):
            names_in_file = set(_read_header_names(file))
            listed = {name for name, path in files.items() if path == file}
            if names_in_file != listed:
                absent, unlisted = sorted(listed - names_in_file), sorted(names_in_file - listed)
                raise CheckpointError(
                    f"{file.name} does not match {INDEX_FILE} (missing: {_listing(absent) or 'none'}; "
                    f"not in the index: {_listing(unlisted) or 'none'}); re-download the checkpoint"
                )
        return files
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _read_header_names(single)}
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pth")):
        raise CheckpointError(f"{hf_dir} holds only torch pickle weights; re-save them as safetensors")
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}; point at a Hugging Face model directory")


def load_hf_state(
    abstract_state: nnx.State,
    hf_dir: str | Path,
    *,
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
    shardings: Mapping[StatePath, jax.sharding.Sharding] | None = None,
) -> nnx.State:
    """Fills `abstract_state` (from `nnx.split(nnx.eval_shape(...))`) with the HF checkpoint's tensors, in place.

    Each tensor is cast to the dtype of the abstract parameter it fills. `progress` wraps the iteration over tensor
    names (e.g. `tqdm`). Returns `abstract_state`, now holding arrays on the default device, or, with `shardings`
    (state path → sharding), each placed as given as soon as it is read (one whole tensor at a time on the default
    device).
    """
    files = list_hf_tensors(hf_dir)
    targets = {path: variable for path, variable in nnx.to_flat_state(abstract_state)}
    mapping: dict[str, tuple[StatePath, bool]] = {}
    unmapped = []
    for name in files:
        if _SKIPPED.fullmatch(name):
            continue
        mapped = hf_name_to_state_path(name)
        if mapped is None or mapped[0] not in targets:
            unmapped.append(name)
        else:
            mapping[name] = mapped
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} tensor(s) in {hf_dir} match no model parameter: {_listing(sorted(unmapped))}; "
            "check that config.json (model_type, tie_word_embeddings, biases) describes these weights"
        )
    filled = {path for path, _ in mapping.values()}
    missing = sorted(state_path_to_hf_name(path) for path in targets if path not in filled)
    if missing:
        raise CheckpointError(
            f"{len(missing)} model parameter(s) have no tensor in {hf_dir}: {_listing(missing)}; "
            "the checkpoint is incomplete or config.json does not match it"
        )

    by_file: dict[Path, list[str]] = {}
    for name in mapping:
        by_file.setdefault(files[name], []).append(name)
    mismatched = []
    for file, names in by_file.items():
        with _open(file) as reader:
            for name in names:
                path, transpose = mapping[name]
                shape = tuple(reader.get_slice(name).get_shape())
                expected = targets[path].get_value().shape
                if (shape[::-1] if transpose else shape) != expected:
                    hf_expected = expected[::-1] if transpose else expected
                    mismatched.append(f"{name} {list(shape)} (expected {list(hf_expected)})")
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} tensor shape(s) do not fit the model: {_listing(mismatched)}; "
            "config.json does not describe this checkpoint"
        )

    names_in_order = [name for names in by_file.values() for name in names]  # grouped by file
    reader_file, reader = None, None
    for name in progress(names_in_order):
        if files[name] != reader_file:
            reader_file = files[name]
            reader = _open(reader_file)  # drops (and unmaps) the previous file's reader
        path, transpose = mapping[name]
        tensor = _read_tensor(reader, name, reader_file)
        if transpose:
            tensor = tensor.T
        target = targets[path]
        value = jnp.asarray(tensor, dtype=target.get_value().dtype)
        target.set_value(value if shardings is None else jax.device_put(value, shardings[path]))
    return abstract_state


def _read_tensor(reader, name: str, file: Path) -> jax.Array:
    try:
        return reader.get_tensor(name)
    except SafetensorError as error:
        raise CheckpointError(f"cannot read {name} from {file} ({error}); re-download the checkpoint") from error


def _open(file: Path):
    try:
        return safe_open(str(file), framework="flax")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({error}); it may be truncated or corrupt: re-download it"
        ) from error


def _read_header_names(file: Path) -> list[str]:
    with _open(file) as reader:
        return list(reader.keys())


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"
