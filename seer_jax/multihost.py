"""Several JAX processes, one job (`jax.distributed`): who writes files, and how values reach the host.

In a multi-process run (one process per host, or several on one machine) every process runs the same program on
its own devices, and a global array's shards live on the processes that own those devices: no process may assume
it holds a whole array. The rules this project follows:

* **Collectives are called by every process, in the same order**: `to_host`, `max_over_processes`, `sync` and
  Orbax saves and restores. A process that skipped one would leave the others waiting.
* **Files are written by process 0 only** (`is_primary`), except Orbax checkpoints, which every process writes
  (each its own shards, into one directory: `shared_staging_dir`). A writer ends with `sync`, so every process
  may read what it wrote once it returns.
* **Values reach the host through `to_host`**, which gathers an array that is not fully addressable here.

With one process every helper reduces to the single-process behaviour (no collective, no barrier).
"""

import os
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from seer_jax.staging import new_staging_dir

# A file name is at most 255 bytes on the file systems this runs on; staging names are broadcast padded to it.
_NAME_BYTES = 255


def is_primary() -> bool:
    """Whether this process writes the run's files (logs, metrics, exports): process 0."""
    return jax.process_index() == 0


def to_host(array: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of `array` as a NumPy array on this host; one that is not fully addressable here (sharded
    over other processes' devices) is gathered from them, so every process must call this for it."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (a collective; `value` itself with one process)."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def sync(name: str) -> None:
    """Waits until every process has reached `sync(name)` (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def shared_staging_dir(target: str | os.PathLike) -> Path:
    """`seer_jax.staging.new_staging_dir(target)`, made by process 0 and named to every process (a collective), so
    that an Orbax save from every process writes into one directory."""
    target = Path(target)
    if jax.process_count() == 1:
        return new_staging_dir(target)
    name = new_staging_dir(target).name.encode() if is_primary() else b""
    padded = np.frombuffer(name.ljust(_NAME_BYTES, b"\0"), np.uint8)
    name = bytes(multihost_utils.broadcast_one_to_all(padded)).rstrip(b"\0").decode()
    return target.parent / name
