"""One-line descriptions of the errors Orbax (TensorStore) raises on a damaged checkpoint.

A truncated or corrupted data file makes Orbax raise a `ValueError` (or an `OSError`, a `KeyError` for a missing
entry) whose message runs to several lines of TensorStore context; `describe_read_error` keeps what a user needs:
the damaged file when the message names one, and the first line of the reason.
"""

import re
from pathlib import Path

# What restoring a damaged Orbax checkpoint raises.
READ_ERRORS = (ValueError, OSError, KeyError, RuntimeError)

_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def describe_read_error(directory: str | Path, error: BaseException, limit: int = 240) -> str:
    """'<file or directory> is damaged (<reason>)' for an error raised while restoring `directory`."""
    text = str(error).strip()
    files = [name for name in _LOCAL_FILE.findall(text) if not name.endswith("/")]
    where = files[-1] if files else str(directory)
    reason = text.splitlines()[0] if text else type(error).__name__
    if len(reason) > limit:
        reason = reason[: limit - 1] + "…"
    return f"{where} is damaged or missing ({type(error).__name__}: {reason})"
