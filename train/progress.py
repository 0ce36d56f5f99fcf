"""Progress reporting for the CLIs: their log lines, a tqdm bar over training steps and one over evaluation forwards.

Library code takes a callback (`on_step` of `train.trainer.fit`, `progress` of `train.perplexity.evaluate`) and
never prints; the CLIs pass these. In a multi-process job only process 0 draws the bars (`seer_jax.multihost`); the
others' log level is set where they join the job (`train.flags`).
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from tqdm import tqdm

from seer_jax.multihost import is_primary
from train.trainer import StepRecord

Task = TypeVar("Task")


def configure_logging() -> None:
    """INFO lines of the `train` loggers (the CLIs' and the libraries') on stderr, with time and logger name.

    `force`: an imported library may have configured the root logger already. The root stays at WARNING, so only
    this project's INFO lines are shown, not other libraries'.
    """
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("train").setLevel(logging.INFO)


def training_progress(total_steps: int) -> tuple[tqdm, Callable[[StepRecord], None]]:
    """A tqdm bar over steps and the `on_step` callback that advances it and shows loss and tokens/s."""
    bar = tqdm(total=total_steps, unit="step", desc="train", dynamic_ncols=True, disable=not is_primary())

    def on_step(record: StepRecord) -> None:
        # The postfix first: `update` draws the bar, which would otherwise show the previous step's loss.
        bar.set_postfix(loss=f"{record.metrics['loss']:.4f}", tok_s=f"{record.tokens_per_second:.0f}", refresh=False)
        bar.update(record.step - bar.n)

    return bar, on_step


def evaluation_progress(tasks: Sequence[Task]) -> Iterable[Task]:
    """Yields `tasks` (e.g. `train.perplexity.EvalTask`s) under a tqdm bar that shows the current one."""
    bar = tqdm(tasks, desc="eval", unit="forward", dynamic_ncols=True, disable=not is_primary())
    for task in bar:
        bar.set_postfix_str(str(task))
        yield task
