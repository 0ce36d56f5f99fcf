"""Command-line flags that several CLIs share: the data source, and the device mesh.

    --data PATH...                   document files or directories (`train.documents`)
    --tokenizer-dir, --text-field, --corpus-cache
    --mesh data=1,fsdp=2,tensor=2    run on a device mesh (`seer_jax.sharding`); left out: one device
    --distributed                    first join a multi-host job (`jax.distributed.initialize()`, which reads the
                                     cluster's environment: SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS & co.)

The mesh spans every device of every process; its axis sizes must multiply to that count. jax is imported only when
a mesh is parsed, so that a CLI's `--help` needs none.
"""

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seer_jax.sharding import MeshConfig


def add_corpus_arguments(parser: argparse.ArgumentParser, *, data_required: bool) -> None:
    """The flags of a `train.token_corpus.CorpusConfig` (the tokenizer defaults to the model's, `--model`)."""
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=data_required,
        help="document files or directories (txt, jsonl[.gz], parquet)",
    )
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer directory (default: --model)")
    parser.add_argument("--text-field", default="text", help="text column of json/jsonl/parquet data")
    parser.add_argument("--corpus-cache", type=Path, help="cache directory for the tokenized corpus")


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mesh",
        help="device mesh as data=D,fsdp=F,tensor=T (product = device count; e.g. data=2 or tensor=2); default: one "
        "device",
    )
    parser.add_argument(
        "--distributed", action="store_true", help="join a multi-host job first (jax.distributed.initialize)"
    )


def mesh_from_args(args: argparse.Namespace, log: logging.Logger) -> "MeshConfig | None":
    """Joins the multi-host job when asked, parses `--mesh` (ValueError on a bad one) and logs it once on `log`."""
    import jax

    from seer_jax.sharding import MeshConfig, build_mesh

    if args.distributed:
        jax.distributed.initialize()
    if args.mesh is None:
        return None
    config = MeshConfig.parse(args.mesh)
    build_mesh(config)  # checks the device count now, before any loading; the run builds its own
    devices = jax.devices()
    log.info(
        "mesh %s over %d %s device(s), %d process(es)", config, len(devices), devices[0].platform, jax.process_count()
    )
    return config
