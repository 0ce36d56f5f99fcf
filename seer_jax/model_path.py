"""Where a model named on the command line lives: a local directory, or a Hugging Face hub id in the local cache.

    resolve_model_path("runs/model")            → runs/model, an existing directory, as is
    resolve_model_path("org/name")              → <HF cache>/models--org--name/snapshots/<commit refs/main names>
    resolve_model_path("org/name@v1.0")         → the snapshot of that revision (branch, tag or commit)

Hub ids are looked up with `huggingface_hub.snapshot_download(..., local_files_only=True)`, which reads the cache
that `HF_HUB_CACHE` / `HF_HOME` name and never the network: a model must have been downloaded before
(`hf download org/name`). Every command line that takes `--model` (or another model-like directory, such as
`--gates`) resolves it here.
"""

import re
from pathlib import Path

# An HF repo id: "name" or "org/name" of letters, digits, "-", "_", "." (huggingface_hub's validate_repo_id), with an
# optional "@revision".
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?$")


class ModelPathError(ValueError):
    """A model name that is neither a local directory nor a model in the local Hugging Face cache."""


def resolve_model_path(name: str | Path, *, flag: str = "--model") -> Path:
    """`name` as a local directory: itself when it is one, else the snapshot of the hub id `name` in the local HF cache.

    Args:
      name: a directory, or a hub id "org/name" (optionally "org/name@revision").
      flag: how the caller's user named the value, for the error message.

    Raises:
      ModelPathError: one line saying where `name` was looked for and what to do.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    match = _HUB_ID.match(text)
    if path.exists() or match is None or text.startswith("."):
        raise ModelPathError(f"{flag} {text} is not a directory; pass a model directory or a Hugging Face hub id")
    # Imported here: huggingface_hub is only needed for hub ids, and command lines import this module early.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(match["repo"], revision=match["revision"], local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise ModelPathError(
            f"{flag} {text} is neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it first (hf download {match['repo']}) or pass a model directory"
        ) from None
