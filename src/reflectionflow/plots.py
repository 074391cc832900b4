"""Every figure of the project, drawn with matplotlib: sweep.png, the report's and compare's charts.

Two kinds of chart:
- `curve_chart`: y against samples per prompt (log2 axis), one series per (method, verifier) or
  per quantity. Series differ in colour, marker and line style, and are nudged apart along x so
  that equal values and their intervals stay visible. A point over fewer than stats.MIN_N prompts
  is drawn hollow, without an interval, and the figure says so.
- `forest_chart`: one row per run, the value and its interval on one axis (compare).

Both return PNG bytes; `data_url` embeds them in a self-contained HTML page. matplotlib's
object API (Figure + the Agg canvas) is used, never pyplot's global state, so plotting is safe
from any thread and needs no display.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from .stats import MIN_N

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
FEW_LABEL = f"fewer than {MIN_N} prompts:\nno interval"


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float | None]
    intervals: list[tuple[float, float] | None] = field(default_factory=list)  # per point; [] for none
    n: list[int] = field(default_factory=list)  # observations behind each point; [] when unknown


def style(i: int) -> dict:
    """Colour, marker and line style of the i-th series (all three change together)."""
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curve_chart(series: Sequence[Series], *, xlabel: str, ylabel: str, title: str | None = None,
                percent: bool = False, ylim: tuple[float, float] | None = None, log2_x: bool = True,
                size: tuple[float, float] = (7.5, 4.4)) -> bytes:
    """y against x for each series, with interval bars; PNG bytes."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, ax = _figure(*size)
    xs = sorted({x for s in series for x in s.x})
    spread = 0.045 * (len(series) - 1)  # the nudges, in log2 units (or in x units on a linear axis)
    few = False
    for i, s in enumerate(series):
        st = style(i)
        nudge = -spread / 2 + (spread * i / (len(series) - 1) if len(series) > 1 else 0.0)
        pts = [(x * 2 ** nudge if log2_x else x + nudge, y, s.intervals[j] if s.intervals else None,
                s.n[j] if s.n else None) for j, (x, y) in enumerate(zip(s.x, s.y)) if y is not None]
        if not pts:
            continue
        scale = 100.0 if percent else 1.0
        ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], color=st["color"], linestyle=st["linestyle"],
                linewidth=1.6, label=s.label, zorder=2)
        for x, y, ci, n in pts:
            small = n is not None and n < MIN_N
            few = few or small
            if ci is not None and not small:
                ax.errorbar([x], [scale * y], yerr=[[scale * (y - ci[0])], [scale * (ci[1] - y)]], fmt="none",
                            ecolor=st["color"], elinewidth=1.1, capsize=3, alpha=0.8, zorder=2)
            ax.plot([x], [scale * y], marker=st["marker"], markersize=6.5, color=st["color"],
                    markerfacecolor="white" if small else st["color"], markeredgewidth=1.4, linestyle="none",
                    zorder=3)
    if log2_x and xs:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(xs[0] / 2 ** 0.35, xs[-1] * 2 ** 0.35)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(True, color="#e5e5e5", linewidth=0.8, zorder=0)
    handles, labels = ax.get_legend_handles_labels()
    if few:  # the legend says what a hollow marker means
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="o", color="#555", markerfacecolor="white", linestyle="none"))
        labels.append(FEW_LABEL)
    if len(handles) > 1:
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, frameon=False)
    return _png(fig)


def forest_chart(labels: Sequence[str], values: Sequence[float | None],
                 intervals: Sequence[tuple[float, float] | None], *, xlabel: str, n: int | None = None,
                 size: tuple[float, float] | None = None) -> bytes:
    """One row per label: the value (a marker in the label's style) and its interval; PNG bytes."""
    rows = len(labels)
    fig, ax = _figure(*(size or (3.6, 0.5 + 0.32 * rows)))
    small = n is not None and n < MIN_N
    for i, (v, ci) in enumerate(zip(values, intervals)):
        if v is None:
            continue
        st = style(i)
        y = rows - 1 - i
        if ci is not None and not small:
            ax.plot(ci, [y, y], color=st["color"], linewidth=2, solid_capstyle="butt")
        ax.plot([v], [y], marker=st["marker"], color=st["color"], markersize=6,
                markerfacecolor="white" if small else st["color"], linestyle="none")
    ax.set_yticks(range(rows), list(reversed(labels)), fontsize=8)
    ax.set_ylim(-0.6, rows - 0.4)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(xlabel + (f" (n={n}: no interval)" if small else ""), fontsize=8)
    ax.grid(True, axis="x", color="#e5e5e5", linewidth=0.8)
    return _png(fig)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def format_estimate(value: float | None, ci: tuple[float, float] | None, n: int | None, *, scale: float = 1.0,
                    digits: int = 1) -> str:
    """'61.5 [52.0, 70.1]', or '50.0 (n=2, no interval)' when n is below MIN_N; '' without a value."""
    if value is None:
        return ""
    text = f"{scale * value:.{digits}f}"
    if n is not None and n < MIN_N:
        return f"{text} (n={n}, no interval)"
    if ci is None:
        return text
    return f"{text} [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
