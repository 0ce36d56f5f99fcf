"""Staging directories: write an output beside its final path, then rename it into place.

`new_staging_dir(target)` creates `.<target name>.<pid>-<random>.partial` next to `target`, with the permissions
of any new directory (the umask's, not `tempfile.mkdtemp`'s 0700, which the rename would hand on to the output).
It first removes the staging directories of earlier writes of the same target whose process is gone (a killed
conversion or export), so they are not left behind forever; those of a live process are left alone.
"""

import os
import secrets
import shutil
from pathlib import Path

SUFFIX = ".partial"


def new_staging_dir(target: str | os.PathLike) -> Path:
    """A new, empty staging directory for `target` (in its parent, which must exist)."""
    target = Path(target)
    remove_stale_staging_dirs(target)
    staging = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
    staging.mkdir()
    return staging


def remove_stale_staging_dirs(target: str | os.PathLike) -> list[Path]:
    """Removes the staging directories of `target` left by processes that no longer run; returns them."""
    target = Path(target)
    prefix = f".{target.name}."
    stale = [
        path
        for path in target.parent.glob(f"{prefix}*{SUFFIX}")
        if path.is_dir() and not _owner_alive(path.name[len(prefix) : -len(SUFFIX)])
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _owner_alive(tag: str) -> bool:
    """Whether the process named by a staging tag `<pid>-<random>` runs on this host. Tags without a pid (written
    by `tempfile.mkdtemp` before this module existed) count as dead."""
    pid = tag.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
