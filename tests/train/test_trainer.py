"""The training loop on a tiny Llama: learning, bit-exact resume after a signal, divergence, trainable filters.

One step function is compiled per module and shared by the runs that train every parameter; each run starts from
its own copy of the same initial parameters.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tests.train.tiny import LOADER, loader_factory, synthetic_corpus, tiny_model
from train.data import LoaderState, PackedLoader
from train.losses import next_token_loss
from train.optimizer import OptimizerConfig, build_optimizer
from train.train_checkpoints import CHECKPOINTS_DIR, DAMAGED_DIR
from train.train_step import build_train_step, init_train_state, split_trainable
from train.trainer import METRICS_FILE, TrainingDivergedError, TrainLoopConfig, fit, read_metrics, run_training

TOTAL_STEPS = 8
POISON = -1  # a batch whose first token is this has a NaN loss


def poisonable_loss(model, tokens, rng):
    """next_token_loss, but NaN for a batch that starts with POISON."""
    loss, metrics = next_token_loss(model, jnp.maximum(tokens, 0), rng)
    return jnp.where(tokens[0, 0] == POISON, jnp.nan, loss), metrics


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="module")
def setup():
    """(step function, a fresh step-0 state each call) for full-parameter training with AdamW + cosine."""
    model = tiny_model()
    optimizer, schedule = build_optimizer(OptimizerConfig(learning_rate=3e-2, warmup_steps=2), TOTAL_STEPS)
    graphdef, params, frozen = split_trainable(model, nnx.Param)
    step_fn = build_train_step(graphdef, frozen, loss_fn=poisonable_loss, optimizer=optimizer, learning_rate=schedule)
    fresh_state = lambda: init_train_state(jax.tree.map(jnp.copy, params), optimizer, seed=0)
    return step_fn, fresh_state, schedule


def run(setup, corpus, out_dir, *, make_loader=None, on_step=None, resume=False, checkpoint_every=3):
    step_fn, fresh_state, _ = setup
    config = TrainLoopConfig(
        out_dir=out_dir, total_steps=TOTAL_STEPS, checkpoint_every=checkpoint_every, keep_checkpoints=2, resume=resume
    )
    return run_training(
        config,
        step_fn=step_fn,
        state=fresh_state(),
        make_loader=make_loader or loader_factory(corpus),
        on_step=on_step,
    )


@pytest.fixture(scope="module")
def straight(setup, corpus, tmp_path_factory):
    """A run of TOTAL_STEPS steps without interruption: (result, its out_dir)."""
    out_dir = tmp_path_factory.mktemp("straight")
    return run(setup, corpus, out_dir), out_dir


def test_loss_falls_and_metrics_are_logged(setup, straight):
    result, out_dir = straight
    assert result.step == TOTAL_STEPS and result.stopped_by is None and result.start_step == 0
    lines = read_metrics(out_dir)
    assert [line["step"] for line in lines] == list(range(1, TOTAL_STEPS + 1))
    losses = [line["loss"] for line in lines]
    assert losses[0] > 4.0  # about ln(64) at init
    assert np.mean(losses[-3:]) < losses[0] - 0.7, losses
    schedule = setup[2]
    for line in lines:
        assert set(line) == {"step", "loss", "grad_norm", "lr", "tokens_per_second", "elapsed_seconds"}
        assert line["lr"] == pytest.approx(float(schedule(line["step"] - 1)))
        assert line["grad_norm"] > 0 and line["tokens_per_second"] > 0
    assert [line["elapsed_seconds"] for line in lines] == sorted(line["elapsed_seconds"] for line in lines)
    # The last 2 of the checkpoints at steps 3, 6 and 8 are kept.
    assert sorted(int(p.name) for p in (out_dir / CHECKPOINTS_DIR).iterdir()) == [6, 8]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_stop_by_signal_then_resume_is_bit_exact(setup, corpus, straight, tmp_path, signal_name):
    straight_result, straight_dir = straight
    signum = getattr(signal, signal_name)
    handler_before = signal.getsignal(signum)

    def send_signal(record):
        if record.step == 3:
            os.kill(os.getpid(), signum)  # arrives between steps 3 and 4: step 4 finishes, then the loop stops

    first = run(setup, corpus, tmp_path, on_step=send_signal)
    assert first.stopped_by == signal_name
    assert first.step == 4 and first.checkpoint_step == 4  # saved off the every-3 schedule, because of the signal
    assert signal.getsignal(signum) is handler_before

    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(setup, corpus, tmp_path)
    second = run(setup, corpus, tmp_path, resume=True)
    assert second.start_step == 4 and second.step == TOTAL_STEPS and second.stopped_by is None
    for ours, reference in zip(
        jax.tree.leaves(second.state.params), jax.tree.leaves(straight_result.state.params), strict=True
    ):
        np.testing.assert_array_equal(ours, reference)
    for ours, reference in zip(
        jax.tree.leaves(second.state.opt_state), jax.tree.leaves(straight_result.state.opt_state), strict=True
    ):
        np.testing.assert_array_equal(ours, reference)
    resumed_lines, straight_lines = read_metrics(tmp_path), read_metrics(straight_dir)
    assert [line["step"] for line in resumed_lines] == list(range(1, TOTAL_STEPS + 1))
    for name in ("loss", "grad_norm", "lr"):
        assert [line[name] for line in resumed_lines] == [line[name] for line in straight_lines]


class PoisonedLoader:
    """A PackedLoader whose `poisoned_batch`-th batch (1-based) starts with POISON."""

    def __init__(self, corpus, state: LoaderState, poisoned_batch: int):
        self.inner = PackedLoader(corpus, LOADER, state=state)
        self.poisoned_batch, self.served = poisoned_batch, 0

    def __next__(self):
        batch = next(self.inner).copy()
        self.served += 1
        if self.served == self.poisoned_batch:
            batch[0, 0] = POISON
        return batch

    @property
    def state(self) -> LoaderState:
        return self.inner.state


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, corpus, tmp_path):
    make_loader = lambda state: PoisonedLoader(corpus, state, poisoned_batch=5)
    with pytest.raises(TrainingDivergedError, match=r"step 5: loss is nan.*last good checkpoint is step 4"):
        run(setup, corpus, tmp_path, make_loader=make_loader, checkpoint_every=2)
    assert sorted(int(p.name) for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == [2, 4]
    lines = read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5] and lines[-1]["loss"] is None
    for line in (tmp_path / METRICS_FILE).read_text().splitlines():  # strict JSON: no bare NaN
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds a bare {name}"))

    # Resuming (here without the bad batch) continues from step 4 and drops the diverged step's metrics line.
    result = run(setup, corpus, tmp_path, resume=True, checkpoint_every=2)
    assert result.start_step == 4 and result.step == TOTAL_STEPS
    assert [line["step"] for line in read_metrics(tmp_path)] == list(range(1, TOTAL_STEPS + 1))


def test_a_filter_trains_only_its_variables_and_the_optimizer_holds_no_state_for_the_rest(corpus, tmp_path):
    model = tiny_model(seed=1)
    before = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    trainable = nnx.All(nnx.Param, nnx.PathContains("q_proj"))
    optimizer = optax.adamw(1e-2)
    config = TrainLoopConfig(out_dir=tmp_path, total_steps=2, checkpoint_every=2)
    result = fit(
        model,
        loss_fn=next_token_loss,
        optimizer=optimizer,
        config=config,
        make_loader=loader_factory(corpus),
        trainable=trainable,
    )
    q_paths = {path for path in before if "q_proj" in path}
    assert len(q_paths) == 2  # one q_proj kernel per layer
    trained_elements = sum(before[path].size for path in q_paths)

    # Adam's state: a count plus mu and nu for the q_proj kernels, nothing else.
    opt_leaves = jax.tree.leaves(result.state.opt_state)
    assert sum(leaf.size for leaf in opt_leaves) == 2 * trained_elements + 1
    assert {path for path, _ in nnx.to_flat_state(result.state.params)} == q_paths

    after = {path: np.array(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, value in before.items():
        if path in q_paths:
            assert not np.array_equal(after[path], value), path
        else:
            np.testing.assert_array_equal(after[path], value)

    # The checkpoint holds the trainable variables only.
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore((tmp_path / CHECKPOINTS_DIR / "2" / "state").absolute())
    assert sum(leaf.size for leaf in jax.tree.leaves(saved["params"])) == trained_elements
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])["step"] == 2


def test_an_empty_filter_is_refused():
    with pytest.raises(ValueError, match="selects no variable"):
        split_trainable(tiny_model(), nnx.PathContains("no_such_layer"))


def test_resume_falls_back_past_a_damaged_newest_checkpoint(setup, corpus, straight, tmp_path, caplog):
    run(setup, corpus, tmp_path)  # checkpoints at steps 6 and 8 are kept
    for file in (tmp_path / CHECKPOINTS_DIR / "8").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with caplog.at_level(logging.INFO):
        result = run(setup, corpus, tmp_path, resume=True)
    assert result.start_step == 6 and result.step == TOTAL_STEPS
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert f"resuming from the checkpoint of step 6 in {tmp_path / CHECKPOINTS_DIR}" in caplog.messages
    assert "checkpoint step 8 is damaged" in warning and "damaged_checkpoints/8" in warning, warning
    assert (tmp_path / DAMAGED_DIR / "8").is_dir()
    assert sorted(int(p.name) for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == [6, 8]
    straight_params = jax.tree.leaves(straight[0].state.params)
    for ours, reference in zip(jax.tree.leaves(result.state.params), straight_params, strict=True):
        np.testing.assert_array_equal(ours, reference)

    for step in ("6", "8"):  # every checkpoint damaged: one line saying so
        for file in (tmp_path / CHECKPOINTS_DIR / step).rglob("*"):
            if file.is_file() and file.parent.name == "d":
                file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"no intact checkpoint in .* \(damaged: steps \[8, 6\]"):
        run(setup, corpus, tmp_path, resume=True)


SIGNAL_DURING_FINAL_SAVE = """
import os, signal, sys
from pathlib import Path
import optax
import train.train_checkpoints as checkpoints
from tests.train.tiny import loader_factory, synthetic_corpus, tiny_model
from train.losses import next_token_loss
from train.trainer import TrainLoopConfig, fit

close = checkpoints.TrainCheckpointer.close
def close_after_a_signal(self):  # SIGTERM just after the last step, while its checkpoint is being written
    os.kill(os.getpid(), signal.SIGTERM)
    close(self)
checkpoints.TrainCheckpointer.close = close_after_a_signal
config = TrainLoopConfig(out_dir=Path(sys.argv[1]), total_steps=2, checkpoint_every=2)
result = fit(tiny_model(), loss_fn=next_token_loss, optimizer=optax.adamw(1e-2), config=config,
             make_loader=loader_factory(synthetic_corpus()))
print("stopped_by", result.stopped_by, "step", result.step)
"""


def test_a_signal_during_the_final_save_leaves_a_complete_checkpoint(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_FINAL_SAVE, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped_by SIGTERM step 2" in done.stdout
    assert [p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()] == ["2"]  # complete: no *.orbax-checkpoint-tmp


def test_resume_drops_a_metrics_line_cut_short_and_names_a_bad_one(setup, corpus, tmp_path):
    run(setup, corpus, tmp_path, checkpoint_every=4)
    metrics = tmp_path / METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"step": 9, "lo')  # a killed run's last, partial line
    run(setup, corpus, tmp_path, resume=True)
    assert [line["step"] for line in read_metrics(tmp_path)] == list(range(1, TOTAL_STEPS + 1))
    metrics.write_text("garbage\n" + metrics.read_text())
    with pytest.raises(ValueError, match=rf"{METRICS_FILE}:1: not a metrics line of this run"):
        run(setup, corpus, tmp_path, resume=True)
