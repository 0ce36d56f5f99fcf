"""A model → a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

The inverse of `seer_jax.hf_weights`: every `nnx.Param` is written under its HF name (`state_path_to_hf_name`;
each name is checked to map back to its own state path), Linear kernels transposed back to HF's [out, in]. A model
with tied embeddings has no `lm_head` parameter, so none is written, as `save_pretrained` does. The directory holds

    config.json                          the given HF config, with `dtype` set to the weights' dtype
    model.safetensors                    or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer / generation files         copied from `copy_from` when present (`seer_jax.model_files`)

Shards hold at most `max_shard_bytes` (one tensor larger than that gets a shard of its own); tensors are cast and
moved to the host one shard at a time. Everything is written to a temporary sibling directory that is renamed to
`out_dir` at the end, so a failure never leaves a directory that looks complete. In a multi-process job every
process calls `save_hf`: each tensor is gathered from the processes holding its shards, and process 0 writes
(`seer_jax.multihost`).
"""

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.flax import save_file

from seer_jax.config import ModelConfig
from seer_jax.hf_weights import INDEX_FILE, SINGLE_FILE, CheckpointError, hf_name_to_state_path, state_path_to_hf_name
from seer_jax.model import CausalLM
from seer_jax.model_files import copy_model_files
from seer_jax.multihost import is_primary, shared_staging_dir, sync, to_host

EXPORT_DTYPES = ("bfloat16", "float32")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # save_pretrained's default shard size


def save_hf(
    model: CausalLM,
    hf_config: Mapping[str, Any],
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    copy_from: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `model` as an HF directory `out_dir` (which must not exist); see the module docstring.

    Args:
      model: the model to export.
      hf_config: its HF config.json dict; must describe `model.config` exactly (`ModelConfig.from_hf`).
      out_dir: the directory to create.
      dtype: the weights' dtype, one of `EXPORT_DTYPES`.
      copy_from: a directory whose tokenizer and generation-config files are copied along, or None.
      max_shard_bytes: the largest safetensors file.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {EXPORT_DTYPES}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: {max_shard_bytes} must be positive")
    if ModelConfig.from_hf(hf_config) != model.config:
        raise ValueError("hf_config does not describe the model's config (ModelConfig.from_hf(hf_config) differs)")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; choose a new output directory or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(model)
    staging = shared_staging_dir(out_dir)
    try:
        _write_weights(staging, tensors, jnp.dtype(dtype), max_shard_bytes)
        if is_primary():
            config = {key: value for key, value in hf_config.items() if key != "torch_dtype"}
            (staging / "config.json").write_text(json.dumps({**config, "dtype": dtype}, indent=2) + "\n")
            if copy_from is not None:
                copy_model_files(copy_from, staging)
            staging.rename(out_dir)
        sync(f"save_hf {out_dir}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _hf_tensors(model: CausalLM) -> list[tuple[str, nnx.Variable, bool]]:
    """(HF name, parameter, transpose) for every parameter, in state order."""
    out = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = state_path_to_hf_name(path)
        mapped = hf_name_to_state_path(name)
        if mapped is None or mapped[0] != path:
            raise CheckpointError(f"parameter {path} has no HF name that maps back to it (got {name!r})")
        out.append((name, variable, mapped[1]))
    return out


def _write_weights(
    staging: Path, tensors: list[tuple[str, nnx.Variable, bool]], dtype: jnp.dtype, max_shard_bytes: int
) -> None:
    shards: list[list[tuple[str, nnx.Variable, bool]]] = [[]]
    shard_bytes = 0
    for entry in tensors:
        size = int(np.prod(entry[1].get_value().shape)) * dtype.itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += size
    file_names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map, total_size = {}, 0
    for file_name, shard in zip(file_names, shards, strict=True):
        arrays = {}
        for name, variable, transpose in shard:
            value = variable.get_value()
            arrays[name] = to_host(jnp.asarray(value.T if transpose else value, dtype))  # cast on the devices
            weight_map[name] = file_name
            total_size += arrays[name].size * dtype.itemsize
        if is_primary():
            save_file(arrays, staging / file_name, metadata={"format": "pt"})
    if len(shards) > 1 and is_primary():
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
