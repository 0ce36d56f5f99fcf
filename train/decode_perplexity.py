"""Decode-mode perplexity: each window's continuation decoded token by token, teacher-forced, under sparse decoding
(docs/design.md §7). `train.perplexity.evaluate` runs it for `EvalConfig(mode="decode")`.

Protocol: the windows of the prefill mode (`train.data.eval_windows`: the first L tokens, BOS + text, of the first
documents holding L tokens). A window's first L − C − 1 tokens are the prompt, prefilled once; then C decode steps
feed tokens L − C − 1 … L − 2 and score tokens L − C … L − 1, so each of the last C tokens is predicted by a decode
step, exactly as `seer_jax.generate` decodes after that prompt: the same prefill, the same cache of L − 1 slots and
the same model step (`teacher_forced_log_probs`; a test checks it against token-by-token generation). A document's
NLL is the mean over its C predictions; PPL = exp(mean over documents).

Rows (`DecodeSetting`): "dense" (the base model prefills and decodes densely: the reference), then every decode score
source (`seer_jax.decode_scores`: gate, oracle, quest, streaming, random) at every budget: a token budget (top-k of
budget // 64 blocks per step) or a fraction of the context (`DecodeConfig.context_fraction`: floor(f · n / 64)
blocks at a step whose row holds n tokens); forced blocks (the current one, the sink) come on top, the same for every
source, so at one budget every source attends the same number of blocks. Layers below `start_layer` decode densely.
With a decode allocation (`seer_jax.decode_config.DecodeAllocation`: the adapter's, or calibrated on the prompts by
`calibrate_allocation`) the "gate" rows share each budget among the layers by it (`DecodeConfig.for_layer`); the
other sources keep a uniform budget.
The prompt is prefilled densely; with `prefill` (a `Selection`) the "gate" rows and a dense-decode row are run once
more after a block-sparse prefill with the adapter's prefill gates: prefill gates and decode gates together.
Density: per layer, the blocks attended over the blocks holding real tokens (the current one included), summed over
steps, rows and heads (kv heads, or query heads for Quest); a row's density is the mean over layers >= start_layer.

Work: per batch of documents, each distinct prefill (dense, dense with the decode gate's compressed keys, sparse)
runs once and its cache serves every setting that starts from it; each setting's decode steps run as a
`jax.lax.scan` of `chunk` steps, compiled once per setting (and shape), so a progress callback sees every chunk.
"""

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seer_jax.adapters import Adapter, attach_gates
from seer_jax.decode_calibration import decode_allocation
from seer_jax.decode_config import DecodeAllocation, DecodeConfig
from seer_jax.gate import GateConfig, GateParam
from seer_jax.kv_cache import KVCache
from seer_jax.model import CausalLM
from seer_jax.seer import DECODE_COLLECTABLE, SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import SeerConfig
from seer_jax.sparsity import Selection
from train.ppl_results import weighted_method

_PERCENT = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)%")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBudget:
    """How many blocks a decode step may choose: exactly one of `tokens` (a token budget, `DecodeConfig.token_budget`:
    tokens // block_size blocks) or `fraction` (of the row's context, `DecodeConfig.context_fraction`)."""

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError(f"decode budget: give exactly one of tokens and fraction, got {self}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 0):
            raise ValueError(f"decode budget: tokens must be an int >= 0, got {self.tokens!r}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"decode budget: fraction must be in (0, 1], got {self.fraction!r}")

    @classmethod
    def parse(cls, text: str) -> "DecodeBudget":
        """ "256" (tokens) or "10%" (a fraction of the context)."""
        text = str(text).strip()
        if text.isdigit():
            return cls(tokens=int(text))
        match = _PERCENT.fullmatch(text)
        if match is None:
            raise ValueError(f"decode budget {text!r}: write tokens (256) or a percentage of the context (10%)")
        return cls(fraction=float(match["number"]) / 100)

    def __str__(self) -> str:
        return str(self.tokens) if self.tokens is not None else f"{self.fraction * 100:g}%"

    def applied_to(self, decode: DecodeConfig) -> DecodeConfig:
        """`decode` selecting by this budget."""
        if self.tokens is not None:
            return dataclasses.replace(decode, method="token_budget", token_budget=self.tokens)
        return dataclasses.replace(decode, method="context_fraction", context_fraction=self.fraction)


DEFAULT_BUDGETS = tuple(DecodeBudget.parse(text) for text in ("256", "512", "1024", "2048", "5%", "10%", "25%"))


def allocation_label(allocation: DecodeAllocation) -> str:
    """ "recall allocation", "coverage allocation" ("calibrated allocation" when the rule is not recorded)."""
    return f"{allocation.rule or 'calibrated'} allocation"


@dataclasses.dataclass(frozen=True)
class DecodeSetting:
    """One row's model: a method ("dense" or a decode score source), its decode budget (None: dense decode), the
    prefill selection of the adapter's prefill gates (None: dense prefill), the per-layer decode allocation its
    budget is shared by (None: every sparse layer the same budget) and, for "gate", the weight of Quest's bound
    added to the gate's scores (`DecodeConfig.quest_weight`; 0: the gate alone)."""

    method: str
    budget: DecodeBudget | None = None
    prefill: Selection | None = None
    allocation: DecodeAllocation | None = None
    quest_weight: float = 0.0

    @property
    def method_label(self) -> str:
        """The method, "gate+0.25quest" for a gate with a Quest weight."""
        return weighted_method(self.method, self.quest_weight)

    @property
    def prefill_label(self) -> str:
        """ "dense", or the prefill gates' selection ("gate nz 0.1", "gate threshold 0.002")."""
        if self.prefill is None:
            return "dense"
        if self.prefill.method == "nz_ratio":
            return f"gate nz {self.prefill.nz_ratio:g}"
        return f"gate threshold {self.prefill.threshold:g}"

    @property
    def label(self) -> str:
        decode = "dense decode" if self.budget is None else f"{self.method_label} {self.budget}"
        if self.allocation is not None:
            decode += f" ({allocation_label(self.allocation)})"
        return decode if self.prefill is None else f"{decode}, prefill {self.prefill_label}"

    @property
    def compresses_keys(self) -> bool:
        """Whether its prefill must also fill the decode gate's compressed keys."""
        return self.method == "gate" and self.budget is not None

    @property
    def keeps_key_bounds(self) -> bool:
        """Whether its compressed keys also keep the blocks' key bounds (a gate with a Quest weight)."""
        return self.compresses_keys and self.quest_weight > 0


def decode_settings(
    methods: Sequence[str],
    budgets: Sequence[DecodeBudget],
    prefill: Selection | None,
    allocation: DecodeAllocation | None = None,
    quest_weights: Sequence[float] = (0.0,),
) -> list[DecodeSetting]:
    """The settings of a decode-mode evaluation, in row order (module docstring); the "gate" rows' budgets are
    shared among layers by `allocation`, and they run once per Quest weight of `quest_weights`."""
    settings = []
    for method in methods:
        if method == "dense":
            settings.append(DecodeSetting("dense"))
        elif method == "gate":
            settings += [
                DecodeSetting(method, budget, allocation=allocation, quest_weight=weight)
                for weight in quest_weights
                for budget in budgets
            ]
        else:
            settings += [DecodeSetting(method, budget) for budget in budgets]
    if prefill is not None:
        settings.append(DecodeSetting("dense", prefill=prefill))
        if "gate" in methods:
            settings += [
                DecodeSetting("gate", budget, prefill, allocation, weight)
                for weight in quest_weights
                for budget in budgets
            ]
    return settings


@dataclasses.dataclass(frozen=True)
class DecodeTask:
    """One compiled call: decode steps [start, stop) of `setting` on batch `batch` (of `num_batches`) of the
    length-`length` windows, whose continuation has `steps` steps."""

    length: int
    setting: DecodeSetting
    batch: int
    num_batches: int
    start: int
    stop: int
    steps: int

    def __str__(self) -> str:
        where = f"[{self.batch + 1}/{self.num_batches}] steps {self.stop}/{self.steps}"
        return f"L={self.length} {self.setting.label} {where}"


@dataclasses.dataclass(frozen=True)
class DecodeMeasurement:
    """What the decode steps of one setting gave at one length.

    Attributes:
      doc_nll: f64 [n], per document the mean NLL of its C continuation tokens.
      layer_density: f64 [L], per layer the attended over the available blocks (1 in dense layers).
      prefill_density: the sparse prefill's block density (mean over its sparse layers and heads), or None.
      seconds: wall time of its prefills (when it ran them) and decode steps, compilation included.
    """

    doc_nll: np.ndarray
    layer_density: np.ndarray
    prefill_density: float | None
    seconds: float


class DecodeModels:
    """Builds (once) each setting's model over the base model's weights.

    Every model carries the adapter's gate weights, prefill and decode, with zeros for gates the adapter does not
    have (only the "gate" source reads decode gates and only a sparse prefill reads prefill gates; both are checked
    before running). Dense prefill: every layer attends densely (prefill start_layer = the layer count). The decode
    allocation is the setting's (the adapter's own is not used unless the setting holds it).
    """

    def __init__(self, base: CausalLM, adapter: Adapter | None, *, start_layer: int, seed: int):
        self.base, self.start_layer, self.seed = base, start_layer, seed
        config = base.config
        seer_config = None if adapter is None else adapter.seer_config
        self.gate_config = GateConfig(hidden_size=config.head_dim) if seer_config is None else seer_config.gate
        self.prefill_start_layer = 0 if seer_config is None else seer_config.start_layer
        self.prefill_quest_weight = 0.0 if seer_config is None else seer_config.quest_weight
        has_decode = seer_config is not None and seer_config.decode is not None
        self.decode_structure = (
            dataclasses.replace(seer_config.decode, allocation=None)
            if has_decode
            else DecodeConfig(hidden_size=config.head_dim)
        )
        template = seer_with_abstract_gates(base, SeerConfig(gate=self.gate_config, decode=self.decode_structure))
        gates = {path: jnp.zeros(v.get_value().shape, v.get_value().dtype) for path, v in _flat_gates(template)}
        if adapter is not None:
            gates |= {path: variable.get_value() for path, variable in _flat_gates(attach_gates(base, adapter))}
        self.gates = gates
        self._built: dict[DecodeSetting, CausalLM] = {}

    def get(self, setting: DecodeSetting) -> CausalLM:
        if setting.budget is None and setting.prefill is None:
            return self.base
        if setting not in self._built:
            decode = None
            if setting.budget is not None:
                decode = setting.budget.applied_to(
                    dataclasses.replace(self.decode_structure, start_layer=self.start_layer)
                )
                decode = dataclasses.replace(
                    decode, source=setting.method, allocation=setting.allocation, quest_weight=setting.quest_weight
                )
            seer_config = SeerConfig(
                gate=self.gate_config,
                selection=Selection() if setting.prefill is None else setting.prefill,
                start_layer=self.base.config.num_layers if setting.prefill is None else self.prefill_start_layer,
                quest_weight=self.prefill_quest_weight,
                seed=self.seed,
                decode=decode,
            )
            model = seer_with_abstract_gates(self.base, seer_config)
            graphdef, gates, rest = nnx.split(model, GateParam, ...)
            for path, variable in nnx.to_flat_state(gates):
                variable.set_value(self.gates[path])
            self._built[setting] = nnx.merge(graphdef, gates, rest)
        return self._built[setting]


def calibrate_allocation(
    base: CausalLM, adapter: Adapter, prompts: np.ndarray, *, rule: str, start_layer: int, seed: int
) -> DecodeAllocation:
    """The "gate" rows' decode allocation calibrated now (`seer_jax.decode_calibration.decode_allocation` by `rule`)
    on `prompts` (int [B, T]: the windows' prompts, which no row scores), with the adapter's decode gates decoding
    from `start_layer`."""
    models = DecodeModels(base, adapter, start_layer=start_layer, seed=seed)
    model = models.get(DecodeSetting("gate", DecodeBudget(fraction=1.0)))
    return decode_allocation(model, jnp.asarray(prompts), rule=rule)


def _flat_gates(model: SeerCausalLM) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, GateParam)))


def prefill_for_decoding(
    model: CausalLM, prompt: jax.Array, attention_mask: jax.Array | None, *, max_length: int
) -> tuple[KVCache, jax.Array | None]:
    """The prompt's cache with `max_length` slots, as `seer_jax.generate` prefills it, and, for a `SeerCausalLM`
    whose prefill is block-sparse somewhere, its block density f32 [L, N] (else None)."""
    graphdef, state = nnx.split(model)
    sparse = isinstance(model, SeerCausalLM) and model.seer_config.start_layer < model.config.num_layers
    return _prefill_jit(graphdef, state, prompt, attention_mask, max_length=max_length, density=sparse)


def decode_chunk(
    model: CausalLM, cache: KVCache, fed: jax.Array, targets: jax.Array
) -> tuple[KVCache, jax.Array, jax.Array]:
    """Teacher-forced decode steps: feeds fed[:, i] (int [B, n]) and scores targets[:, i].

    Returns the cache after the n steps, the log-probabilities f32 [B, n] of the targets, and per layer the blocks
    attended and the blocks holding real tokens f32 [L, 2], summed over the steps, rows and heads (zeros for a model
    without block accounting, a plain `CausalLM`).
    """
    graphdef, state = nnx.split(model)
    return _decode_chunk_jit(graphdef, state, cache, fed, targets, collect=isinstance(model, SeerCausalLM))


def teacher_forced_log_probs(
    model: CausalLM,
    prompt: jax.Array,
    attention_mask: jax.Array | None,
    fed: jax.Array,
    targets: jax.Array,
    *,
    chunk: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Prefills `prompt` (int [B, T], left padding in `attention_mask`), then decodes fed (int [B, n]) one token per
    step in a cache of T + n slots, as `seer_jax.generate` with max_new_tokens = n + 1 decodes; returns the
    log-probabilities f32 [B, n] of targets (int [B, n]; targets[:, i] is predicted by the step feeding fed[:, i])
    and the block counts f32 [L, 2] of `decode_chunk`. The steps run `chunk` at a time."""
    cache, _ = prefill_for_decoding(model, prompt, attention_mask, max_length=prompt.shape[1] + fed.shape[1])
    log_probs, blocks = [], 0.0
    for start in range(0, fed.shape[1], chunk):
        cache, chunk_log_probs, chunk_blocks = decode_chunk(
            model, cache, fed[:, start : start + chunk], targets[:, start : start + chunk]
        )
        log_probs.append(chunk_log_probs)
        blocks = blocks + chunk_blocks
    return jnp.concatenate(log_probs, axis=1), blocks


def run_decode(
    base: CausalLM,
    adapter: Adapter | None,
    windows: Mapping[int, np.ndarray],
    settings: Sequence[DecodeSetting],
    *,
    continuation: int,
    start_layer: int,
    seed: int,
    batch_size: int,
    chunk: int,
    progress: Callable[[Sequence[DecodeTask]], Iterable[DecodeTask]] = iter,
) -> dict[tuple[int, DecodeSetting], DecodeMeasurement]:
    """Runs every (length, setting) on the windows (length → int [n, length]) and returns what each measured.

    progress: wraps the list of all compiled calls (length × batch × setting × chunk of decode steps), e.g. `tqdm`.
    Raises ValueError at the first chunk whose NLL is NaN/inf.
    """
    models = DecodeModels(base, adapter, start_layer=start_layer, seed=seed)
    num_layers = base.config.num_layers
    tasks = []
    for length, tokens in windows.items():
        num_batches = -(-len(tokens) // batch_size)
        for batch in range(num_batches):
            for setting in settings:
                for start in range(0, continuation, chunk):
                    stop = min(start + chunk, continuation)
                    tasks.append(DecodeTask(length, setting, batch, num_batches, start, stop, continuation))
    log_probs: dict[tuple[int, DecodeSetting], list[list[np.ndarray]]] = {}
    blocks: dict[tuple[int, DecodeSetting], np.ndarray] = {}
    prefill_density: dict[tuple[int, DecodeSetting], list[np.ndarray]] = {}
    seconds: dict[tuple[int, DecodeSetting], float] = {}
    prefills: dict[tuple, tuple[KVCache, jax.Array | None]] = {}  # the current batch's, by `_prefill_key`
    cache = None
    for task in progress(tasks):
        key = (task.length, task.setting)
        tokens = windows[task.length][task.batch * batch_size : (task.batch + 1) * batch_size]
        model = models.get(task.setting)
        began = time.perf_counter()
        if task.start == 0:
            prefill_key = (task.length, task.batch, *_prefill_key(task.setting))
            if prefill_key not in prefills:
                if any(old[:2] != prefill_key[:2] for old in prefills):
                    prefills.clear()  # a new batch: the earlier batch's caches are done
                prompt = jnp.asarray(tokens[:, : task.length - continuation - 1])
                prefills[prefill_key] = prefill_for_decoding(model, prompt, None, max_length=task.length - 1)
            cache, density = prefills[prefill_key]
            log_probs.setdefault(key, []).append([])
            if density is not None:
                prefill_density.setdefault(key, []).append(np.asarray(density))
        offset = task.length - continuation - 1
        fed = jnp.asarray(tokens[:, offset + task.start : offset + task.stop])
        targets = jnp.asarray(tokens[:, offset + task.start + 1 : offset + task.stop + 1])
        cache, chunk_log_probs, chunk_blocks = decode_chunk(model, cache, fed, targets)
        chunk_log_probs = np.asarray(chunk_log_probs)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - began
        bad = np.flatnonzero(~np.isfinite(chunk_log_probs).all(axis=1))
        if bad.size:
            raise ValueError(
                f"decode {task}: the NLL of document(s) {bad.tolist()} of the batch is not finite; the model's or the "
                "gates' weights hold NaN/inf, or the dtype overflows (evaluate in float32)"
            )
        log_probs[key][-1].append(chunk_log_probs)
        blocks[key] = blocks.get(key, 0.0) + np.asarray(chunk_blocks, np.float64)

    measurements = {}
    for key, batches in log_probs.items():
        nll = -np.concatenate([np.concatenate(chunks, axis=1) for chunks in batches]).astype(np.float64)  # [n, C]
        counted = blocks[key]
        layer_density = np.ones(num_layers) if not counted[:, 1].any() else counted[:, 0] / counted[:, 1]
        density = None
        if key in prefill_density:  # pooled over the batches' layers >= the prefill start_layer
            density = float(np.mean(np.mean(prefill_density[key], axis=0)[models.prefill_start_layer :]))
        measurements[key] = DecodeMeasurement(nll.mean(axis=1), layer_density, density, seconds[key])
    return measurements


def _prefill_key(setting: DecodeSetting) -> tuple:
    """Settings with the same key start from the same prefill cache."""
    return (setting.prefill, setting.compresses_keys, setting.keeps_key_bounds)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_length", "density"))
def _prefill_jit(graphdef, state, prompt, attention_mask, *, max_length, density):
    model = nnx.merge(graphdef, state)
    collect = ("density",) if density else ()
    _, cache, collected = model.forward(prompt, attention_mask=attention_mask, last_only=True, collect=collect)
    layer_density = jnp.stack([layer["density"] for layer in collected]) if density else None  # [L, N]
    return cache.padded_to(max_length), layer_density


@functools.partial(jax.jit, static_argnums=0, static_argnames=("collect",))
def _decode_chunk_jit(graphdef, state, cache, fed, targets, *, collect):
    model = nnx.merge(graphdef, state)
    num_layers = model.config.num_layers

    def step(cache, inputs):
        token, target = inputs  # [B], [B]
        logits, cache, collected = model.forward(
            token[:, None], cache=cache, collect=DECODE_COLLECTABLE if collect else ()
        )  # [B, 1, V]
        log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [B, V]
        scored = jnp.take_along_axis(log_probs, target[:, None], axis=-1)[:, 0]  # [B]
        if collect:
            counts = jnp.stack([layer["decode_blocks"] for layer in collected])  # [L, 2]
        else:
            counts = jnp.zeros((num_layers, 2), jnp.float32)
        return cache, (scored, counts)

    cache, (scored, counts) = jax.lax.scan(step, cache, (fed.T, targets.T))  # [n, B], [n, L, 2]
    return cache, scored.T, jnp.sum(counts, axis=0)  # [B, n], [L, 2]
