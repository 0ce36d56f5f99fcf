"""Text in, text out: a model, its tokenizer and optionally SeerAttention gates, loaded in one call.

    generator = load("MODEL_DIR_OR_HUB_ID", gates="runs/gates/adapter")     # gates=None: dense attention
    texts = generator.generate(["def fib(n):"], max_new_tokens=64)           # list[str]
    result = generator.run(prompts, max_new_tokens=64, chat=True, on_text=print_delta)   # texts, tokens, stats

`load` resolves `model` and `gates` with `seer_jax.model_path` (local directory, or hub id in the local Hugging
Face cache), loads the weights (`seer_jax.checkpoint.load_model`), attaches the gates (`seer_jax.adapters`: prefill
gates, SeerAttention-R decode gates or both; `decode_gates` takes the decode gates from a second adapter, e.g. an
official prefill + decode pair) with the adapter's block selections or the ones given (a decode budget shared
among layers by the adapter's calibrated decode allocation, when it records one), and the tokenizer from the model
directory (a converted directory carries it, `seer_jax.model_files`). Without `model`, the base model the
adapter names is used. `Generator.gates_description` says which selections are used and where they come from.

`Generator.run` tokenizes (the tokenizer's chat template with `chat=True`), left-pads batches of up to
`batch_size` prompts, prefills (block-sparse with prefill gates) and decodes step by step
(`seer_jax.generate.TokenStream`; block-sparse with decode gates, else dense), reporting text as it is produced
through `on_text(row, new_text)` and each finished completion through `on_done(row, text)`. Its
`GenerationStats` give prompt tokens, time to first token (compilation excluded), decode tokens/s and the
prefill's block density (mean over layers and heads).
"""

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from seer_jax.adapters import Adapter, attach_gates, combine_adapters, read_adapter
from seer_jax.base_identity import check_base_identity
from seer_jax.checkpoint import load_model
from seer_jax.decode_config import DecodeConfig
from seer_jax.generate import TokenStream
from seer_jax.model import CausalLM
from seer_jax.model_path import resolve_model_path
from seer_jax.seer import SeerCausalLM
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection

DTYPES = ("bfloat16", "float32", "float16")
ATTENTION = ("xla", "cudnn")
# Incomplete UTF-8 at the end of a partial decode (byte-level BPE splits characters across tokens) decodes to this;
# it is held back until the next token completes it.
_REPLACEMENT = "\ufffd"


def default_dtype() -> str:
    """bfloat16 on an accelerator, float32 on CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def default_attention() -> str:
    """cuDNN attention on a GPU, XLA's elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def split_quest_weight(text: str) -> tuple[str | None, float | None]:
    """A selection flag "threshold=X,quest_weight=W" → ("threshold=X", W): the selection's text (None when only the
    weight is given) and the `quest_weight` (None when not given). For `--selection` and `--decode-selection`."""
    parts = [part.strip() for part in text.split(",")]
    weights = [part for part in parts if part.partition("=")[0].strip().replace("-", "_") == "quest_weight"]
    rest = [part for part in parts if part not in weights]
    if len(weights) > 1 or len(rest) > 1:
        raise ValueError(f"selection {text!r}: expected one selection and/or quest_weight=W, comma separated")
    weight = None
    if weights:
        value = weights[0].partition("=")[2]
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"selection {text!r}: {value!r} is not a number") from None
    return (rest[0] if rest else None), weight


def parse_selection(text: str, default: Selection | None = None) -> Selection:
    """A selection from "threshold=X", "nz_ratio=Y" or "budget=D", its other fields (last_block_dense, a density
    budget's per-layer allocation) from `default` (None: `Selection()`'s). A budget without an allocation (the
    adapter records none) gives every sparse layer the density D."""
    method, sep, value = text.partition("=")
    method = method.strip().replace("-", "_")
    if not sep or method not in ("threshold", "nz_ratio", "budget"):
        raise ValueError(f"selection {text!r}: expected threshold=X, nz_ratio=Y or budget=D")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"selection {text!r}: {value!r} is not a number") from None
    return dataclasses.replace(default or Selection(), method=method, **{method: number})


def parse_decode_selection(text: str, default: DecodeConfig) -> DecodeConfig:
    """`default` (the decode gates' config) selecting by "token_budget=N" (tokens), "context_fraction=F" (of each
    row's context) or "threshold=X", and/or scoring with "quest_weight=W" (`DecodeConfig.quest_weight`), comma
    separated ("context_fraction=0.1,quest_weight=0.5"). A budget keeps `default`'s per-layer allocation (the
    adapter's calibrated shares; uniform without one); a threshold has none."""
    selection, weight = split_quest_weight(text)
    decode = default if weight is None else dataclasses.replace(default, quest_weight=weight)
    if selection is None:
        return decode
    method, sep, value = selection.partition("=")
    method = method.strip().replace("-", "_")
    if not sep or method not in ("token_budget", "context_fraction", "threshold"):
        raise ValueError(
            f"decode selection {text!r}: expected token_budget=N or threshold=X, or context_fraction=F (of the context)"
        )
    try:
        number = int(value) if method == "token_budget" else float(value)
    except ValueError:
        kind = "an integer" if method == "token_budget" else "a number"
        raise ValueError(f"decode selection {text!r}: {value!r} is not {kind}") from None
    allocation = None if method == "threshold" else default.allocation
    return dataclasses.replace(decode, method=method, allocation=allocation, **{method: number})


def describe_selection(seer_config: SeerConfig) -> tuple[str, str]:
    """(prefill, decode): how `seer_config` selects blocks, e.g. ("nz_ratio=0.3, last_block_dense",
    "token_budget=4096 (64 blocks of 64)", or with a decode allocation "context_fraction=0.1 shared among layers by a
    recall allocation (calibrated at 8192 tokens)"); "dense (no ... gates)" for an absent kind of gate."""
    selection = seer_config.selection
    if seer_config.gate is None:
        prefill = "dense (no prefill gates)"
    else:
        prefill = f"{selection.method}={getattr(selection, selection.method)}"
        prefill += ", last_block_dense" if selection.last_block_dense else ""
        prefill += " (every block)" if selection.is_dense else ""
        prefill += f", dense below layer {seer_config.start_layer}" if seer_config.start_layer else ""
        weighted = seer_config.quest_weight and seer_config.source == "gate"
        prefill += f", gate scores + {seer_config.quest_weight:g} × quest scores" if weighted else ""
    decode = seer_config.decode
    if decode is None:
        return prefill, "dense (no decode gates)"
    if decode.method == "token_budget":
        blocks = decode.budget_blocks
        text = f"token_budget={decode.token_budget} ({blocks} block{'s' * (blocks != 1)} of {decode.block_size})"
    else:
        text = f"{decode.method}={getattr(decode, decode.method)}"
    if decode.allocation is not None:
        rule = decode.allocation.rule or "calibrated"
        text += f" shared among layers by a {rule} allocation (calibrated at {decode.allocation.length} tokens)"
    extras = [
        "" if decode.force_sink else "no sink block",
        f"sliding_window={decode.sliding_window}" if decode.sliding_window else "",
        f"dense below layer {decode.start_layer}" if decode.start_layer else "",
        "rope_at_block_end" if decode.rope_at_block_end else "",
        f"gate scores + {decode.quest_weight:g} × Quest bound" if decode.keeps_key_bounds else "",
    ]
    return prefill, ", ".join([text, *filter(None, extras)])


def describe_gates(model: SeerCausalLM, adapter: Adapter, *, prefill_given: bool, decode_given: bool) -> str:
    """One line: the prefill and decode selections `model` uses, whether given or the adapter's default, and the
    density the default reached where the adapter measured it."""
    prefill, decode = describe_selection(model.seer_config)
    parts = []
    for kind, text, given, measured, present in (
        ("prefill", prefill, prefill_given, adapter.prefill_density, model.seer_config.gate is not None),
        ("decode", decode, decode_given, adapter.decode_density, model.seer_config.decode is not None),
    ):
        if present:
            origin = "given" if given else "the adapter's default"
            if measured is not None and not given:
                origin += f"; density {measured.density:.3f} measured on {measured.data}"
            text += f" ({origin})"
        parts.append(f"{kind} {text}")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """Attributes:
    prompt_tokens: real (unpadded) prompt tokens over all prompts.
    new_tokens: generated tokens over all prompts, each row's EOS included.
    compile_seconds: ahead-of-time compilation of the prefill and decode step (none when already compiled).
    ttft_seconds: time to first token of the first batch: prefill and first sample, compilation excluded.
    decode_seconds: time spent in decode steps over all batches.
    decode_tokens: tokens those steps produced for unfinished rows.
    density: the prefill's block density, mean over layers, heads and batches; None for a dense model.
    """

    prompt_tokens: int
    new_tokens: int
    compile_seconds: float
    ttft_seconds: float
    decode_seconds: float
    decode_tokens: int
    density: float | None

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        """One line: prompt tokens, TTFT, decode speed, block density."""
        density = "dense" if self.density is None else f"{self.density:.3f}"
        return (
            f"prompt tokens {self.prompt_tokens} | time to first token {self.ttft_seconds:.3f} s "
            f"(compile {self.compile_seconds:.1f} s) | decode {self.decode_tokens_per_second:.1f} tokens/s "
            f"({self.new_tokens} new tokens) | block density {density}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """texts: each prompt's completion (special tokens dropped); tokens: its token ids up to, not including, EOS."""

    texts: list[str]
    tokens: list[list[int]]
    stats: GenerationStats


class PromptTooLongError(ValueError):
    """A prompt that, with the tokens to generate, exceeds the generator's `max_length`."""


class Generator:
    """A loaded model (a `CausalLM`, or a `SeerCausalLM` with gates) and its tokenizer; see the module docstring.

    Attributes:
      model, tokenizer: as loaded.
      eos_token_ids: tokens that end a completion (config.json, generation_config.json and the tokenizer's EOS).
      max_length: the longest prompt plus completion accepted (default: the model's `max_position_embeddings`).
      gates_description: which block selections the gates use (`describe_gates`; set by `load`), None without gates.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        *,
        eos_token_ids: Sequence[int] = (),
        max_length: int | None = None,
        gates_description: str | None = None,
    ):
        self.model = model
        self.gates_description = gates_description
        self.tokenizer = tokenizer
        tokenizer_eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        self.eos_token_ids = tuple(dict.fromkeys([*model.config.eos_token_ids, *eos_token_ids, *tokenizer_eos]))
        window = model.config.sliding_window
        self.max_length = max_length or min(model.config.max_position_embeddings, window or np.inf)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    @property
    def is_sparse(self) -> bool:
        """True when the model has gates (prefill is block-sparse with prefill gates whose selection drops blocks;
        decode with decode gates)."""
        return isinstance(self.model, SeerCausalLM)

    def encode(self, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
        """Token ids of each prompt: the tokenizer's own special tokens (e.g. BOS), or with `chat` the chat template
        applied to one user message with the generation prompt."""
        if not chat:
            return [list(self.tokenizer(prompt)["input_ids"]) for prompt in prompts]
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; leave out --chat (chat=False)")
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            for prompt in prompts
        ]
        # The template writes BOS itself where the model wants one.
        return [list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]

    def generate(self, prompts: str | Sequence[str], **options) -> list[str]:
        """The completions of `prompts` (options as `run`)."""
        return self.run([prompts] if isinstance(prompts, str) else prompts, **options).texts

    def run(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        chat: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        on_text: Callable[[int, str], None] | None = None,
        on_done: Callable[[int, str], None] | None = None,
    ) -> Generation:
        """Completes each prompt; see the module docstring.

        Args:
          prompts: the prompts.
          max_new_tokens: the most tokens generated per prompt (fewer when it emits an EOS token).
          chat: apply the tokenizer's chat template (one user message per prompt).
          temperature: 0 for greedy decoding, else sampling at this temperature; top_p: nucleus sampling.
          seed: seeds sampling (each batch folds in its index).
          batch_size: prompts decoded together (left-padded to the longest).
          on_text: called with (prompt index, new text) as text is produced.
          on_done: called with (prompt index, completion) when a prompt's completion ends.

        Raises:
          PromptTooLongError: a prompt's tokens plus `max_new_tokens` exceed `max_length`.
        """
        if not prompts:
            raise ValueError("no prompts given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = self.encode(prompts, chat=chat)
        for index, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > self.max_length:
                raise PromptTooLongError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                    f"max_length={self.max_length}: shorten the prompt or generate fewer tokens"
                )
            if not ids:
                raise ValueError(f"prompt {index} is empty after tokenization")
        texts: list[str] = [""] * len(prompts)
        tokens: list[list[int]] = [[] for _ in prompts]
        parts = []
        for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
            rows = range(start, min(start + batch_size, len(prompts)))
            parts.append(
                self._run_batch(
                    [encoded[row] for row in rows],
                    list(rows),
                    texts,
                    tokens,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    rng=jax.random.fold_in(jax.random.key(seed), batch_index),
                    on_text=on_text,
                    on_done=on_done,
                )
            )
        densities = [part.density for part in parts if part.density is not None]
        stats = GenerationStats(
            prompt_tokens=sum(part.prompt_tokens for part in parts),
            new_tokens=sum(part.new_tokens for part in parts),
            compile_seconds=sum(part.compile_seconds for part in parts),
            ttft_seconds=parts[0].ttft_seconds,
            decode_seconds=sum(part.decode_seconds for part in parts),
            decode_tokens=sum(part.decode_tokens for part in parts),
            density=float(np.mean(densities)) if densities else None,
        )
        return Generation(texts=texts, tokens=tokens, stats=stats)

    def _run_batch(
        self,
        encoded: list[list[int]],
        rows: list[int],
        texts: list[str],
        tokens: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        rng: jax.Array,
        on_text: Callable[[int, str], None] | None,
        on_done: Callable[[int, str], None] | None,
    ) -> GenerationStats:
        length = max(map(len, encoded))
        batch = np.full((len(encoded), length), self.pad_token_id, np.int32)  # [B, T], left-padded
        mask = np.zeros((len(encoded), length), bool)  # [B, T]
        for row, ids in enumerate(encoded):
            batch[row, length - len(ids) :] = ids
            mask[row, length - len(ids) :] = True
        stream = TokenStream(
            self.model,
            jnp.asarray(batch),
            None if mask.all() else jnp.asarray(mask),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            rng=rng,
            collect=("density",) if self.is_sparse else (),
        )
        finished = [False] * len(encoded)
        new_tokens = decode_tokens = 0
        ttft = decode_seconds = 0.0
        start = time.perf_counter()
        for step, step_tokens in enumerate(stream):
            step_tokens = np.asarray(step_tokens)  # [B]; waits for the step
            now = time.perf_counter()
            if step == 0:
                ttft = now - start
            else:
                decode_seconds += now - start
            start = now
            for row, token in enumerate(step_tokens.tolist()):
                if finished[row]:
                    continue
                new_tokens += 1
                decode_tokens += step > 0
                if token in self.eos_token_ids:
                    finished[row] = True
                else:
                    tokens[rows[row]].append(token)
                    self._emit(rows[row], texts, tokens, on_text, final=False)
                if finished[row] or step == max_new_tokens - 1:
                    finished[row] = True
                    self._emit(rows[row], texts, tokens, on_text, final=True)
                    if on_done is not None:
                        on_done(rows[row], texts[rows[row]])
            start = time.perf_counter()  # the callbacks' time is neither prefill nor decode
        density = None
        if self.is_sparse:
            density = float(jnp.mean(jnp.stack([layer["density"] for layer in stream.collected])))
        return GenerationStats(
            prompt_tokens=int(mask.sum()),
            new_tokens=new_tokens,
            compile_seconds=stream.compile_seconds,
            ttft_seconds=ttft,
            decode_seconds=decode_seconds,
            decode_tokens=decode_tokens,
            density=density,
        )

    def _emit(
        self,
        row: int,
        texts: list[str],
        tokens: list[list[int]],
        on_text: Callable[[int, str], None] | None,
        *,
        final: bool,
    ) -> None:
        """Decodes row's tokens so far and reports the text beyond what was reported (incomplete characters are
        held back until `final`)."""
        text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
        if not final:
            text = text.rstrip(_REPLACEMENT)
        if len(text) > len(texts[row]) and text.startswith(texts[row]):
            if on_text is not None:
                on_text(row, text[len(texts[row]) :])
            texts[row] = text
        elif final and text != texts[row]:
            # A later token changed already reported text (a tokenizer that merges across tokens): report the
            # completion as decoded in one go.
            texts[row] = text


def load(
    model: str | Path | None = None,
    *,
    gates: str | Path | None = None,
    decode_gates: str | Path | None = None,
    selection: Selection | str | None = None,
    decode_selection: DecodeConfig | str | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    tokenizer: str | Path | None = None,
    max_length: int | None = None,
    allow_other_base: bool = False,
) -> Generator:
    """Loads a model, its tokenizer and optionally gates; see the module docstring.

    Args:
      model: a Hugging Face or converted directory, or a hub id in the local HF cache; None: the adapter's base model.
      gates: an adapter directory (this project's or an official one; prefill gates, decode gates or both) or hub
        id; None for dense attention.
      decode_gates: an adapter whose decode gates to use (its prefill gates, if any, are left out); with `gates`,
        `gates`' own decode gates are replaced (`seer_jax.adapters.combine_adapters`).
      selection: how the prefill gates select blocks: a `Selection`, "threshold=X", "nz_ratio=Y" or "budget=D",
        and/or "quest_weight=W" (the prefill `SeerConfig.quest_weight`), comma separated; None: the adapter's.
      decode_selection: how the decode gates select blocks: a `DecodeConfig` (the gates' structure unchanged),
        "token_budget=N", "context_fraction=F" or "threshold=X"; None: the adapter's. A budget is shared among
        layers by the adapter's decode allocation when it records one (`parse_decode_selection`).
      dtype: compute and weight dtype, one of `DTYPES`; None: `default_dtype()`.
      attention: dense attention implementation, one of `ATTENTION`; None: `default_attention()`.
      tokenizer: the tokenizer's directory or hub id; None: the model's.
      max_length: the longest prompt plus completion to accept; None: the model's `max_position_embeddings`.
      allow_other_base: attach the gates even to a base other than the one the adapter recorded
        (`seer_jax.base_identity`); otherwise that raises `CheckpointError`.
    """
    dtype = dtype or default_dtype()
    attention = attention or default_attention()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if selection is not None and gates is None:
        raise ValueError("a selection needs gates (--gates)")
    if decode_selection is not None and gates is None and decode_gates is None:
        raise ValueError("a decode selection needs decode gates (--gates or --decode-gates)")
    adapter = None if gates is None else read_adapter(resolve_model_path(gates, flag="--gates"))
    if decode_gates is not None:
        decode_adapter = read_adapter(resolve_model_path(decode_gates, flag="--decode-gates"))
        adapter = combine_adapters(adapter, decode_adapter)
    if model is None:
        if adapter is None or adapter.base_model is None:
            raise ValueError("no model given (--model), and no adapter naming its base model")
        model = adapter.base_model
    model_dir = resolve_model_path(model)
    base, _ = load_model(model_dir, dtype=jnp.dtype(dtype), attention_implementation=attention)
    lm: CausalLM = base
    description = None
    quest_weight = None
    if adapter is not None:
        if isinstance(selection, str):
            text, quest_weight = split_quest_weight(selection)
            selection = None if text is None else parse_selection(text, adapter.seer_config.selection)
        if isinstance(decode_selection, str):
            if adapter.seer_config.decode is None:
                raise ValueError("a decode selection needs decode gates; these gates are prefill gates only")
            decode_selection = parse_decode_selection(decode_selection, adapter.seer_config.decode)
        name = " + ".join(str(path) for path in (gates, decode_gates) if path is not None)
        check_base_identity(adapter.base_identity, base, adapter=name, allow_other_base=allow_other_base)
        lm = attach_gates(base, adapter, selection=selection, decode=decode_selection, quest_weight=quest_weight)
        prefill_given = selection is not None or quest_weight is not None
        description = describe_gates(
            lm, adapter, prefill_given=prefill_given, decode_given=decode_selection is not None
        )
    tokenizer_dir = model_dir if tokenizer is None else resolve_model_path(tokenizer, flag="--tokenizer")
    return Generator(
        lm,
        _load_tokenizer(tokenizer_dir),
        eos_token_ids=_generation_eos(model_dir),
        max_length=max_length,
        gates_description=description,
    )


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"no usable tokenizer in {directory} ({reason}); pass a tokenizer directory") from None


def _generation_eos(model_dir: Path) -> tuple[int, ...]:
    """EOS tokens generation_config.json adds (instruct models end turns with a token config.json may not list)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
