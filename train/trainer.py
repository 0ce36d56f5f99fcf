"""The training loop: steps, checkpoints, resume, signals, divergence, metrics.

    result = fit(model, loss_fn=..., optimizer=..., config=TrainLoopConfig(...), make_loader=..., trainable=...)

`fit` splits `model` by the `trainable` filter, builds the jitted step (`train.train_step`) and runs `run_training`;
`run_training` takes any step function and initial `TrainState` for callers that build their own. Behaviour:

* **Devices.** One device, or a `jax.sharding.Mesh` (`fit(..., mesh=...)`, see `seer_jax.sharding`): parameters,
  optimizer state and checkpoints are then sharded over it, and batches split over its data and fsdp axes.
* **Data.** `make_loader(LoaderState)` returns an iterator of int32 token batches [B, T] with a `state` property
  (`train.data.PackedLoader`); the loop asks for the position after each batch, so checkpoints resume the data
  stream exactly. The next batch is read while the device runs the current step.
* **Checkpoints** (`train.train_checkpoints`) every `checkpoint_every` steps, after the last step, and when stopped by a
  signal; the last `keep_checkpoints` are kept. They hold the trainable variables, the optimizer state, the step,
  the RNG key and the data position; frozen variables are not saved (they come from the base model).
* **Resume.** With `resume=True` the run continues from the newest checkpoint in `out_dir` that reads back (a
  damaged newer one is set aside with a warning; or starts at step 0 when there is none) and is bit-exact: N
  steps, stop, resume, N more steps give the same parameters and losses as 2N straight steps. Without it, an
  `out_dir` holding checkpoints is refused.
* **Signals.** SIGINT or SIGTERM lets the current step finish, saves a checkpoint and returns with
  `TrainResult.stopped_by` set to the signal's name (a second SIGINT interrupts at once). Handlers are installed
  from the restore until the last checkpoint is on disk, and only from the main thread; a signal at any moment
  leaves either a complete checkpoint or none.
* **Divergence.** A non-finite loss or gradient norm raises `TrainingDivergedError` before anything of that step
  is saved, so the newest checkpoint is the last good state.
* **Several processes** (`jax.distributed`, see `seer_jax.multihost`): every process runs the loop on the same
  batches (each places only its own devices' rows), writes its shards of each checkpoint, and stops at the same
  step when a signal reaches any of them; process 0 alone writes `metrics.jsonl`.
* **Metrics.** Every `log_every` steps (and at the last step) one JSON line is appended to `out_dir/metrics.jsonl`:
  `step`, the step's own `loss`, `grad_norm`, `lr` and any other metric the step returns (null where NaN/inf:
  the file is strict JSON), `tokens_per_second` over the steps since the previous line, and `elapsed_seconds` of
  training across resumes. On resume, lines after the restored step are dropped, so the file always describes
  the run that produced the parameters. `on_step(StepRecord)` is called after every step (for a progress bar).
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seer_jax.multihost import is_primary, max_over_processes
from seer_jax.sharding import logical_rules, shard_batch, shard_model, tree_shardings
from train.data import LoaderState
from train.train_checkpoints import TrainCheckpointer
from train.train_step import LossFn, StepFn, TrainState, build_train_step, init_train_state, split_trainable

METRICS_FILE = "metrics.jsonl"

_log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the step and the last checkpoint."""


class BatchIterator(Protocol):
    """What `make_loader` returns: int32 [B, T] batches, and the position after the last one served."""

    def __next__(self) -> np.ndarray: ...

    @property
    def state(self) -> LoaderState: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainLoopConfig:
    """out_dir: checkpoints and metrics go here. total_steps: train until this step. checkpoint_every: save every
    this many steps. keep_checkpoints: how many to keep. log_every: write a metrics line every this many steps.
    resume: continue from the newest checkpoint in out_dir (or start, if there is none).
    """

    out_dir: Path
    total_steps: int
    checkpoint_every: int
    keep_checkpoints: int = 3
    log_every: int = 1
    resume: bool = False

    def __post_init__(self):
        for name in ("total_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One finished step: its number (1-based: updates applied), metrics as floats, throughput and wall time."""

    step: int
    metrics: dict[str, float]
    tokens_per_second: float
    elapsed_seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """state: the final train state. start_step: the step the run started (or resumed) at. stopped_by: the signal
    name when interrupted (the checkpoint of the last step is complete; a signal that arrives while the last step's
    checkpoint is written counts too, though total_steps were reached), else None (total_steps reached).
    last_record: the last step's record (None if no step ran). checkpoint_step: the newest checkpoint's step.
    """

    state: TrainState
    start_step: int
    stopped_by: str | None
    last_record: StepRecord | None
    checkpoint_step: int | None

    @property
    def step(self) -> int:
        return int(self.state.step)


def fit(
    model: nnx.Module,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    config: TrainLoopConfig,
    make_loader: Callable[[LoaderState], BatchIterator],
    trainable: nnx.filterlib.Filter = nnx.Param,
    learning_rate: optax.Schedule | None = None,
    seed: int = 0,
    on_step: Callable[[StepRecord], None] | None = None,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Trains the variables of `model` that `trainable` selects; see the module docstring.

    On return `model` holds the trained values. Its trainable arrays are handed to the jitted step, which donates
    them, so if this raises, reload the model (or resume from the checkpoint) instead of reusing it.

    Args:
      model: the model, with its frozen variables already in place (e.g. loaded from the base checkpoint).
      loss_fn: `(model, tokens [B, T], rng) -> (loss, metrics)`, see `train.train_step`.
      optimizer: the optax transformation (clipping and weight decay included).
      config: the loop settings.
      make_loader: builds the data iterator at a position.
      trainable: NNX filter of the variables to train (`nnx.Param`: all of them).
      learning_rate: the optimizer's schedule, reported as `lr`.
      seed: the run's base PRNG seed (the `rng` the loss function receives derives from it).
      on_step: called after every step.
      mesh: train on this device mesh (`seer_jax.sharding`): `model` (a `CausalLM`, whose config gives the
        sharding rules) is moved onto it, the optimizer state is sharded like the parameters, every batch is
        split over data × fsdp, and the loop runs under `jax.set_mesh` so attention runs per device. None: one
        device.
    """
    if mesh is not None:
        rules = logical_rules(model.config, mesh)
        shard_model(model, mesh, rules)
    graphdef, params, frozen = split_trainable(model, trainable)

    def init(params: nnx.State) -> TrainState:
        return init_train_state(params, optimizer, seed=seed)

    out_shardings = None
    if mesh is not None:
        state_shardings = tree_shardings(jax.eval_shape(init, params), mesh, rules)
        out_shardings = (state_shardings, NamedSharding(mesh, PartitionSpec()))
        init = jax.jit(init, out_shardings=state_shardings)  # the optimizer state is never whole on one device
    state = init(params)
    step = build_train_step(
        graphdef, frozen, loss_fn=loss_fn, optimizer=optimizer, learning_rate=learning_rate, out_shardings=out_shardings
    )

    def step_fn(state: TrainState, batch: np.ndarray) -> tuple[TrainState, dict]:
        return step(state, batch if mesh is None else shard_batch(batch, mesh))

    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        result = run_training(config, step_fn=step_fn, state=state, make_loader=make_loader, on_step=on_step)
    nnx.update(model, result.state.params)
    return result


def run_training(
    config: TrainLoopConfig,
    *,
    step_fn: StepFn,
    state: TrainState,
    make_loader: Callable[[LoaderState], BatchIterator],
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Runs `step_fn` from `state` (the step-0 state; on resume, the template the checkpoint is read into)."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    # The signal handlers outlive the checkpointer, whose exit waits for the last save: a signal then lets the save
    # finish (no half-written checkpoint) and is reported in `stopped_by`.
    with _StopRequest() as stop, TrainCheckpointer(out_dir, keep=config.keep_checkpoints) as checkpointer:
        latest = checkpointer.latest_step()
        if latest is not None and not config.resume:
            raise ValueError(
                f"out_dir: {out_dir} already holds checkpoints (newest: step {latest}); resume from them or choose "
                "a new directory"
            )
        data, elapsed = LoaderState(), 0.0
        if latest is not None:
            restored = checkpointer.restore_newest_intact(state)  # falls back past damaged ones, with a warning
            state, data, elapsed = restored.state, restored.data, restored.elapsed_seconds
            latest = int(state.step)
            _log.info("resuming from the checkpoint of step %d in %s", latest, checkpointer.directory)
        start_step = int(state.step)
        if is_primary():
            _truncate_metrics(metrics_path, after_step=start_step)
        checkpoint_step = latest
        last_record, stopped_by = None, None
        loader = make_loader(data)
        with metrics_path.open("a") if is_primary() else open(os.devnull, "w") as metrics_file:
            step = start_step
            batch, position = (next(loader), loader.state) if step < config.total_steps else (None, data)
            run_start = window_start = time.perf_counter()
            window_tokens = 0
            while step < config.total_steps:
                state, metrics = step_fn(state, batch)
                tokens, batch_position = batch.size, position
                if step + 1 < config.total_steps:
                    batch, position = next(loader), loader.state  # read while the device computes
                metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
                step += 1
                now = time.perf_counter()
                window_tokens += tokens
                stopping = stop.agreed_signal_name()  # one decision per step, whenever the signal arrives
                last_record = StepRecord(
                    step=step,
                    metrics=metrics,
                    tokens_per_second=window_tokens / max(now - window_start, 1e-9),
                    elapsed_seconds=elapsed + now - run_start,
                )
                diverged = _divergence(metrics)
                if step % config.log_every == 0 or step == config.total_steps or stopping or diverged:
                    metrics_file.write(json.dumps(_metrics_line(last_record), allow_nan=False) + "\n")
                    metrics_file.flush()
                    window_tokens, window_start = 0, time.perf_counter()
                if diverged:
                    raise TrainingDivergedError(
                        f"step {step}: {diverged}; stopped without saving this state "
                        f"({_last_good(checkpoint_step, checkpointer.directory)}). Lower the learning rate or check "
                        "the data, then resume"
                    )
                if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
                    checkpointer.save(state, data=batch_position, elapsed_seconds=last_record.elapsed_seconds)
                    checkpoint_step = step
                if on_step is not None:
                    on_step(last_record)
                if stopping:
                    stopped_by = stopping
                    break
    stopped_by = stopped_by or stop.agreed_signal_name()  # a signal after the last step's decision, in the final save
    return TrainResult(
        state=state,
        start_step=start_step,
        stopped_by=stopped_by,
        last_record=last_record,
        checkpoint_step=checkpoint_step,
    )


def peak_device_memory_gib() -> float | None:
    """The largest peak allocated memory so far over this host's devices, in GiB, where the backend reports it
    (GPUs do); None elsewhere."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
    peaks = [peak for peak in peaks if peak is not None]
    return max(peaks) / 2**30 if peaks else None


def read_metrics(out_dir: Path) -> list[dict]:
    """The lines of `out_dir/metrics.jsonl`, in order."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metrics_line(record: StepRecord) -> dict:
    # A NaN/inf metric is written as null: bare NaN is not JSON, and other readers (jq, JavaScript) reject it.
    return {
        "step": record.step,
        **{name: value if math.isfinite(value) else None for name, value in record.metrics.items()},
        "tokens_per_second": record.tokens_per_second,
        "elapsed_seconds": record.elapsed_seconds,
    }


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):  # the last line, cut short by a killed run: dropped
                break
            raise ValueError(f"{path}:{number}: not a metrics line of this run; remove the line to resume") from None
        if step <= after_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _last_good(checkpoint_step: int | None, directory: Path) -> str:
    if checkpoint_step is None:
        return "no checkpoint was saved yet"
    return f"the last good checkpoint is step {checkpoint_step} in {directory}"


def _divergence(metrics: dict[str, float]) -> str | None:
    """'loss is nan, grad_norm is inf'-style description of the non-finite loss / gradient norm, or None."""
    bad = [f"{name} is {metrics[name]}" for name in ("loss", "grad_norm") if not math.isfinite(metrics.get(name, 0.0))]
    return ", ".join(bad) or None


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag (`signal_name`); restores the previous handlers on exit."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def agreed_signal_name(self) -> str | None:
        """`signal_name`, agreed by every process of a multi-process job (a collective): a signal that reached any
        of them stops them all at the same step, so none waits in a step or a save that the others skip."""
        signum = max_over_processes(0 if self.signal_name is None else signal.Signals[self.signal_name].value)
        return None if signum == 0 else signal.Signals(signum).name

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._restore()  # a second signal acts as it would without the loop (SIGINT: KeyboardInterrupt)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
