"""Convert a Hugging Face Llama-family checkpoint to a seer-jax (Orbax) directory, without torch.

    python -m convert.hf_to_flax --hf-dir DIR_OR_HUB_ID --out DIR [--dtype bfloat16|float32]

Reads `config.json` and the safetensors weights (a single `model.safetensors` or shards listed in
`model.safetensors.index.json`; a hub id is read from the local Hugging Face cache, offline: `seer_jax.model_path`)
one tensor at a time, checks that every tensor maps to a parameter, every parameter is filled and every shape
matches, and writes the directory described in `seer_jax.checkpoint` (params as Orbax; config.json, the tokenizer
with its chat template and generation_config.json copied: `seer_jax.model_files`). The output appears only when
complete; on any error the command prints one line saying what to do and exits with status 1.

Safetensors files carry no checksum: a flipped byte inside tensor data converts silently. Verify the files against
the SHA-256 their source lists (the Hugging Face Hub shows one per LFS file) before converting.
"""

import argparse
import dataclasses
import logging
from pathlib import Path

from seer_jax.model_path import resolve_model_path

DTYPES = ("bfloat16", "float32")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Attributes: hf_dir (HF model directory), out_dir (must not exist), dtype (of the saved weights)."""

    hf_dir: Path
    out_dir: Path
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.hf_dir.is_dir():
            raise ValueError(f"--hf-dir {self.hf_dir} is not a directory; pass a Hugging Face model directory")
        if self.out_dir.exists():
            raise ValueError(f"--out {self.out_dir} already exists; choose a new directory or remove it")


def convert(config: ConvertConfig) -> None:
    import jax.numpy as jnp  # here, not at the top: `--help` answers without loading jax
    from tqdm import tqdm

    from seer_jax.checkpoint import load_model, save_converted

    dtype = jnp.dtype(config.dtype)
    progress = lambda names: tqdm(names, desc="tensors", unit="tensor")
    model, _ = load_model(config.hf_dir, dtype=dtype, param_dtype=dtype, progress=progress)
    save_converted(model, config.out_dir, hf_dir=config.hf_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m convert.hf_to_flax",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--hf-dir", required=True, help="Hugging Face model directory, or a hub id in the local Hugging Face cache"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", default="bfloat16", help=f"dtype of the saved weights: {' or '.join(DTYPES)}")
    args = parser.parse_args(argv)
    # force: an imported library may have configured the root logger already. The root stays at WARNING, so only
    # this CLI's own INFO lines are shown, not the libraries'.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)
    try:
        hf_dir = resolve_model_path(args.hf_dir, flag="--hf-dir")
        config = ConvertConfig(hf_dir=hf_dir, out_dir=args.out, dtype=args.dtype)
        log.info("%s", config)
        convert(config)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {error}") from None
    log.info("wrote %s", config.out_dir)


if __name__ == "__main__":
    main()
