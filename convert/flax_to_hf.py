"""Export a seer-jax model to a Hugging Face directory that `transformers` loads.

    python -m convert.flax_to_hf --model DIR --out DIR [--dtype bfloat16|float32] [--max-shard-gb 5]

`--model` is a converted directory (`convert.hf_to_flax`, or the `model/` a `train.finetune` run writes); an HF
directory or a hub id in the local Hugging Face cache (`seer_jax.model_path`) works too. The output holds
`config.json` (the model's, RoPE settings such as YaRN included, `dtype` set), safetensors weights under HF names in
HF's [out, in] layout (sharded with an index beyond `--max-shard-gb`; no `lm_head` with tied embeddings) and the
tokenizer with its chat template and generation_config.json (`seer_jax.model_files`). It appears only when complete;
on any error the command prints one line saying what to do and exits with status 1.
"""

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from seer_jax.model_path import resolve_model_path

# seer_jax.hf_export.EXPORT_DTYPES, written out so that `--help` answers without loading jax (a test checks it).
EXPORT_DTYPES = ("bfloat16", "float32")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """model_dir: converted (or HF) directory. out_dir: must not exist. dtype: of the written weights.
    max_shard_gb: largest safetensors file, in GiB.
    """

    model_dir: Path
    out_dir: Path
    dtype: str = "bfloat16"
    max_shard_gb: float = 5.0

    def __post_init__(self):
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {self.dtype!r}")
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"--model {self.model_dir} holds no config.json; pass a converted model directory")
        if self.out_dir.exists():
            raise ValueError(f"--out {self.out_dir} already exists; choose a new directory or remove it")
        if not self.max_shard_gb > 0:
            raise ValueError(f"--max-shard-gb must be positive, got {self.max_shard_gb}")


def export(config: ExportConfig) -> None:
    import jax.numpy as jnp  # here, not at the top: `--help` answers without loading jax
    from tqdm import tqdm

    from seer_jax.checkpoint import load_model
    from seer_jax.hf_export import save_hf

    dtype = jnp.dtype(config.dtype)
    progress = lambda names: tqdm(names, desc="tensors", unit="tensor")
    model, _ = load_model(config.model_dir, dtype=dtype, param_dtype=dtype, progress=progress)
    save_hf(
        model,
        json.loads((config.model_dir / "config.json").read_text()),
        config.out_dir,
        dtype=config.dtype,
        copy_from=config.model_dir,
        max_shard_bytes=int(config.max_shard_gb * 1024**3),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m convert.flax_to_hf",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="converted model directory (or HF directory, hub id)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument(
        "--dtype", default="bfloat16", help=f"dtype of the written weights: {' or '.join(EXPORT_DTYPES)}"
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, in GiB")
    args = parser.parse_args(argv)
    # force: an imported library may have configured the root logger already. The root stays at WARNING, so only
    # this CLI's own INFO lines are shown, not the libraries'.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)
    try:
        model_dir = resolve_model_path(args.model)
        config = ExportConfig(model_dir=model_dir, out_dir=args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb)
        log.info("%s", config)
        export(config)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {error}") from None
    log.info("wrote %s", config.out_dir)


if __name__ == "__main__":
    main()
