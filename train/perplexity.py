"""Perplexity vs. block density: the dense model, SeerAttention gates and training-free baselines (docs/design.md §7).

    result = evaluate(EvalConfig(model=..., data=..., gates=...))     # the CLI: `python -m train.eval_ppl`

Two modes. "prefill" (the default) scores whole windows in one forward under block-sparse prefill; "decode" scores
each window's last `continuation` tokens by teacher-forced sparse decoding, token by token as generation decodes
(`train.decode_perplexity`, which documents that protocol and its rows).

Prefill protocol: for each length L, the first L tokens (BOS + text) of each of the first `num_docs` documents that
hold at least L tokens (`train.data.eval_windows`); each document's mean NLL over its L − 1 next-token predictions;
PPL = exp(mean over documents of those means). Sparse prefill uses `last_block_dense=False`, as the original PPL runs.

Methods: "dense" is the base model with its own attention implementation (the reference). Every other method is a
`SeerCausalLM` over the same weights whose layers >= start_layer select blocks from one source: "gate" (the adapter
given as `gates`, ours or the official format), "oracle", "quest", "streaming", "random" (`seer_jax.block_scores`;
in decode mode `seer_jax.decode_scores`).
Each sparse method runs TopK at every `nz_ratio`, so all sources keep the same k blocks per row, plus the diagonal
block where TopK left it out (`seer_jax.sparsity`): densities match up to that block. `thresholds` apply to the gate
only, whose density is then whatever it selects; so do `budgets`, mean densities the gate's layers share by the
allocation the adapter records (`seer_jax.calibration.budget_for_density`), reached up to a block per layer and row.
The achieved density (mean over layers >= start_layer and heads) comes from the same forward as the NLL
(`seer_jax.forwards.logits_and_density`).

Each (method, setting, L) is compiled once and reused for every batch of `batch_size` documents (a smaller last
batch compiles once more). Settings that keep every block (nz_ratio 1, threshold 0) share one forward: no source is
consulted then. The result (`train.ppl_results.EvalResult`) writes results.json, ppl_vs_density.md and
ppl_vs_density.png and renders the markdown table.
"""

import contextlib
import dataclasses
import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seer_jax.adapters import Adapter, attach_gates, read_adapter
from seer_jax.attention import IMPLEMENTATIONS
from seer_jax.base_identity import check_base_identity
from seer_jax.checkpoint import load_model
from seer_jax.config import ModelConfig
from seer_jax.decode_config import DecodeAllocation
from seer_jax.forwards import logits_and_density
from seer_jax.gate import GateConfig, GateParam
from seer_jax.head_parallel import sparse_prefill_implementation
from seer_jax.model import CausalLM
from seer_jax.multihost import to_host
from seer_jax.seer import SeerCausalLM, seer_with_abstract_gates
from seer_jax.seer_config import BLOCK_SOURCES, SeerConfig
from seer_jax.sharding import MeshConfig, batch_rows, build_mesh, logical_rules, shard_batch, tree_shardings
from seer_jax.sparsity import BudgetAllocation, Selection
from train.data import eval_windows
from train.decode_perplexity import (
    DEFAULT_BUDGETS,
    DecodeBudget,
    DecodeMeasurement,
    DecodeSetting,
    allocation_label,
    calibrate_allocation,
    decode_settings,
    run_decode,
)
from train.losses import next_token_nll
from train.ppl_results import EvalResult, PplRow, weighted_method
from train.token_corpus import CorpusConfig, load_corpus

# "dense" (the base model) and one method per block-score source (`seer_jax.block_scores.SOURCES`)
METHODS: tuple[str, ...] = ("dense", *BLOCK_SOURCES)
DTYPES = ("bfloat16", "float32")
MODES = ("prefill", "decode")
EvalMode = Literal["prefill", "decode"]
DEFAULT_LENGTHS: dict[str, tuple[int, ...]] = {"prefill": (2048, 8192), "decode": (8192,)}
# How decode mode's "gate" rows share a budget among layers: the adapter's allocation (uniform without one), uniform,
# or calibrated on the prompts by a `seer_jax.decode_calibration` rule.
DECODE_ALLOCATIONS = ("adapter", "none", "recall", "coverage")
_VERSIONED = ("jax", "jaxlib", "flax", "numpy", "transformers", "seer-jax")

log = logging.getLogger(__name__)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate.

    Attributes:
      model: a Hugging Face or converted model directory (`seer_jax.checkpoint.load_model`).
      data: data files or directories (`train.documents` formats).
      gates: a gate adapter directory (ours or official), or None: the "gate" method is then skipped.
      tokenizer_dir: the tokenizer; None means `model`.
      text_field: the text column of the data.
      cache_dir: where the tokenized corpus is cached; None tokenizes every time.
      mode: "prefill" (whole windows, block-sparse prefill) or "decode" (each window's continuation, teacher-forced
        sparse decoding; `train.decode_perplexity`).
      lengths: window lengths L (BOS included), each >= 2 (decode: >= continuation + 2); None means (2048, 8192) in
        prefill mode, (8192,) in decode mode.
      num_docs: documents per length (the first that are at least L tokens long).
      nz_ratios: prefill mode: TopK target densities in (0, 1], run for every sparse method.
      thresholds: prefill mode: gate-only threshold settings in [0, 1).
      budgets: prefill mode: gate-only budget densities in (0, 1], shared among layers by the allocation the
        adapter's selection records (an adapter without one is an error).
      continuation: decode mode: C, the tokens scored at the end of each window, each predicted by a decode step.
      decode_budgets: decode mode: the budgets every sparse decode method runs at (`DecodeBudget`: tokens, or a
        fraction of the context).
      decode_prefill: decode mode: also run the gate's budgets and dense decoding after a block-sparse prefill with
        the adapter's prefill gates under this selection (prefill gates + decode gates); None: dense prefill only.
      decode_chunk: decode mode: decode steps per compiled call (the progress bar moves once per call).
      force_sink: prefill mode: every sparse row also keeps key block 0, the attention sink, in every query-block
        row (`Selection.force_sink`; counted against a budget, on top of nz_ratio and threshold).
      decode_allocation: decode mode: how the "gate" rows share each budget among layers, one of
        `DECODE_ALLOCATIONS`: "adapter" (the allocation the adapter's decode config records; uniform without one),
        "none" (uniform), "recall" or "coverage" (`seer_jax.decode_calibration.decode_allocation` by that rule on the
        prompts of the first `batch_size` windows of the first length, which no row scores).
      quest_weights: prefill mode: the "gate" rows run once per weight w, ranking blocks by the gate's logits plus
        w × the "quest" source's scores (`SeerConfig.quest_weight`; rows "gate+<w>quest"; a budget row keeps the
        adapter's per-layer shares, calibrated with its own weight); None: the adapter's weight.
      decode_quest_weights: decode mode: the "gate" rows run once per weight w, scoring blocks by the gate's logits
        plus w × Quest's bound (`DecodeConfig.quest_weight`; rows "gate+<w>quest"); None: the adapter's weight.
      methods: the methods to run, in order; None means all, with "gate" only when `gates` is given (and, in decode
        mode, holds decode gates).
      start_layer: layers below it stay dense (decode mode: decode densely); None means the adapter's start_layer
        (decode mode: its decode start_layer), 0 without one.
      seed: seeds the "random" source.
      batch_size: documents per forward.
      dtype: compute and weight dtype; default bfloat16 on GPU, float32 elsewhere.
      attention: the dense attention implementation (`seer_jax.attention`); default cudnn on GPU, xla elsewhere.
      mesh: run on a device mesh (`seer_jax.sharding`; batches split over data × fsdp when they divide it), or
        None: one device.
      allow_other_base: attach the gates even to a base other than the one the adapter recorded (its config or
        weights differ, `seer_jax.base_identity`); otherwise that is an error.
    """

    model: Path
    data: tuple[Path, ...]
    gates: Path | None = None
    tokenizer_dir: Path | None = None
    text_field: str = "text"
    cache_dir: Path | None = None
    mode: EvalMode = "prefill"
    lengths: tuple[int, ...] | None = None
    num_docs: int = 16
    nz_ratios: tuple[float, ...] = (0.5, 0.4, 0.3, 0.2, 0.1)
    thresholds: tuple[float, ...] = ()
    budgets: tuple[float, ...] = ()
    continuation: int = 2048
    decode_budgets: tuple[DecodeBudget, ...] = DEFAULT_BUDGETS
    decode_prefill: Selection | None = None
    decode_chunk: int = 256
    force_sink: bool = False
    decode_allocation: str = "adapter"
    decode_quest_weights: tuple[float, ...] | None = None
    quest_weights: tuple[float, ...] | None = None
    methods: tuple[str, ...] | None = None
    start_layer: int | None = None
    seed: int = 0
    batch_size: int = 4
    dtype: str = dataclasses.field(default_factory=lambda: "bfloat16" if _on_gpu() else "float32")
    attention: str = dataclasses.field(default_factory=lambda: "cudnn" if _on_gpu() else "xla")
    mesh: MeshConfig | None = None
    allow_other_base: bool = False

    def __post_init__(self):
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model} is not a directory; pass a Hugging Face or converted model")
        if not self.data:
            raise ValueError("data: no data paths given")
        if self.gates is not None and not Path(self.gates).is_dir():
            raise ValueError(f"gates: {self.gates} is not a directory; pass a gate adapter directory")
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {self.mode!r}")
        if self.lengths is None:
            object.__setattr__(self, "lengths", DEFAULT_LENGTHS[self.mode])
        if not self.lengths or any(not isinstance(n, int) or n < 2 for n in self.lengths):
            raise ValueError(f"lengths: need at least one int >= 2 (BOS + one predicted token), got {self.lengths}")
        if len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"lengths: {self.lengths} repeats a length")
        if self.num_docs <= 0:
            raise ValueError(f"num_docs: {self.num_docs} must be positive")
        for field, method in (("nz_ratios", "nz_ratio"), ("thresholds", "threshold"), ("budgets", "budget")):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"{field}: {values} repeats a value")
            for value in values:
                try:
                    Selection(method=method, **{method: value})  # the one place a selection setting is checked
                except ValueError as error:
                    raise ValueError(f"{field}: {error}") from None
        if self.methods is not None:
            unknown = [m for m in self.methods if m not in METHODS]
            if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
                raise ValueError(f"methods: need distinct methods from {METHODS}, got {self.methods}")
            if "gate" in self.methods and self.gates is None:
                raise ValueError("methods: 'gate' needs gates (an adapter directory)")
        if self.force_sink and self.mode != "prefill":
            raise ValueError("force_sink: applies to prefill mode (decode configs carry their own force_sink)")
        if self.decode_allocation not in DECODE_ALLOCATIONS:
            raise ValueError(f"decode_allocation: must be one of {DECODE_ALLOCATIONS}, got {self.decode_allocation!r}")
        if self.mode == "prefill":
            if self.decode_allocation != "adapter":
                raise ValueError("decode_allocation: applies to decode mode only")
            if self.decode_quest_weights is not None:
                raise ValueError("decode_quest_weights: apply to decode mode only")
            self._check_weights("quest_weights")
            for field in ("thresholds", "budgets"):
                if getattr(self, field) and "gate" not in self.methods_to_run:
                    raise ValueError(f"{field}: apply to the gate method only, which is not run (pass gates / 'gate')")
            if not self.nz_ratios:
                gate_settings = self.thresholds or self.budgets
                idle = [m for m in self.methods_to_run if m != "dense" and not (m == "gate" and gate_settings)]
                if idle:
                    raise ValueError(f"nz_ratios: empty, so methods {idle} have no setting to run")
        else:
            self._check_decode()
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ValueError(f"start_layer: must be an int >= 0 or None, got {self.start_layer!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: {self.batch_size} must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention: must be one of {IMPLEMENTATIONS}, got {self.attention!r}")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError("attention: cudnn runs bfloat16 only; use dtype bfloat16 or attention xla")

    def _check_weights(self, field: str) -> None:
        weights = getattr(self, field)
        if weights is None:
            return
        if not weights or len(set(weights)) != len(weights) or any(not w >= 0 for w in weights):
            raise ValueError(f"{field}: need distinct weights >= 0, got {weights}")
        if "gate" not in self.methods_to_run:
            raise ValueError(f"{field}: apply to the 'gate' rows; run the 'gate' method (gates)")

    def _check_decode(self) -> None:
        if self.quest_weights is not None:
            raise ValueError("quest_weights: apply to prefill mode only; decode mode runs decode_quest_weights")
        for field in ("thresholds", "budgets"):
            if getattr(self, field):
                raise ValueError(f"{field}: apply to prefill mode only; decode mode runs decode_budgets")
        if not isinstance(self.continuation, int) or self.continuation < 1:
            raise ValueError(f"continuation: must be an int >= 1, got {self.continuation!r}")
        short = [length for length in self.lengths if length < self.continuation + 2]
        if short:
            raise ValueError(
                f"lengths: {short} leave no prompt before a continuation of {self.continuation} tokens "
                f"(need L >= continuation + 2)"
            )
        if any(not isinstance(budget, DecodeBudget) for budget in self.decode_budgets):
            raise ValueError(f"decode_budgets: need DecodeBudget values, got {self.decode_budgets}")
        if len(set(self.decode_budgets)) != len(self.decode_budgets):
            raise ValueError(f"decode_budgets: {[str(b) for b in self.decode_budgets]} repeats a budget")
        if not self.decode_budgets and any(method != "dense" for method in self.methods_to_run):
            raise ValueError("decode_budgets: empty, so the sparse decode methods have no setting to run")
        if self.decode_prefill is not None:
            if not isinstance(self.decode_prefill, Selection):
                raise ValueError(f"decode_prefill: need a sparsity.Selection or None, got {self.decode_prefill!r}")
            if self.gates is None:
                raise ValueError("decode_prefill: a block-sparse prefill needs the adapter's prefill gates (gates)")
        if not isinstance(self.decode_chunk, int) or self.decode_chunk < 1:
            raise ValueError(f"decode_chunk: must be an int >= 1, got {self.decode_chunk!r}")
        if self.decode_allocation in ("recall", "coverage") and "gate" not in self.methods_to_run:
            raise ValueError(
                f"decode_allocation: {self.decode_allocation!r} shares the gate rows' budgets; run the 'gate' method "
                "(gates with decode gates)"
            )
        self._check_weights("decode_quest_weights")
        if self.mesh is not None:
            raise ValueError("mesh: decode mode runs on one device")

    @property
    def methods_to_run(self) -> tuple[str, ...]:
        """`methods`, or all of them ("gate" only with an adapter)."""
        if self.methods is not None:
            return self.methods
        return tuple(m for m in METHODS if m != "gate" or self.gates is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists."""
        values = {field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)}
        return values | {"methods": list(self.methods_to_run)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, MeshConfig | DecodeBudget):
        return str(value)
    if isinstance(value, Selection):
        return dataclasses.asdict(value)
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row's model: a method and its selection (None for dense)."""

    method: str
    selection: Selection | None = None
    quest_weight: float = 0.0

    @property
    def method_label(self) -> str:
        """The method, "gate+0.25quest" for a gate with a Quest weight (`SeerConfig.quest_weight`)."""
        return weighted_method(self.method, self.quest_weight)

    @property
    def label(self) -> str:
        if self.selection is None:
            return self.method
        if self.selection.method == "nz_ratio":
            return f"{self.method_label} nz {self.selection.nz_ratio:g}"
        if self.selection.method == "budget":
            return f"{self.method_label} budget {self.selection.budget:g}"
        return f"{self.method_label} threshold {self.selection.threshold:g}"

    @property
    def computed_as(self) -> "Setting":
        """The setting whose forward gives this one's numbers: a selection that keeps every block (nz_ratio 1,
        threshold 0) never consults its source (`SeerAttention.causal_attention`), so one forward serves every
        method."""
        if self.selection is not None and self.selection.is_dense:
            return _EVERY_BLOCK
        return self


_EVERY_BLOCK = Setting("every block", Selection(nz_ratio=1.0, last_block_dense=False))


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One forward: batch `batch` (of `num_batches`) of the length-`length` windows, under `setting` (a
    `Setting.computed_as`)."""

    length: int
    setting: Setting
    batch: int
    num_batches: int

    def __str__(self) -> str:
        return f"L={self.length} {self.setting.label} [{self.batch + 1}/{self.num_batches}]"


def _settings(
    config: EvalConfig, allocation: BudgetAllocation | None = None, quest_weights: Sequence[float] = (0.0,)
) -> list[Setting]:
    """The (method, selection) pairs `evaluate` runs, in order: dense, then each method's nz_ratios, thresholds,
    budgets (shared among layers by `allocation`); the gate's once per Quest weight of `quest_weights`."""
    settings = []
    forced = dict(force_sink=config.force_sink, last_block_dense=False)
    for method in config.methods_to_run:
        if method == "dense":
            settings.append(Setting("dense"))
            continue
        if method != "gate":
            for ratio in config.nz_ratios:
                settings.append(Setting(method, Selection(method="nz_ratio", nz_ratio=ratio, **forced)))
            continue
        for weight in quest_weights:
            selections = [Selection(method="nz_ratio", nz_ratio=ratio, **forced) for ratio in config.nz_ratios]
            selections += [Selection(method="threshold", threshold=t, **forced) for t in config.thresholds]
            selections += [
                Selection(method="budget", budget=budget, allocation=allocation, **forced) for budget in config.budgets
            ]
            settings += [Setting(method, selection, weight) for selection in selections]
    return settings


def evaluate(config: EvalConfig, *, progress: Callable[[Sequence[Any]], Iterable[Any]] = iter) -> EvalResult:
    """Runs every (length, method, setting) of `config` and returns the results.

    progress: wraps the list of all compiled calls, e.g. `tqdm`: prefill mode's forwards (`EvalTask`: length ×
    setting × batch), decode mode's chunks of decode steps (`train.decode_perplexity.DecodeTask`).
    Raises ValueError when a length exceeds the model's positions or every document, when the tokenizer's ids do
    not fit the model's vocabulary, when the adapter does not fit the model (`CheckpointError`) or lacks the gates a
    method needs, or at the first forward whose loss is NaN/inf.
    """
    if config.gates is None and config.methods is None:
        log.info("no gates given: skipping the 'gate' method")
    dtype = jnp.dtype(config.dtype)
    mesh = None if config.mesh is None else build_mesh(config.mesh)
    base, model_config = load_model(  # the sparse models share these (placed) arrays
        config.model, dtype=dtype, param_dtype=dtype, attention_implementation=config.attention, mesh=mesh
    )
    too_long = [length for length in config.lengths if length > model_config.max_position_embeddings]
    if too_long:
        raise ValueError(
            f"lengths: {too_long} exceed the model's max_position_embeddings ({model_config.max_position_embeddings})"
        )
    adapter = None if config.gates is None else read_adapter(config.gates)
    if adapter is not None:
        check_base_identity(
            adapter.base_identity, base, adapter=str(config.gates), allow_other_base=config.allow_other_base
        )
    start_layer = config.start_layer
    if start_layer is None:
        start_layer = _adapter_start_layer(adapter, config.mode)
    if start_layer >= model_config.num_layers:
        raise ValueError(
            f"start_layer: {start_layer} leaves none of the model's {model_config.num_layers} layers sparse"
        )

    windows = _windows(config, vocab_size=model_config.vocab_size)
    if config.mode == "decode":
        return _evaluate_decode(config, base, adapter, windows, start_layer=start_layer, progress=progress)
    weights = config.quest_weights
    if weights is None:  # the adapter's own
        weights = (0.0,) if adapter is None or adapter.seer_config.gate is None else (adapter.seer_config.quest_weight,)
    settings = _settings(config, _budget_allocation(adapter, config), weights)
    forwards = list(dict.fromkeys(setting.computed_as for setting in settings))
    models = _Models(base, adapter, start_layer=start_layer, seed=config.seed, mesh=mesh)
    batches = {length: _batches(tokens, config.batch_size) for length, tokens in windows.items()}
    tasks = [
        EvalTask(length, setting, index, len(batches[length]))
        for length in config.lengths
        for setting in forwards
        for index in range(len(batches[length]))
    ]
    kernels = {}  # length → the block_sparse_attention implementation the sparse forwards run
    if any(setting.method != "dense" for setting in forwards):
        for length, length_batches in batches.items():
            kernels[str(length)] = _sparse_kernel(model_config, len(length_batches[0]), length, dtype)
            log.info("L=%d: block_sparse_attention runs its %s implementation", length, kernels[str(length)])
    doc_nll: dict[tuple[int, Setting], list[np.ndarray]] = {}
    density_sum: dict[tuple[int, Setting], np.ndarray] = {}
    seconds: dict[tuple[int, Setting], float] = {}
    precision = jax.default_matmul_precision("highest") if dtype == jnp.float32 else contextlib.nullcontext()
    # Built before the mesh becomes the context: NNX would read the weights' logical axis names as mesh axes then.
    sparse_models = {setting: models.get(setting) for setting in forwards if setting.method != "dense"}
    on_mesh = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
    with precision, on_mesh:  # float32 means float32: GPUs would otherwise run its matmuls as TF32
        for task in progress(tasks):
            key = (task.length, task.setting)
            tokens = _place(batches[task.length][task.batch], mesh)
            start = time.perf_counter()
            if task.setting.method == "dense":
                nll = to_host(_dense_nll(base, tokens))
                density = np.ones((model_config.num_layers, model_config.num_q_heads))
            else:
                nll, density = (to_host(x) for x in _sparse_nll(sparse_models[task.setting], tokens))
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
            _check_finite(nll, task)
            doc_nll.setdefault(key, []).append(nll)
            # Unpadded rows of one length all have the same causal blocks, so the pooled density of a batch weighs
            # each row equally: weighting batches by their rows gives the mean over documents.
            density_sum[key] = density_sum.get(key, 0.0) + density * len(nll)

    rows = []
    for length in config.lengths:
        for setting in settings:
            key = (length, setting.computed_as)
            nll = np.concatenate(doc_nll[key])
            density = density_sum[key] / len(nll)  # [L, N]
            rows.append(_row(setting, length, nll, density, start_layer=start_layer, seconds=seconds[key]))
    return EvalResult(
        rows=tuple(rows),
        config=config.to_dict() | {"start_layer": start_layer},
        environment=_environment() | {"block_sparse_attention": kernels},
        num_docs={length: len(tokens) for length, tokens in windows.items()},
        title=f"{Path(config.model).name}, {', '.join(Path(p).name for p in config.data)}",
    )


def _budget_allocation(adapter: Adapter | None, config: EvalConfig) -> BudgetAllocation | None:
    """The allocation the budget rows share their densities by: the one the adapter's selection records."""
    if not config.budgets:
        return None
    allocation = adapter.seer_config.selection.allocation
    if allocation is None:
        raise ValueError(
            f"budgets: the adapter {config.gates} records no budget allocation; calibrate one on distillation data "
            "(python -m train.distill_gates ... --budget-density D, or seer_jax.calibration.budget_for_density and "
            "seer_jax.adapters.record_selection)"
        )
    return allocation


def _adapter_start_layer(adapter: Adapter | None, mode: str) -> int:
    """The first sparse layer the adapter asks for (its decode gates' in decode mode), 0 without one."""
    if adapter is None:
        return 0
    if mode == "decode":
        decode = adapter.seer_config.decode
        return 0 if decode is None else decode.start_layer
    return adapter.seer_config.start_layer


def _has_prefill_gates(adapter: Adapter | None) -> bool:
    return adapter is not None and any("mask_linear_k" in name for name in adapter.tensors)


def _evaluate_decode(
    config: EvalConfig,
    base: CausalLM,
    adapter: Adapter | None,
    windows: dict[int, np.ndarray],
    *,
    start_layer: int,
    progress: Callable[[Sequence[Any]], Iterable[Any]],
) -> EvalResult:
    """Decode mode (`train.decode_perplexity`): checks that the adapter has the gates the settings need, runs them
    and makes the rows."""
    methods = list(config.methods_to_run)
    if "gate" in methods and (adapter is None or adapter.seer_config.decode is None):
        if config.methods is not None:
            raise ValueError(f"methods: 'gate' decodes with decode gates, which the adapter {config.gates} lacks")
        log.info("the adapter has no decode gates: skipping the 'gate' method")
        methods.remove("gate")
    if config.decode_prefill is not None and not _has_prefill_gates(adapter):
        raise ValueError(f"decode_prefill: the adapter {config.gates} has no prefill gates")
    dtype = jnp.dtype(config.dtype)
    precision = jax.default_matmul_precision("highest") if dtype == jnp.float32 else contextlib.nullcontext()
    with precision:  # float32 means float32: GPUs would otherwise run its matmuls as TF32
        allocation = None
        if "gate" in methods:
            allocation = _decode_allocation(config, base, adapter, windows, start_layer=start_layer)
        weights = config.decode_quest_weights
        if weights is None:  # the adapter's own
            weights = (adapter.seer_config.decode.quest_weight,) if "gate" in methods else (0.0,)
        settings = decode_settings(methods, config.decode_budgets, config.decode_prefill, allocation, weights)
        measured = run_decode(
            base,
            adapter,
            windows,
            settings,
            continuation=config.continuation,
            start_layer=start_layer,
            seed=config.seed,
            batch_size=config.batch_size,
            chunk=config.decode_chunk,
            progress=progress,
        )
    rows = []
    for length in config.lengths:
        for setting in settings:
            rows.append(_decode_row(setting, length, measured[(length, setting)], start_layer=start_layer))
    used = None if allocation is None else dataclasses.asdict(allocation)
    return EvalResult(
        rows=tuple(rows),
        config=config.to_dict() | {"start_layer": start_layer, "methods": methods, "allocation": used},
        environment=_environment(),
        num_docs={length: len(tokens) for length, tokens in windows.items()},
        title=f"{Path(config.model).name}, {', '.join(Path(p).name for p in config.data)}",
        mode="decode",
        continuation=config.continuation,
    )


def _decode_allocation(
    config: EvalConfig, base: CausalLM, adapter: Adapter, windows: dict[int, np.ndarray], *, start_layer: int
) -> DecodeAllocation | None:
    """The allocation the "gate" rows share their budgets by (`EvalConfig.decode_allocation`)."""
    if config.decode_allocation == "none":
        return None
    decode = adapter.seer_config.decode
    if config.decode_allocation == "adapter":
        if decode.allocation is not None and start_layer != decode.start_layer:
            raise ValueError(
                f"decode_allocation: the adapter's allocation was calibrated with decode start_layer "
                f"{decode.start_layer}, not {start_layer}; evaluate at that start_layer, uniformly (none) or "
                "recalibrate (recall, coverage)"
            )
        return decode.allocation
    length = config.lengths[0]
    prompts = windows[length][: config.batch_size, : length - config.continuation - 1]
    allocation = calibrate_allocation(
        base, adapter, prompts, rule=config.decode_allocation, start_layer=start_layer, seed=config.seed
    )
    log.info(
        "decode allocation by %s on %d prompts of %d tokens: %s",
        config.decode_allocation,
        len(prompts),
        prompts.shape[1],
        _fractions_at(allocation, config.decode_budgets),
    )
    return allocation


def _fractions_at(allocation: DecodeAllocation, budgets: Sequence[DecodeBudget]) -> str:
    """Each fraction budget's layer fractions, for the log."""
    shown = [
        f"{budget}: " + " ".join(f"{f:.3f}" for f in allocation.layer_fractions_at(budget.fraction))
        for budget in budgets
        if budget.fraction is not None
    ]
    return "; ".join(shown) or f"points {allocation.fractions}"


def _decode_row(setting: DecodeSetting, length: int, measured: DecodeMeasurement, *, start_layer: int) -> PplRow:
    budget = setting.budget
    if budget is None:
        sparsity, target = "dense", None
    elif budget.tokens is not None:
        sparsity, target = "token_budget", float(budget.tokens)
    else:
        sparsity, target = "context_fraction", budget.fraction
    return PplRow(
        method=setting.method_label,
        sparsity=sparsity,
        target=target,
        length=length,
        doc_nll=tuple(float(x) for x in measured.doc_nll),
        density=1.0 if budget is None else float(np.mean(measured.layer_density[start_layer:])),
        layer_density=tuple(float(x) for x in measured.layer_density),
        seconds=measured.seconds,
        prefill=setting.prefill_label,
        prefill_density=measured.prefill_density,
        allocation=None if setting.allocation is None else allocation_label(setting.allocation),
    )


class _Models:
    """Builds (once) the `SeerCausalLM` of each sparse setting over the base model's weights.

    Every model carries the same gate weights: the adapter's, or zeros when there is none (only the "gate" source
    reads them, and it is not run without an adapter). Zeros avoid a random init, which compiles per weight shape.
    With a mesh, the gates are placed on it like the (already placed) base weights.
    """

    def __init__(self, base: CausalLM, adapter: Adapter | None, *, start_layer: int, seed: int, mesh: Mesh | None):
        self.base, self.start_layer, self.seed = base, start_layer, seed
        if adapter is None:
            self.gate_config = GateConfig(hidden_size=base.config.head_dim)
            placeholder = seer_with_abstract_gates(base, SeerConfig(gate=self.gate_config))
            abstract = nnx.state(placeholder, GateParam)
            self.gates = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
        else:
            self.gate_config = adapter.seer_config.gate
            self.gates = nnx.state(attach_gates(base, adapter), GateParam)
        if mesh is not None:
            self.gates = jax.device_put(self.gates, tree_shardings(self.gates, mesh, logical_rules(base.config, mesh)))
        self._built: dict[Setting, SeerCausalLM] = {}

    def get(self, setting: Setting) -> SeerCausalLM:
        if setting not in self._built:
            seer_config = SeerConfig(
                gate=self.gate_config,
                selection=setting.selection,
                # Keeping every block, no source is consulted: any one builds that forward.
                source="gate" if setting.selection.is_dense else setting.method,
                quest_weight=setting.quest_weight,
                start_layer=self.start_layer,
                seed=self.seed,
            )
            model = seer_with_abstract_gates(self.base, seer_config)
            nnx.update(model, self.gates)
            self._built[setting] = model
        return self._built[setting]


def _windows(config: EvalConfig, *, vocab_size: int) -> dict[int, np.ndarray]:
    """length → [n, length] int32 evaluation windows (`train.data.eval_windows`) of the tokenized data."""
    corpus = load_corpus(
        CorpusConfig(
            paths=tuple(Path(p) for p in config.data),
            tokenizer_dir=Path(config.tokenizer_dir or config.model),
            text_field=config.text_field,
            cache_dir=config.cache_dir,
        )
    )
    windows = {length: eval_windows(corpus, length=length, num_docs=config.num_docs) for length in config.lengths}
    for length, tokens in windows.items():
        if len(tokens) < config.num_docs:
            log.warning("only %d documents hold %d tokens (asked for %d)", len(tokens), length, config.num_docs)
        if tokens.max() >= vocab_size:
            raise ValueError(
                f"tokenizer: token id {tokens.max()} is outside the model's vocabulary ({vocab_size}); "
                "pass the model's tokenizer (tokenizer_dir)"
            )
    return windows


def _row(
    setting: Setting, length: int, nll: np.ndarray, density: np.ndarray, *, start_layer: int, seconds: float
) -> PplRow:
    """A result row from per-document NLLs [n] and the density table [L, N]."""
    selection = setting.selection
    if selection is None:
        sparsity, target = "dense", None
    else:
        sparsity = selection.method
        target = {"nz_ratio": selection.nz_ratio, "threshold": selection.threshold, "budget": selection.budget}[
            sparsity
        ]
    return PplRow(
        method=setting.method_label,
        sparsity=sparsity,
        target=target,
        length=length,
        doc_nll=tuple(float(x) for x in nll),
        density=float(np.mean(density[start_layer:])),
        layer_density=tuple(float(x) for x in density.mean(axis=1)),
        seconds=seconds,
    )


def _check_finite(nll: np.ndarray, task: EvalTask) -> None:
    """Stops the evaluation at the first forward whose NLL [B] is NaN/inf: a perplexity from it would be NaN."""
    bad = np.flatnonzero(~np.isfinite(nll))
    if bad.size:
        raise ValueError(
            f"forward {task}: the NLL of document(s) {bad.tolist()} of the batch is {nll[bad[0]]}; the model's "
            "or the gates' weights hold NaN/inf, or the dtype overflows (evaluate in float32)"
        )


def _place(tokens: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A batch [B, T] on the device, or split over the mesh's data × fsdp when they divide B (else replicated)."""
    if mesh is None:
        return jnp.asarray(tokens)
    if tokens.shape[0] % batch_rows(mesh) == 0:
        return shard_batch(tokens, mesh)
    return jax.device_put(tokens, NamedSharding(mesh, PartitionSpec()))


def _batches(tokens: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [tokens[start : start + batch_size] for start in range(0, len(tokens), batch_size)]


def _mean_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """f32 [B]: each row's mean NLL of tokens 1..T−1 under logits [B, T, V] at positions 0..T−2."""
    return jnp.mean(next_token_nll(logits, tokens), axis=-1)


@nnx.jit
def _dense_nll(model: CausalLM, tokens: jax.Array) -> jax.Array:
    logits, _ = model(tokens)  # [B, T, V]
    return _mean_nll(logits, tokens)


@nnx.jit
def _sparse_nll(model: SeerCausalLM, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, density = logits_and_density(model, tokens)  # [B, T, V], [L, N]
    return _mean_nll(logits, tokens), density


def _sparse_kernel(model_config: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> str:
    """Which implementation ("mosaic" or "reference") block-sparse prefill ran for this length."""
    return sparse_prefill_implementation(
        batch,
        length,
        num_q_heads=model_config.num_q_heads,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        dtype=dtype,
    )


def _environment() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    device = {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices)}
    return {"versions": versions, "device": device}
