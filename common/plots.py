"""PNG pictures of distill runs and evaluations, drawn on matplotlib's Agg canvas (no display needed) and
written atomically (temp file, then rename), so a running job can be watched.

  run_png(out_dir, layer_rows, logits_rows)   OUT/layers.png of a distill.py run
  comparison_png(path, rows, names, ...)      common.evaluate's comparison table as bars

matplotlib is imported when a picture is drawn, not with this module: importing distill.py loads none of it.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import TYPE_CHECKING

from common.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100  # pixels per inch: the figures are 12 x 4 inches per row of panels


def save_png(fig: Figure, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, [buffer.getvalue()])


def log_scale(ax: Axes, values: list[float]) -> None:
    """A log y axis when the positive values span more than a decade (relative errors often do; a copy
    student's is 0), its ticks reading 0.35 rather than 3.5 x 10^-1; else the linear axis stays."""
    from matplotlib.ticker import NullFormatter, StrMethodFormatter

    positive = [v for v in values if v > 0]
    if not positive or max(positive) < 10 * min(positive):
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:.4g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def relative_error_before(row: dict) -> float:
    """A layer row's relative error before training: start_rel_err when the row records it; else from the
    val MSE before and after and the relative error after, which share the teacher's mean square, so
    rel_before = rel_after * mse_start / mse_end."""
    if "start_rel_err" in row:
        return row["start_rel_err"]
    if row["mse_end"] > 0:
        return row["rel_err"] * row["mse_start"] / row["mse_end"]
    return 0.0 if row["mse_start"] == 0 else math.nan


def run_png(out_dir: str, layer_rows: list[dict] | None = None, logits_rows: list[dict] | None = None) -> None:
    """OUT/layers.png. Layer-wise phase (layer_rows; None = OUT/layers.json when there is one): per layer, in
    the order they were replaced, its student's relative error before and after training (and after
    calibration when the rows have calib_rel_err), and the hybrid model's val perplexity with the students
    so far, beside the teacher's. Logits phase (logits_rows): KL to the teacher and val CE over steps."""
    if layer_rows is None and os.path.exists(os.path.join(out_dir, "layers.json")):
        with open(os.path.join(out_dir, "layers.json")) as f:
            layer_rows = json.load(f)
    from matplotlib.figure import Figure

    sections = [rows for rows in (layer_rows, logits_rows) if rows]
    if not sections:
        return
    fig = Figure(figsize=(12, 4 * len(sections)), layout="constrained")
    axes = fig.subplots(len(sections), 2, squeeze=False)
    if layer_rows:
        err, ppl = axes[0]
        x = range(len(layer_rows))
        rotations = len({r["rotation"] for r in layer_rows})
        ticks = [f"{r['layer']}" if rotations == 1 else f"r{r['rotation']}:{r['layer']}" for r in layer_rows]
        err.plot(x, [relative_error_before(r) for r in layer_rows], "o--", color="tab:gray", label="before training")
        err.plot(x, [r["rel_err"] for r in layer_rows], "o-", color="tab:blue", label="after training")
        if any("calib_rel_err" in r for r in layer_rows):
            err.plot(
                x,
                [r.get("calib_rel_err", math.nan) for r in layer_rows],
                "s:",
                color="tab:green",
                label="after calibration",
            )
        log_scale(err, [r["rel_err"] for r in layer_rows] + [relative_error_before(r) for r in layer_rows])
        err.set(ylabel="relative error ||s - t||² / ||t||²", title="student against the teacher block (val)")
        ppl.plot(x, [r["hybrid_ppl"] for r in layer_rows], "o-", color="tab:red", label="hybrid (students so far)")
        ppl.axhline(math.exp(layer_rows[0]["teacher_ce"]), color="black", ls="--", label="teacher")
        log_scale(ppl, [r["hybrid_ppl"] for r in layer_rows] + [math.exp(layer_rows[0]["teacher_ce"])])
        ppl.set(ylabel="val perplexity", title="the model as layers are replaced")
        for ax in (err, ppl):
            ax.set_xticks(list(x), ticks, rotation=90 if len(ticks) > 40 else 0, fontsize=8)
            ax.set_xlabel("layer, in the order replaced")
            ax.grid(alpha=0.3)
            ax.legend()
    if logits_rows:
        kl, ce = axes[-1]
        steps = [r["step"] for r in logits_rows]
        kl.plot(steps, [r["kl"] for r in logits_rows], "o-", color="tab:purple")
        log_scale(kl, [r["kl"] for r in logits_rows])
        kl.set(xlabel="logits-phase step", ylabel="KL(teacher || student) per token", title="logits phase: KL")
        ce.plot(steps, [r["val_ce"] for r in logits_rows], "o-", color="tab:red", label="student")
        ce.axhline(logits_rows[0]["teacher_ce"], color="black", ls="--", label="teacher")
        ce.set(xlabel="logits-phase step", ylabel="val cross-entropy", title="logits phase: val CE")
        ce.legend()
        for ax in (kl, ce):
            ax.grid(alpha=0.3)
    save_png(fig, os.path.join(out_dir, "layers.png"))


def comparison_png(path: str, rows: list[dict], names: list[str], has_teacher: bool) -> None:
    """common.evaluate's comparison table as bars: for each metric, each checkpoint's value as a ratio to
    the teacher's (the first name; without a teacher, to the first model), on a log axis so that 2x and
    0.5x stand equally far from 1; the value beside each bar, the reference value beside the metric."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, StrMethodFormatter

    reference, compared = names[0], names[1:] or names
    rows = [r for r in rows if r["values"].get(reference)]
    fig = Figure(figsize=(12, 1 + 0.3 * len(rows) * len(compared)), layout="constrained")
    ax = fig.subplots()
    height, extremes = 0.8 / len(compared), [1.0]
    for k, name in enumerate(compared):
        shown = [(i, r) for i, r in enumerate(rows) if r["values"].get(name)]
        ratios = [r["values"][name] / r["values"][reference] for _, r in shown]
        bars = ax.barh([i + k * height for i, _ in shown], [q - 1 for q in ratios], left=1, height=height, label=name)
        ax.bar_label(bars, [f"{r['values'][name]:.4g} {r['unit']}" for _, r in shown], fontsize=7, padding=2)
        extremes += ratios
    ax.axvline(1, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(min(extremes) / 1.5, max(extremes) * 3)  # room for the labels
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))  # 0.4, not 4 x 10^-1
    narrow = max(extremes) < 10 * min(extremes)  # within a decade the minor ticks need labels too
    ax.xaxis.set_minor_formatter(StrMethodFormatter("{x:.3g}") if narrow else NullFormatter())
    ax.set_yticks(
        [i + 0.4 - height / 2 for i in range(len(rows))],
        [f"{r['metric']} ({r['values'][reference]:.4g})" for r in rows],
        fontsize=8,
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio to {'the teacher' if has_teacher else reference} (its value in brackets), log scale")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save_png(fig, path)
