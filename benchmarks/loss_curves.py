"""Compare training runs' LM-loss curves: a PNG and the final-window gap.

    python -m benchmarks.loss_curves --run dense-YaRN=runs/yarn-dense --run SeerAttention-YaRN=runs/yarn-seer \\
        --out loss_curves.png [--window 20]

Each run directory holds the `metrics.jsonl` of `train.finetune`. The curve is the LM cross-entropy: `lm_loss` where
the run logs it (SeerAttention mode, whose `loss` adds the gates' distillation loss), else `loss`. The table gives
each run's mean over the last `--window` steps and its relative difference from the first run's.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from train.trainer import read_metrics


def lm_losses(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and LM losses of the run in `run_dir`."""
    lines = read_metrics(run_dir)
    if not lines:
        raise ValueError(f"{run_dir}: no metrics.jsonl lines")
    key = "lm_loss" if "lm_loss" in lines[0] else "loss"
    return np.array([line["step"] for line in lines]), np.array([line[key] for line in lines])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat; the first is the base)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--window", type=int, default=20, help="steps averaged for the final comparison and smoothing")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.run:
        label, sep, path = spec.rpartition("=")  # the label may hold "=" (a mesh), the path not
        if not sep:
            parser.error(f"--run {spec!r}: expected LABEL=RUN_DIR")
        runs.append((label, *lm_losses(Path(path))))

    figure, axis = plt.subplots(figsize=(7, 4))
    kernel = np.ones(args.window) / args.window
    for label, steps, losses in runs:
        axis.plot(steps, losses, alpha=0.25)
        axis.plot(
            steps[args.window - 1 :],
            np.convolve(losses, kernel, mode="valid"),
            label=label,
            color=axis.lines[-1].get_color(),
        )
    axis.set(xlabel="step", ylabel="LM loss (nats/token)", title=f"LM loss ({args.window}-step mean)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)

    base = runs[0][2][-args.window :].mean()
    print(f"| run | steps | first loss | mean of last {args.window} | vs {runs[0][0]} |")
    print("|---|--:|--:|--:|--:|")
    for label, steps, losses in runs:
        final = losses[-args.window :].mean()
        print(f"| {label} | {steps[-1]} | {losses[0]:.4f} | {final:.4f} | {100 * (final / base - 1):+.2f}% |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
