"""Runs one process of a training or evaluation CLI, as `tests/train/test_multiprocess.py` starts it:

    python tests/train/multiprocess_cli.py [--sigterm-after-step N] MODULE ARGS...

runs `MODULE.main(ARGS)` (e.g. `train.distill_gates`). `--sigterm-after-step N` sends this process a SIGTERM once
the training loop has reported step N (through the CLI's progress callback), so a test stops a run at a known step,
in one process of a job only. The environment (JAX_PLATFORMS, XLA_FLAGS, PYTHONPATH) is the caller's.
"""

import importlib
import os
import signal
import sys


def main(argv: list[str]) -> None:
    sigterm_after = None
    if argv[0] == "--sigterm-after-step":
        sigterm_after, argv = int(argv[1]), argv[2:]
    module = importlib.import_module(argv[0])
    if sigterm_after is not None:
        import train.progress  # the CLIs import training_progress from here when they run (fast --help)

        make_progress = train.progress.training_progress

        def training_progress(total_steps):
            bar, on_step = make_progress(total_steps)

            def on_step_then_signal(record):
                on_step(record)
                if record.step == sigterm_after:
                    os.kill(os.getpid(), signal.SIGTERM)

            return bar, on_step_then_signal

        train.progress.training_progress = training_progress
    module.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
