"""Perplexity-vs-density results: one row per (method, sparsity setting, length), as JSON, a markdown table and a plot.

`train.perplexity.evaluate` fills an `EvalResult`; `EvalResult.write(out_dir)` saves

    results.json          {"config": ..., "environment": {"versions", "device"}, "num_docs": {L: n},
                           "rows": [PplRow as a dict, ...]}
    ppl_vs_density.md     a caption and the table `to_markdown` returns
    ppl_vs_density.png    PPL (y) against achieved density (x), one panel per length, one line per method

Densities are causal block densities (selected / causal 64×64 blocks), averaged over the sparse layers and heads.
"""

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from seer_jax.multihost import is_primary, sync

Sparsity = Literal["dense", "nz_ratio", "threshold"]
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class PplRow:
    """One measurement.

    Attributes:
      method: "dense" or a block source ("gate", "oracle", "quest", "streaming", "random").
      sparsity: "dense", "nz_ratio" (TopK) or "threshold".
      target: the nz_ratio or threshold; None for dense.
      length: L, tokens per window (BOS included); L − 1 next-token predictions per document.
      doc_nll: per document, the mean NLL (nats) of its L − 1 predictions.
      density: achieved causal block density, mean over the sparse layers (>= start_layer) and heads; 1 for dense.
      layer_density: per layer (all layers), the density averaged over heads.
      seconds: wall time of the forwards behind this row, compilation included (the rows that keep every block
        share one forward, and its time).
    """

    method: str
    sparsity: Sparsity
    target: float | None
    length: int
    doc_nll: tuple[float, ...]
    density: float
    layer_density: tuple[float, ...]
    seconds: float

    @property
    def mean_nll(self) -> float:
        return sum(self.doc_nll) / len(self.doc_nll)

    @property
    def ppl(self) -> float:
        """exp(mean over documents of the per-document mean NLL), docs/design.md §7."""
        return math.exp(self.mean_nll)

    @property
    def setting(self) -> str:
        """A short label: "—" (dense), "nz 0.3", "threshold 0.002"."""
        if self.sparsity == "dense":
            return "—"
        return f"{'nz' if self.sparsity == 'nz_ratio' else 'threshold'} {self.target:g}"

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
    """

    rows: tuple[PplRow, ...]
    config: Mapping[str, Any]
    environment: Mapping[str, Any]
    num_docs: Mapping[int, int]
    title: str

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(row.length for row in self.rows))

    def dense_ppl(self, length: int) -> float | None:
        """The dense model's PPL at `length`, or None when dense was not evaluated."""
        return next((row.ppl for row in self.rows if row.method == "dense" and row.length == length), None)

    def to_json(self) -> str:
        payload = {
            "config": self.config,
            "environment": self.environment,
            "title": self.title,
            "num_docs": {str(length): count for length, count in self.num_docs.items()},
            "rows": [row.to_dict() for row in self.rows],
        }
        return json.dumps(payload, indent=1) + "\n"

    def to_markdown(self) -> str:
        """A table: one line per (method, setting), per length its PPL, density and PPL / dense PPL."""
        lengths = self.lengths
        header = ["method", "setting"]
        for length in lengths:
            header += [f"PPL L={length}", f"density L={length}", f"PPL/dense L={length}"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "--:|" * (3 * len(lengths))]
        by_key: dict[tuple[str, str, float | None], dict[int, PplRow]] = {}
        for row in self.rows:
            by_key.setdefault((row.method, row.sparsity, row.target), {})[row.length] = row
        for per_length in by_key.values():
            first = next(iter(per_length.values()))
            cells = [first.method, first.setting]
            for length in lengths:
                row, dense = per_length.get(length), self.dense_ppl(length)
                if row is None:
                    cells += ["", "", ""]
                    continue
                ratio = "" if dense is None else f"{row.ppl / dense:.4f}"
                cells += [f"{row.ppl:.3f}", f"{row.density:.3f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")
        docs = ", ".join(f"{self.num_docs[length]} at L={length}" for length in lengths)
        caption = (
            f"Perplexity vs. causal block density — {self.title}; documents: {docs}; "
            f"{self.config.get('dtype')}, last_block_dense=False."
        )
        return caption + "\n\n" + "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> None:
        """Writes a PNG: one panel per length, PPL against achieved density, dense as a dashed horizontal line."""
        lengths = self.lengths
        # A bare Figure renders with the Agg canvas and leaves pyplot's global backend and figure list alone.
        figure = Figure(figsize=(5.5 * len(lengths), 4.5), layout="constrained")
        axes = figure.subplots(1, len(lengths), squeeze=False)
        for axis, length in zip(axes[0], lengths, strict=True):
            rows = [row for row in self.rows if row.length == length]
            for method, sparsity in dict.fromkeys((r.method, r.sparsity) for r in rows if r.method != "dense"):
                series = sorted(
                    (r for r in rows if (r.method, r.sparsity) == (method, sparsity)), key=lambda r: r.density
                )
                color, marker = _STYLE.get(method, ("black", "."))
                topk = sparsity == "nz_ratio"
                axis.plot(
                    [r.density for r in series],
                    [r.ppl for r in series],
                    color=color,
                    marker=marker if topk else "D",
                    markerfacecolor=color if topk else "none",
                    linestyle="-" if topk else ":",
                    label=method if topk else f"{method} ({sparsity})",
                )
            dense = self.dense_ppl(length)
            if dense is not None:
                axis.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
            values = [r.ppl for r in rows]
            if max(values) > 2 * min(values):  # a far-off baseline would flatten the others on a linear axis
                axis.set_yscale("log")
                axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            axis.set_xlim(0, 1.05)
            axis.set_xlabel("achieved causal block density")
            axis.set_ylabel("perplexity" + (" (log scale)" if axis.get_yscale() == "log" else ""))
            axis.set_title(f"L = {length} ({self.num_docs[length]} documents)")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize="small")
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
