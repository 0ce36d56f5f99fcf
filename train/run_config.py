"""A run's configuration, stored in its output directory and checked when the run is resumed.

    store_run_config(out_dir / "distill.json", config, resume=..., may_change=DISTILL_MAY_CHANGE)

A checkpoint continues one trajectory: the learning-rate schedule, the data order and row size, the model and the
loss it was saved under. Resuming it under other settings would silently change what the trajectory means (a jump
of the learning rate, the saved data position read at another row size, one metrics.jsonl mixing two runs), so a
resume that changes any field of the configuration other than those the caller lists as `may_change` fails with
one line listing the changed fields, before anything is trained or written. Fields that may change are those that
leave the trajectory as it is: where outputs and caches go, how often checkpoints and metrics are written, the
device mesh (checkpoints restore onto any mesh), and for finetuning, the attention implementation and remat.
`--steps` may only grow when the schedule does not depend on it (`--schedule constant`). A field added to the
configuration since the run started (absent from the stored file) compares equal to its default None.

Paths are stored as absolute paths, so a resume from another working directory compares equal.
"""

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path, PurePath
from typing import Any

from seer_jax.multihost import is_primary, sync

_MISSING = "(absent)"


def store_run_config(path: Path, config: Any, *, resume: bool, may_change: Collection[str] = ()) -> None:
    """Writes the dataclass `config` as JSON to `path`; when `resume` and `path` holds an earlier run's
    configuration, first raises ValueError naming every changed field not in `may_change` (dotted field names;
    a name also covers the fields nested under it). In a multi-process job every process checks and process 0
    writes, once all have read the file."""
    current = _flat(json.loads(json.dumps(dataclasses.asdict(config), default=_jsonable)))
    if resume and path.is_file():
        try:
            stored = _flat(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); restore it or start a new run") from None
        changed = [
            f"{name} {stored.get(name, _MISSING)!r} → {current.get(name, _MISSING)!r}"
            for name in sorted(stored.keys() | current.keys())
            if not _same(stored.get(name, _MISSING), current.get(name, _MISSING)) and not _covered(name, may_change)
        ]
        if changed:
            raise ValueError(
                f"resume: the settings differ from those the run in {path.parent} was started with ({path.name}): "
                f"{'; '.join(changed)}. Resume with the same settings (only {', '.join(sorted(may_change))} may "
                "change), or start a new run in another directory"
            )
    sync(f"store_run_config {path}")  # in a multi-process job, every process has read the file before it changes
    if is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(config), indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> str:
    return str(Path(value).absolute()) if isinstance(value, PurePath) else str(value)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat if flat else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _same(stored: Any, current: Any) -> bool:
    """Equal values, or a field the stored configuration predates at its default None (e.g. a decode allocation)."""
    return stored == current or (stored == _MISSING and current is None)


def _covered(name: str, may_change: Collection[str]) -> bool:
    return any(name == allowed or name.startswith(allowed + ".") for allowed in may_change)
