"""Generate text with a model, dense or with SeerAttention gates (block-sparse prefill with prefill gates,
block-sparse decode with SeerAttention-R decode gates).

    python -m seer_jax.generate --model MODEL --prompt "def quicksort(xs):" [--gates ADAPTER] [--chat] \
        [--max-new-tokens 256] [--temperature 0 --top-p 1 --seed 0] [--selection threshold=X | nz_ratio=Y | budget=D]
    python -m seer_jax.generate --gates PREFILL_ADAPTER --decode-gates DECODE_ADAPTER \
        [--decode-selection token_budget=N | context_fraction=F | threshold=X] --prompt "..."
    (either selection flag also takes quest_weight=W: "--selection threshold=0.02,quest_weight=0.25")
    echo "Why is the sky blue?" | python -m seer_jax.generate --model MODEL --chat
    python -m seer_jax.generate --model MODEL --prompts-file prompts.jsonl > completions.jsonl

MODEL is a Hugging Face or converted directory, or a hub id already in the local Hugging Face cache (never
downloaded; `seer_jax.model_path`); without `--model` the adapter's base model is used. The prompt comes from
`--prompt`, `--prompt-file` (the whole file is one prompt) or standard input. One prompt: its completion streams to
standard output as it is decoded. `--prompts-file`: one prompt per line, a JSON string or {"prompt": "..."};
decoded `--batch-size` at a time, each completion is written when done as one JSON line {"index", "prompt",
"completion"} (in the order they finish). Standard error gets the settings and, at the end, one summary line: prompt
tokens, time to first token (prefill, compilation excluded), decode tokens/s and the prefill's block density (mean
over layers and heads; "dense" without gates). The block selections used (the adapter's defaults unless
`--selection` / `--decode-selection` are given; a decode budget is shared among layers by the adapter's calibrated
decode allocation when it records one, as `--selection budget=D` by its prefill allocation) are logged before
generating. On any error: one line and exit status 1.
"""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("seer_jax.generate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """The command line's settings; see the module docstring and `--help`."""

    model: str | None
    gates: str | None = None
    decode_gates: str | None = None
    tokenizer: str | None = None
    prompts: tuple[str, ...]
    batch: bool = False
    chat: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    selection: str | None = None
    decode_selection: str | None = None
    attention: str | None = None
    dtype: str | None = None
    max_length: int | None = None
    batch_size: int = 8
    allow_other_base: bool = False

    def __post_init__(self):
        if self.model is None and self.gates is None and self.decode_gates is None:
            raise ValueError("--model is required (it may be left out only with --gates, for the adapter's base model)")
        if not self.prompts:
            raise ValueError("no prompt: give --prompt, --prompt-file, --prompts-file or text on standard input")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.selection is not None and self.gates is None:
            raise ValueError("--selection needs --gates")
        if self.decode_selection is not None and self.gates is None and self.decode_gates is None:
            raise ValueError("--decode-selection needs --gates or --decode-gates")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def read_prompts_file(path: Path) -> tuple[str, ...]:
    """One prompt per non-blank line: a JSON string or an object with a "prompt" string."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}); write one JSON string per line") from None
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str):
            raise ValueError(f'{path}:{number}: expected a JSON string or {{"prompt": "..."}}')
        prompts.append(value)
    return tuple(prompts)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options that are off (None, False) unless given, whose help says what then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seer_jax.generate", description=__doc__.split("\n\n")[0], formatter_class=_DefaultsFormatter
    )
    parser.add_argument(
        "--model", help="HF or converted model directory, or a hub id in the local HF cache (default: the adapter's)"
    )
    parser.add_argument(
        "--gates",
        help="gate adapter directory (ours or official; prefill gates, decode gates or both) or hub id; "
        "none: dense attention",
    )
    parser.add_argument(
        "--decode-gates", help="an adapter whose decode gates to use (with --gates: its prefill gates and these)"
    )
    parser.add_argument(
        "--allow-other-base", action="store_true", help="use the gates on a base other than the one they recorded"
    )
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt (default: standard input)")
    source.add_argument("--prompt-file", type=Path, help="a file holding the prompt")
    source.add_argument(
        "--prompts-file", type=Path, help='a batch: one JSON string or {"prompt": ...} per line; JSON lines out'
    )
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (one user message)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else the sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--selection",
        help="prefill block selection: threshold=X, nz_ratio=Y or budget=D (mean density), and/or quest_weight=W (the "
        "gate's scores plus W times the quest scores), comma separated (default: the adapter's)",
    )
    parser.add_argument(
        "--decode-selection",
        help="decode block selection: token_budget=N (tokens), context_fraction=F (of each row's context) or "
        "threshold=X, and/or quest_weight=W (the gate's scores plus W times Quest's bound), comma separated; a "
        "budget is shared among layers by the adapter's decode allocation when it records one (default: the "
        "adapter's)",
    )
    parser.add_argument(
        "--attention",
        choices=("auto", "xla", "cudnn"),
        default="auto",
        help="dense attention implementation; auto: cudnn on GPU, else xla",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32", "float16"),
        default="auto",
        help="compute dtype; auto: bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument(
        "--max-length", type=int, help="refuse prompt + new tokens beyond this (default: max_position_embeddings)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts of --prompts-file decoded together")
    return parser


def _prompts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.prompt is not None:
        return (args.prompt,)
    if args.prompt_file is not None:
        return (args.prompt_file.read_text(),)
    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    if sys.stdin is None or sys.stdin.isatty():
        return ()
    text = sys.stdin.read()
    return (text,) if text.strip() else ()


def run(config: GenerateConfig) -> None:
    """Loads the model and generates; see the module docstring."""
    from seer_jax.pipeline import load

    log.info("loading %s", config.model or f"the base model of {config.gates or config.decode_gates}")
    generator = load(
        config.model,
        gates=config.gates,
        decode_gates=config.decode_gates,
        selection=config.selection,
        decode_selection=config.decode_selection,
        dtype=config.dtype,
        attention=config.attention,
        tokenizer=config.tokenizer,
        max_length=config.max_length,
        allow_other_base=config.allow_other_base,
    )
    if generator.gates_description is not None:
        log.info("block selection: %s", generator.gates_description)

    def stream_text(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def write_completion(row: int, text: str) -> None:
        record = {"index": row, "prompt": config.prompts[row], "completion": text}
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    result = generator.run(
        list(config.prompts),
        max_new_tokens=config.max_new_tokens,
        chat=config.chat,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        batch_size=config.batch_size,
        on_text=None if config.batch else stream_text,
        on_done=write_completion if config.batch else None,
    )
    if not config.batch:
        sys.stdout.write("\n")
        sys.stdout.flush()
    print(result.stats.summary(), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # force: an imported library may have configured the root logger already. The root stays at WARNING, so only
    # this CLI's own INFO lines are shown, not the libraries'.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)
    try:
        config = GenerateConfig(
            model=args.model,
            gates=args.gates,
            decode_gates=args.decode_gates,
            tokenizer=args.tokenizer,
            prompts=_prompts(args),
            batch=args.prompts_file is not None,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            selection=args.selection,
            decode_selection=args.decode_selection,
            attention=None if args.attention == "auto" else args.attention,
            dtype=None if args.dtype == "auto" else args.dtype,
            max_length=args.max_length,
            batch_size=args.batch_size,
            allow_other_base=args.allow_other_base,
        )
        shown = dataclasses.replace(config, prompts=(f"<{len(config.prompts)} prompt(s)>",))
        log.info("%s", shown)
        run(config)
    except (ValueError, OSError, ImportError) as error:  # CheckpointError, ModelPathError are ValueErrors
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"error: {message}") from None


if __name__ == "__main__":
    main()
