"""Pretrain (or reuse) the embedded demo's model: a small Llama on the standard-library corpus, cached.

    python -m train.demo --cache-dir DIR [--steps N] [--seq-len 512] [--batch-size 2] [--lr 3e-3] [--seed 0]

The command line of `train.demo.model.pretrain_demo_model` (cache layout and measured results: see there).
`python -m train.distill_gates` with no `--model` pretrains this model too, then distils gates for it.
"""

import argparse
import logging
from pathlib import Path

from train.flags import DefaultsHelpFormatter

log = logging.getLogger("train.demo")
# `train.demo.model.DemoModelConfig`'s defaults, written out so that `--help` imports no jax (a test checks them).
DEFAULTS = dict(steps=300, seq_len=512, batch_size=2, learning_rate=3e-3, seed=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.demo", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, required=True, help="where the corpus, run and model are cached")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="rows per step")
    parser.add_argument("--lr", type=float, default=DEFAULTS["learning_rate"], help="peak learning rate")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="init and data order")
    args = parser.parse_args(argv)
    from train.demo.model import DemoModelConfig, pretrain_demo_model
    from train.progress import configure_logging, training_progress

    configure_logging()
    try:
        config = DemoModelConfig(
            cache_dir=args.cache_dir,
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
        )
        log.info("%s", config)
        bar, on_step = training_progress(config.steps)
        with bar:
            demo = pretrain_demo_model(config, on_step=on_step)
    except (ValueError, OSError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None
    log.info(
        "%s %s: train loss %.3f, held-out loss %.3f (perplexity %.1f), %.0f s of training at %.0f tokens/s",
        "reused" if demo.reused else "trained",
        demo.model_dir,
        demo.train_loss,
        demo.eval_loss,
        demo.eval_perplexity,
        demo.train_seconds,
        demo.tokens_per_second,
    )


if __name__ == "__main__":
    main()
