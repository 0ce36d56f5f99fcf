"""Command-line flags that several CLIs share: the data source, and the device mesh.

    --data PATH...                   document files or directories (`train.documents`)
    --tokenizer-dir, --text-field, --corpus-cache
    --mesh data=1,fsdp=2,tensor=2    run on a device mesh (`seer_jax.sharding`); left out: one device
    --distributed                    first join a multi-process job (`jax.distributed.initialize()`, which reads a
                                     cluster's environment: SLURM, Open MPI, ...); elsewhere also
    --coordinator HOST:PORT          process 0's address and a free port (or JAX_COORDINATOR_ADDRESS),
    --num-processes N --process-id I the number of processes and this one's index

The mesh spans every device of every process; its axis sizes must multiply to that count. Every process runs the
same command and reads the same data; process 0 alone logs at INFO, shows progress and writes the run's files
(`seer_jax.multihost`). jax is imported only when a mesh is parsed, so that a CLI's `--help` needs none.
"""

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seer_jax.sharding import MeshConfig


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows each flag's default: "(default: X)" is appended unless the help states it already, there is
    none (None) or the flag is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if "default" in text or action.default in (None, argparse.SUPPRESS) or switch:
            return text
        return f"{text} (default: %(default)s)"


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
        "--distributed", action="store_true", help="join a multi-process job first (jax.distributed.initialize)"
    )
    parser.add_argument(
        "--coordinator",
        help="with --distributed: process 0's HOST:PORT (default: JAX_COORDINATOR_ADDRESS or the cluster's)",
    )
    parser.add_argument(
        "--num-processes", type=int, help="with --distributed: processes in the job (default: the cluster's)"
    )
    parser.add_argument(
        "--process-id", type=int, help="with --distributed: this process's index (default: the cluster's)"
    )


def mesh_from_args(args: argparse.Namespace, log: logging.Logger) -> "MeshConfig | None":
    """Joins the multi-process job when asked, parses `--mesh` (ValueError on a bad one) and logs it once on `log`.

    In a job of several processes, every process but process 0 logs warnings and errors only.
    """
    import jax

    from seer_jax.sharding import MeshConfig, build_mesh

    given = [flag for flag in ("coordinator", "num_processes", "process_id") if getattr(args, flag) is not None]
    if given and not args.distributed:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --distributed")
    if args.distributed:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
        if jax.process_index() != 0:
            logging.getLogger("train").setLevel(logging.WARNING)
    if args.mesh is None:
        return None
    config = MeshConfig.parse(args.mesh)
    build_mesh(config)  # checks the device count now, before any loading; the run builds its own
    devices = jax.devices()
    log.info(
        "mesh %s over %d %s device(s), %d process(es)", config, len(devices), devices[0].platform, jax.process_count()
    )
    return config
