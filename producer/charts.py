"""The charts of one batch, drawn with matplotlib from its stats (producer.stats.summarise): items/s and
output tokens/s over time, and histograms of queue wait and engine time. The dashboard shows each as
inline SVG; `gristmill stats BATCH --plot FILE` writes all four in one image.

Every data series carries a gid, so its SVG group has an id (`data-items_per_s`, ...) a test can find.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CHARTS = {  # name: title
    "items_per_s": "Items finished per second",
    "tokens_per_s": "Output tokens per second",
    "queue_wait": "Queue wait (s)",
    "engine_time": "Engine time per chunk (s)",
}


def _figure(width: float, height: float) -> Figure:
    """A figure drawn without pyplot (no display, no global state); matplotlib is imported on first use:
    it writes its font cache under the home folder."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.hashsalt"] = "gristmill"  # the same batch draws the same SVG ids every time
    return Figure(figsize=(width, height), layout="constrained")


def _rate(ax: Axes, summary: dict[str, Any], series: str, name: str) -> None:
    line = summary["timeline"]
    width = line["bucket_s"]
    if not width:
        ax.text(0.5, 0.5, "nothing has run yet", ha="center", va="center", transform=ax.transAxes)
        return
    rates = [v / width for v in line[series]]
    ax.stairs(rates, [*line["t_s"], line["t_s"][-1] + width], gid=f"data-{name}")
    ax.set_xlabel(f"seconds since the first item started ({width:g} s buckets)")


def _histogram(ax: Axes, histogram: dict[str, Any], spread: dict[str, Any], name: str) -> None:
    if not histogram["counts"]:
        ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
        return
    edges, counts = histogram["edges"], histogram["counts"]
    ax.stairs(counts, edges, fill=True, gid=f"data-{name}")
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        if spread.get(q) is not None:
            ax.axvline(spread[q], color="black", linestyle=style, linewidth=1, label=f"{q} {spread[q]:.3g}")
    ax.legend(fontsize="small")
    ax.set_ylabel("count")


def draw(ax: Axes, summary: dict[str, Any], name: str) -> None:
    if name == "items_per_s":
        _rate(ax, summary, "items", name)
    elif name == "tokens_per_s":
        _rate(ax, summary, "output_tokens", name)
    elif name == "queue_wait":
        _histogram(ax, summary["histograms"]["queue_wait_s"], summary["queue_wait_s"], name)
    else:
        _histogram(ax, summary["histograms"]["engine_call_s"], summary["engine_call_s"], name)
    ax.set_title(CHARTS[name])


def svg(summary: dict[str, Any], name: str) -> str:
    """One chart as an SVG document (for inline use in HTML)."""
    figure = _figure(5.5, 3.2)
    draw(figure.add_subplot(), summary, name)
    out = io.StringIO()
    figure.savefig(out, format="svg")
    text = out.getvalue()
    return text[text.index("<svg"):]  # without the XML prologue and doctype


def plot(summary: dict[str, Any], path: str | Path) -> None:
    """All charts in one image; the format from the file's suffix (png, svg, pdf)."""
    figure = _figure(11, 6.8)
    figure.suptitle(f"{summary['batch_id']}: {summary['status']}, {summary['items']} items")
    for ax, name in zip(figure.subplots(2, 2).flat, CHARTS, strict=True):
        draw(ax, summary, name)
    figure.savefig(path, dpi=100)
