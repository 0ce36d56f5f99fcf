"""The training progress bar shows the loss of the step it has just counted."""

import time

from train.progress import training_progress
from train.trainer import StepRecord


def test_the_bar_shows_the_current_steps_loss(capsys):
    bar, on_step = training_progress(3)
    with bar:
        for step, loss in enumerate([9.0, 5.0, 2.5], start=1):
            time.sleep(0.15)  # past tqdm's minimum redraw interval, so `update` draws
            on_step(StepRecord(step=step, metrics={"loss": loss}, tokens_per_second=100.0, elapsed_seconds=step))
            drawn = capsys.readouterr().err.split("\r")[-1]
            assert f"{step}/3" in drawn and f"loss={loss:.4f}" in drawn, drawn
