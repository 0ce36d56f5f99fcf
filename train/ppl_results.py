"""Perplexity-vs-density results: one row per (method, sparsity setting, length), as JSON, a markdown table and a plot.

`train.perplexity.evaluate` fills an `EvalResult`; `EvalResult.write(out_dir)` saves

    results.json          {"config": ..., "environment": {"versions", "device"}, "mode", "continuation",
                           "num_docs": {L: n}, "rows": [PplRow as a dict, ...]}
    ppl_vs_density.md     a caption and the table `to_markdown` returns
    ppl_vs_density.png    per length a panel, one line per method: prefill mode PPL (y) against achieved density
                          (x); decode mode the PPL increase over dense in % (y) against achieved decode density (x)

Prefill mode: densities are causal block densities (selected / causal 64×64 blocks), averaged over the sparse layers
and heads. Decode mode (`train.decode_perplexity`): the PPL of each window's last `continuation` tokens under
teacher-forced decoding; densities are decode densities (blocks attended / blocks holding real tokens, summed over
steps, rows and heads), averaged over the sparse decode layers; each row also names its prefill and, when its budget
is shared among layers by a calibrated allocation, that allocation (its per-layer densities show the shares).
"""

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from seer_jax.multihost import is_primary, sync

MISSED_TARGET_MARGIN = 0.05  # density above a TopK row's nz_ratio that the table flags as a missed target
Sparsity = Literal["dense", "nz_ratio", "threshold", "budget", "token_budget", "context_fraction"]
JSON_FILE = "results.json"
MARKDOWN_FILE = "ppl_vs_density.md"
PLOT_FILE = "ppl_vs_density.png"
# One colour and marker per method, the same in every panel.
_STYLE = {
    "gate": ("tab:blue", "o"),
    "oracle": ("tab:green", "s"),
    "quest": ("tab:orange", "^"),
    "streaming": ("tab:purple", "v"),
    "random": ("tab:gray", "x"),
}
# Gates with a Quest weight ("gate+0.25quest", ...): one shade of this colour map each, this marker.
_HYBRID_COLORMAP, _HYBRID_MARKER = "cool", "D"


def weighted_method(method: str, quest_weight: float) -> str:
    """A row's method name: `method`, or "gate+0.25quest" for a gate whose scores add a Quest weight."""
    return f"{method}+{quest_weight:g}quest" if quest_weight else method


@dataclasses.dataclass(frozen=True, kw_only=True)
class PplRow:
    """One measurement.

    Attributes:
      method: "dense" or a block source ("gate", "oracle", "quest", "streaming", "random").
      sparsity: "dense", "nz_ratio" (TopK), "threshold" or "budget" (a mean density shared among layers by the
        adapter's calibrated allocation) (prefill mode); "token_budget" or "context_fraction" (decode mode;
        "dense": dense decoding).
      target: the nz_ratio, threshold, budget density, token budget (tokens) or context fraction; None for dense.
      length: L, tokens per window (BOS included); L − 1 next-token predictions per document (decode mode: the
        last `continuation` tokens).
      doc_nll: per document, the mean NLL (nats) of its predictions.
      density: achieved block density (decode mode: decode density), mean over the sparse layers (>= start_layer)
        and heads; 1 for dense.
      layer_density: per layer (all layers), the density averaged over heads.
      seconds: wall time of the forwards behind this row, compilation included (prefill mode: the rows that keep
        every block share one forward, and its time; decode mode: a shared prefill counts in its first row).
      prefill: decode mode: how the prompt was prefilled, "dense" or the prefill gates' selection ("gate nz 0.1");
        None in prefill mode.
      prefill_density: decode mode with a block-sparse prefill: its causal block density; else None.
      allocation: decode mode: how the budget is shared among layers, e.g. "recall allocation"
        (`seer_jax.decode_config.DecodeAllocation`); None: every sparse layer the same budget.
    """

    method: str
    sparsity: Sparsity
    target: float | None
    length: int
    doc_nll: tuple[float, ...]
    density: float
    layer_density: tuple[float, ...]
    seconds: float
    prefill: str | None = None
    prefill_density: float | None = None
    allocation: str | None = None

    @property
    def misses_target(self) -> bool:
        """A TopK or budget row whose achieved density exceeds its target by more than `MISSED_TARGET_MARGIN` (e.g.
        StreamingLLM, whose sink and local window alone are denser than a small nz_ratio): it is not at its target,
        and the table marks it."""
        return self.sparsity in ("nz_ratio", "budget") and self.density > self.target + MISSED_TARGET_MARGIN

    @property
    def mean_nll(self) -> float:
        return sum(self.doc_nll) / len(self.doc_nll)

    @property
    def ppl(self) -> float:
        """exp(mean over documents of the per-document mean NLL), docs/design.md §7."""
        return math.exp(self.mean_nll)

    @property
    def setting(self) -> str:
        """A short label: "—" (dense), "nz 0.3", "threshold 0.002", "budget 0.1", "256 tokens", "10%", "10% (recall
        allocation)"."""
        if self.sparsity == "dense":
            return "—"
        shared = "" if self.allocation is None else f" ({self.allocation})"
        if self.sparsity == "token_budget":
            return f"{self.target:g} tokens{shared}"
        if self.sparsity == "context_fraction":
            return f"{self.target * 100:g}%{shared}"
        return f"{'nz' if self.sparsity == 'nz_ratio' else self.sparsity} {self.target:g}"

    @property
    def series(self) -> str:
        """The plot line this row belongs to: the method, with its sparsity or (decode mode) its allocation and its
        prefill when that is not the default."""
        if self.prefill is not None:
            method = self.method if self.allocation is None else f"{self.method} ({self.allocation})"
            return method if self.prefill == "dense" else f"{method}, prefill {self.prefill}"
        return self.method if self.sparsity in ("dense", "nz_ratio") else f"{self.method} ({self.sparsity})"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean_nll": self.mean_nll, "ppl": self.ppl}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    """All rows of one evaluation and what produced them.

    Attributes:
      rows: in evaluation order (length, then dense, then each method's settings).
      config: the evaluation's settings, JSON-ready (`EvalConfig.to_dict`).
      environment: {"versions": {package: version}, "device": {...}}, JSON-ready.
      num_docs: documents evaluated per length (fewer than asked when few documents are that long).
      title: names the model and data in the table caption and the plot title.
      mode: "prefill" or "decode" (module docstring).
      continuation: decode mode: the tokens scored at the end of each window; None in prefill mode.
    """

    rows: tuple[PplRow, ...]
    config: Mapping[str, Any]
    environment: Mapping[str, Any]
    num_docs: Mapping[int, int]
    title: str
    mode: str = "prefill"
    continuation: int | None = None

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(row.length for row in self.rows))

    def dense_ppl(self, length: int) -> float | None:
        """The dense model's PPL at `length` (decode mode: dense prefill and decoding), or None when dense was not
        evaluated."""
        return next(
            (
                row.ppl
                for row in self.rows
                if row.method == "dense" and row.prefill in (None, "dense") and row.length == length
            ),
            None,
        )

    def to_json(self) -> str:
        payload = {
            "config": self.config,
            "environment": self.environment,
            "title": self.title,
            "mode": self.mode,
            "continuation": self.continuation,
            "num_docs": {str(length): count for length, count in self.num_docs.items()},
            "rows": [row.to_dict() for row in self.rows],
        }
        return json.dumps(payload, indent=1) + "\n"

    def to_markdown(self) -> str:
        """A table: one line per (method, setting[, prefill]), per length its PPL, density and PPL / dense PPL."""
        lengths = self.lengths
        decode = self.mode == "decode"
        header = ["method", "decode budget" if decode else "setting"] + (["prefill"] if decode else [])
        for length in lengths:
            density = "decode density" if decode else "density"
            header += [f"PPL L={length}", f"{density} L={length}", f"PPL/dense L={length}"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * (len(header) - 3 * len(lengths))]
        lines[1] += "--:|" * (3 * len(lengths))
        by_key: dict[tuple[str, str, float | None, str | None, str | None], dict[int, PplRow]] = {}
        for row in self.rows:
            key = (row.method, row.sparsity, row.target, row.prefill, row.allocation)
            by_key.setdefault(key, {})[row.length] = row
        missed = False
        for per_length in by_key.values():
            first = next(iter(per_length.values()))
            cells = [first.method, first.setting]
            if decode:
                prefill = first.prefill
                if first.prefill_density is not None:
                    prefill += f" (density {first.prefill_density:.3f})"
                cells.append(prefill)
            for length in lengths:
                row, dense = per_length.get(length), self.dense_ppl(length)
                if row is None:
                    cells += ["", "", ""]
                    continue
                ratio = "" if dense is None else f"{row.ppl / dense:.4f}"
                floor = row.misses_target
                cells += [f"{row.ppl:.3f}", f"{row.density:.3f}" + (" ↑" if floor else ""), ratio]
                missed |= floor
            lines.append("| " + " | ".join(cells) + " |")
        docs = ", ".join(f"{self.num_docs[length]} at L={length}" for length in lengths)
        if decode:
            caption = (
                f"Decode-mode perplexity vs. decode block density — {self.title}; the last {self.continuation} "
                f"tokens of each window, each predicted by a teacher-forced decode step; documents: {docs}; "
                f"{self.config.get('dtype')}."
            )
        else:
            caption = (
                f"Perplexity vs. causal block density — {self.title}; documents: {docs}; "
                f"{self.config.get('dtype')}, last_block_dense=False"
                f"{', the sink block kept in every row' if self.config.get('force_sink') else ''}."
            )
        note = ""
        if missed:
            note = (
                f"\n↑ the method cannot reach the row's nz_ratio or budget: its forced blocks (sink, local window, "
                f"diagonal) alone exceed it by more than {MISSED_TARGET_MARGIN}.\n"
            )
        return caption + "\n\n" + "\n".join(lines) + "\n" + note

    def plot(self, path: str | Path) -> None:
        """Writes a PNG: one panel per length, one line per method (`PplRow.series`) against achieved density;
        prefill mode: PPL, dense as a dashed horizontal line; decode mode: the PPL increase over dense in %."""
        lengths = self.lengths
        decode = self.mode == "decode"
        # A bare Figure renders with the Agg canvas and leaves pyplot's global backend and figure list alone.
        figure = Figure(figsize=(5.5 * len(lengths), 4.5), layout="constrained")
        axes = figure.subplots(1, len(lengths), squeeze=False)
        for axis, length in zip(axes[0], lengths, strict=True):
            rows = [row for row in self.rows if row.length == length]
            dense = self.dense_ppl(length)
            increase = decode and dense is not None

            def value(row: PplRow, dense: float | None = dense, increase: bool = increase) -> float:
                return 100 * (row.ppl / dense - 1) if increase else row.ppl

            # Gates with a Quest weight ("gate+0.25quest", ...): one shade of a colour map each, in row order.
            hybrids = list(dict.fromkeys(r.method for r in rows if "+" in r.method))
            for series in dict.fromkeys(r.series for r in rows if r.sparsity != "dense"):
                points = sorted((r for r in rows if r.series == series), key=lambda r: r.density)
                method = points[0].method
                color, marker = _STYLE.get(method, ("black", "."))
                if method in hybrids:
                    color = colormaps[_HYBRID_COLORMAP](hybrids.index(method) / max(len(hybrids) - 1, 1))
                    marker = _HYBRID_MARKER
                # Prefill mode: TopK lines solid, thresholds and budgets dotted; decode mode: a sparse prefill dotted.
                solid = points[0].prefill == "dense" if decode else points[0].sparsity == "nz_ratio"
                axis.plot(
                    [r.density for r in points],
                    [value(r) for r in points],
                    color=color,
                    marker=marker if solid else "D",
                    markerfacecolor=color if solid else "none",
                    linestyle="-" if solid else ":",
                    label=series,
                )
            if increase:
                axis.axhline(0, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
                axis.set_ylabel("PPL increase over dense (%)")
                # A far-off baseline (random, streaming at small budgets) would flatten the others on a linear axis.
                if max(abs(value(r)) for r in rows) > 100:
                    axis.set_yscale("symlog", linthresh=10)
                    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            else:
                if dense is not None:
                    axis.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
                values = [r.ppl for r in rows]
                if max(values) > 2 * min(values):  # a far-off baseline would flatten the others on a linear axis
                    axis.set_yscale("log")
                    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                    axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
                axis.set_ylabel("perplexity" + (" (log scale)" if axis.get_yscale() == "log" else ""))
            axis.set_xlim(0, 1.05)
            axis.set_xlabel("achieved decode block density" if decode else "achieved causal block density")
            axis.set_title(f"L = {length} ({self.num_docs[length]} documents)")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize="small")
        if decode:
            figure.suptitle(f"Decode-mode PPL of the last {self.continuation} tokens vs. decode density\n{self.title}")
        else:
            figure.suptitle(f"Perplexity vs. block density — {self.title}")
        figure.savefig(path, dpi=120)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Writes results.json, ppl_vs_density.md and ppl_vs_density.png into `out_dir` (created if missing); in a
        multi-process job, process 0 writes them and the others wait until it has."""
        out_dir = Path(out_dir)
        paths = {"json": out_dir / JSON_FILE, "markdown": out_dir / MARKDOWN_FILE, "plot": out_dir / PLOT_FILE}
        if is_primary():
            out_dir.mkdir(parents=True, exist_ok=True)
            paths["json"].write_text(self.to_json())
            paths["markdown"].write_text(self.to_markdown())
            self.plot(paths["plot"])
        sync(f"EvalResult.write {out_dir}")
        return paths
