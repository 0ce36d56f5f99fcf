"""Training-state checkpoints for resume: the trainable state and the data position, saved with Orbax so a run
continues exactly where it stopped. Model weights (converted or HF directories) are `seer_jax.checkpoint`'s.

Layout (`CheckpointManager` under `<out_dir>/checkpoints`):

    checkpoints/<step>/state/   Orbax `StandardSave` of {"params", "opt_state", "step", "rng"}
    checkpoints/<step>/meta/    JSON: {"step", "data": {"epoch", "row"}, "elapsed_seconds"}

`params` are the *trainable* variables only (an `nnx.State` as split by the training filter); `opt_state` is the
optax state over them; `rng` is the raw key data of the run's base PRNG key. Frozen variables are never saved: they
are rebuilt from the base model (or the seeded random init) each time the run starts, so a checkpoint is only
meaningful together with the model it was trained from. `data` is the loader's `LoaderState` after the last batch
the saved step consumed. `elapsed_seconds` is the wall time spent training up to that step, across resumes.

Arrays sharded over a mesh (`train.trainer.fit(..., mesh=...)`) are saved shard by shard, each process of a
multi-process job writing its own into the one directory (which all of them must see: a shared file system);
`restore` reads into the template's shardings, so a checkpoint written on one mesh restores on another, on another
number of processes, or on one device.

Orbax writes a step to a temporary directory and renames it when complete, so an interrupted save is never read
back; the last `keep` completed steps are kept. A completed step whose files were damaged later (a truncated copy,
a full disk) is set aside by `restore_newest_intact`, which resumes from the newest step that reads back.
"""

import dataclasses
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from seer_jax.multihost import is_primary, sync
from seer_jax.orbax_errors import READ_ERRORS, describe_read_error
from train.data import LoaderState
from train.train_step import TrainState

CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restored:
    """A checkpoint read back: the train state, the loader position after its last batch, the wall time so far."""

    state: TrainState
    data: LoaderState
    elapsed_seconds: float


class TrainCheckpointer:
    """Saves and restores training checkpoints under `out_dir/checkpoints`, keeping the last `keep`.

    Saving is asynchronous: `save` returns once the arrays are copied off the device, so the next step may donate
    their buffers; `close` blocks until the writes are on disk. Use as a context manager.
    """

    def __init__(self, out_dir: Path, *, keep: int):
        self.directory = (Path(out_dir) / CHECKPOINTS_DIR).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest completed step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, state: TrainState, *, data: LoaderState, elapsed_seconds: float) -> None:
        """Saves `state` as checkpoint number `state.step`."""
        step = int(state.step)
        meta = {"step": step, "data": dataclasses.asdict(data), "elapsed_seconds": elapsed_seconds}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_tree(state)), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, template: TrainState) -> Restored:
        """Reads checkpoint `step` into the structure, shapes, dtypes and shardings of `template` (e.g. the step-0
        state, placed on this run's devices)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_tree(template))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        tree, meta = restored.state, restored.meta
        state = TrainState(
            params=tree["params"],
            opt_state=tree["opt_state"],
            step=tree["step"],
            rng=jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(template.rng)),
        )
        return Restored(state=state, data=LoaderState(**meta["data"]), elapsed_seconds=float(meta["elapsed_seconds"]))

    def restore_newest_intact(self, template: TrainState) -> Restored:
        """Restores the newest checkpoint that reads back (see `restore`). A damaged newer one is moved to
        `<out_dir>/damaged_checkpoints/<step>`, with a warning naming it, so that neither this run's saves nor a
        later resume meet it again. Raises ValueError when there is no checkpoint or every one is damaged."""
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self.restore(step, template)
            except READ_ERRORS as error:
                aside = self.directory.parent / DAMAGED_DIR / str(step)
                for copy in range(1, 1000):  # an earlier damaged step of this number was set aside already
                    if not aside.exists():
                        break
                    aside = aside.with_name(f"{step}.{copy}")
                if is_primary():
                    aside.parent.mkdir(exist_ok=True)
                    (self.directory / str(step)).rename(aside)
                sync(f"set aside damaged checkpoint {step}")
                self._manager.reload()
                damaged.append(step)
                _log.warning(
                    "checkpoint step %d is damaged: %s; moved it to %s and trying the next older checkpoint",
                    step,
                    describe_read_error(self.directory / str(step), error),
                    aside,
                )
        raise ValueError(
            f"no intact checkpoint in {self.directory} (damaged: steps {damaged or 'none'}, moved to "
            f"{self.directory.parent / DAMAGED_DIR}); start again in a new directory"
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _to_tree(state: TrainState) -> dict:
    # Typed PRNG keys are saved as their raw key data (uint32), which every Orbax version handles.
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": jax.random.key_data(state.rng),
    }
