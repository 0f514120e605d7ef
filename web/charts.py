"""Small server-rendered SVG charts for the admin console (matplotlib, no script and no CDN), and the
human units every duration on the console is shown in."""
from __future__ import annotations

import io
import re
from datetime import UTC, datetime

from markupsafe import Markup


def duration(seconds: float | None) -> str:
    """``0.85`` -> ``"850 ms"``, ``75`` -> ``"1.2 min"``, ``684.757`` -> ``"11.4 min"``, ``None`` -> ``"–"``."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{1000 * seconds:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def line_chart(times: list[float], series: dict[str, list[float | None]], title: str, y_label: str,
               scale: float = 1.0) -> Markup:
    """A line chart over wall-clock ``times`` (epoch seconds) as inline SVG; ``None`` values are gaps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import dates
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 2.3), dpi=96)
    ax = fig.add_subplot()
    x = [datetime.fromtimestamp(t, UTC) for t in times]
    for name, values in series.items():
        ax.plot(x, [float("nan") if v is None else v * scale for v in values], marker=".", linewidth=1.5,
                label=name)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(y_label, fontsize=9)
    if len(x) > 1:
        ax.set_xlim(x[0], x[-1])  # the whole window, even where a series has no values
    ax.xaxis.set_major_formatter(dates.DateFormatter("%H:%M"))
    ax.tick_params(labelsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = re.sub(r"^.*?(<svg)", r"\1", buf.getvalue(), count=1, flags=re.S)  # drop the XML prolog and DOCTYPE
    # matplotlib's own SVG of our figures: titles and labels are this module's callers' constants, no user text.
    return Markup(svg)  # noqa: S704  # nosec B704
