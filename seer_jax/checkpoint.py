"""Loading models: from a converted (Orbax) directory or straight from a Hugging Face directory.

A converted directory, written by `save_converted` (the `convert.hf_to_flax` CLI), holds:

    config.json         the HF config, verbatim (read with `ModelConfig.from_hf`)
    params/             Orbax checkpoint of the `nnx.Param` state as a pure dict (state paths as keys)
    seer_jax.json       {"format": 1, "param_dtype": ...}; written last, so its presence means the directory is complete
    tokenizer files     the tokenizer, its chat template and generation_config.json, copied from the HF directory
                        (`seer_jax.model_files`)

`load_model(path)` detects which kind of directory it is given, builds the model abstractly with `nnx.eval_shape` (no
random init) and fills it, so loading needs memory for the weights only.
"""

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from seer_jax.config import ModelConfig
from seer_jax.hf_weights import CheckpointError, load_hf_state
from seer_jax.model import CausalLM
from seer_jax.model_files import copy_model_files
from seer_jax.multihost import is_primary, shared_staging_dir, sync
from seer_jax.orbax_errors import READ_ERRORS, describe_read_error
from seer_jax.sharding import logical_rules, tree_shardings

MARKER_FILE = "seer_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def abstract_model(
    config: ModelConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention_implementation: str = "xla",
) -> CausalLM:
    """A `CausalLM` whose parameters are `jax.ShapeDtypeStruct`s (nothing allocated), ready to be filled."""
    return nnx.eval_shape(
        lambda: CausalLM(
            config,
            attention_implementation=attention_implementation,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
    )


def is_converted(path: str | Path) -> bool:
    """True for a complete directory written by `save_converted`."""
    return (Path(path) / MARKER_FILE).is_file()


def load_model(
    path: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
    attention_implementation: str = "xla",
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
    mesh: Mesh | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """Loads a converted directory or a Hugging Face directory (config.json + safetensors).

    Args:
      path: the directory.
      dtype: compute dtype.
      param_dtype: weight dtype; None means `dtype`. Weights are cast to it on load.
      attention_implementation: see `CausalLM`.
      progress: wraps the per-tensor iteration when reading an HF directory (e.g. `tqdm`).
      mesh: place every weight on this mesh as it is read (`seer_jax.sharding` rules), so a model larger than one
        device loads; None: the default device.

    Returns:
      (model, config).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no config.json in {path}; pass a converted or a Hugging Face model directory")
    config = ModelConfig.from_hf(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    model = abstract_model(
        config, dtype=dtype, param_dtype=param_dtype, attention_implementation=attention_implementation
    )
    graphdef, state = nnx.split(model)
    shardings = None if mesh is None else tree_shardings(state, mesh, logical_rules(config, mesh))
    if is_converted(path):
        _restore_converted(path, state, shardings)
    else:
        flat = None if shardings is None else {key: var.get_value() for key, var in nnx.to_flat_state(shardings)}
        load_hf_state(state, path, progress=progress, shardings=flat)
    return nnx.merge(graphdef, state), config


def _restore_converted(path: Path, state: nnx.State, shardings: nnx.State | None) -> None:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path / MARKER_FILE} is not valid JSON ({error}); convert the model again") from None
    if marker.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in format {marker.get('format')}, this code reads {FORMAT_VERSION}; re-convert it"
        )
    saved_dtype = jnp.dtype(marker["param_dtype"])
    abstract = nnx.to_pure_dict(state)
    # Orbax reads each device's shard straight into place. Without a mesh, every array goes whole to this process's
    # first device: left unsaid, Orbax would place it as it was saved, on devices (and processes) of another run.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, saved_dtype, sharding=device), abstract)
    if shardings is not None:
        target = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            target,
            nnx.to_pure_dict(shardings),
        )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore((path / PARAMS_DIR).absolute(), target)
    except READ_ERRORS as error:
        raise CheckpointError(
            f"{describe_read_error(path / PARAMS_DIR, error)}; the converted model {path} is corrupt: convert it "
            "again (python -m convert.hf_to_flax) or restore it from a copy"
        ) from None
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda value, leaf: value.astype(leaf.dtype), restored, abstract))


def save_converted(model: CausalLM, out_dir: str | Path, *, hf_dir: str | Path) -> None:
    """Writes `model`'s parameters, `hf_dir`'s config.json and tokenizer files to `out_dir` (see module docstring).

    Everything is written to a temporary sibling directory that is renamed to `out_dir` at the end, so a failure
    never leaves a directory that looks complete. `out_dir` must not exist. In a multi-process job every process
    calls this (each writes its own shards of the parameters; process 0 the rest, `seer_jax.multihost`).
    """
    out_dir, hf_dir = Path(out_dir).absolute(), Path(hf_dir)
    if out_dir.exists():
        raise CheckpointError(f"{out_dir} already exists; choose a new output directory or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"all parameters must share one dtype to be saved, got {sorted(map(str, dtypes))}")
    staging = shared_staging_dir(out_dir)
    try:
        with ocp.StandardCheckpointer() as checkpointer:  # in a multi-process job, each process writes its shards
            checkpointer.save(staging / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        if is_primary():
            shutil.copyfile(hf_dir / "config.json", staging / "config.json")
            copy_model_files(hf_dir, staging)
            marker = {"format": FORMAT_VERSION, "param_dtype": str(dtypes.pop())}
            (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            staging.rename(out_dir)
        sync(f"save_converted {out_dir}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
