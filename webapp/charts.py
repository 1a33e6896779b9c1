"""Bar charts as inline SVG, drawn on the server: no charting library, no script, nothing
from a CDN, and the same picture for every browser and for a screen reader (title, summary,
one <title> per bar).

Pure: values in, markup out. Each bar carries ``data-series``, ``data-start`` and
``data-value``, each limit line ``data-limit``, so tests read the chart as data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 230
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 44, 34  # margins around the plot
OFF_SCALE = 3.0  # a limit further above the highest bar than this is named, not drawn


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    color: str
    values: Sequence[int]


@dataclass(frozen=True)
class Line:
    """A horizontal line across the plot: a limit."""

    label: str
    value: float
    color: str


def nice_step(top: float, ticks: int = 4) -> int:
    """A round tick step (1, 2, 5 x 10^n) giving about ``ticks`` steps up to ``top``."""
    raw = max(top / ticks, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return int(factor * power)
    return int(10 * power)


def scale_top(values: Sequence[float], lines: Sequence[Line]) -> tuple[int, int, list[Line]]:
    """The axis top, its tick step, and the lines drawn inside the plot (a limit far above
    the bars would flatten them to nothing: it is named in the legend instead)."""
    highest = max([0, *values])
    drawn = [line for line in lines
             if highest == 0 or line.value <= highest * OFF_SCALE]
    top = max([highest, *(line.value for line in drawn), 1])
    step = nice_step(top)
    return step * math.ceil(top / step), step, drawn


def _time_label(start: int, bucket_seconds: int) -> str | None:
    """The x-axis label of a bucket, or None: hours at 00, 06, 12 and 18 (the date at
    midnight), days on the 1st, 6th, 11th, ... of the month."""
    moment = datetime.fromtimestamp(start, UTC)
    if bucket_seconds < 86400:
        if moment.hour % 6:
            return None
        return f"{moment.day} {moment:%b}" if moment.hour == 0 else f"{moment:%H}:00"
    return f"{moment.day} {moment:%b}" if moment.day % 5 == 1 and moment.day < 31 else None


def _bucket_text(start: int, bucket_seconds: int) -> str:
    moment = datetime.fromtimestamp(start, UTC)
    if bucket_seconds < 86400:
        return f"{moment:%Y-%m-%d %H}:00-{(moment.hour + 1) % 24:02d}:00 UTC"
    return f"{moment:%Y-%m-%d} (UTC)"


def _number(value: float) -> str:
    return f"{round(value):,}"


def bar_chart(*, chart_id: str, title: str, unit: str, starts: Sequence[int],
              bucket_seconds: int, series: Sequence[Series],
              lines: Sequence[Line] = ()) -> Markup:
    """Grouped bars (one group per bucket, one bar per series) with limit lines, y-axis
    ticks in ``unit``, time ticks in UTC, and a legend."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bottom = TOP + plot_h
    values = [v for s in series for v in s.values]
    top, step, drawn = scale_top(values, lines)
    groups = max(len(starts), 1)
    group_w = plot_w / groups
    bar_w = group_w * 0.8 / max(len(series), 1)

    def y(value: float) -> float:
        return bottom - plot_h * value / top

    out = [f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'width="100%" role="img" aria-labelledby="{escape(chart_id)}-title '
           f'{escape(chart_id)}-desc" xmlns="http://www.w3.org/2000/svg" '
           f'font-family="system-ui, sans-serif" font-size="11">',
           f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
           f'<desc id="{escape(chart_id)}-desc">{escape(_summary(series, lines))}</desc>']
    # Grid and y-axis ticks.
    for tick in range(0, top + 1, step):
        ty = y(tick)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ty:.1f}" '
                   f'y2="{ty:.1f}" stroke="#e3e7ed" stroke-width="1"/>')
        out.append(f'<text class="tick y" x="{LEFT - 6}" y="{ty + 4:.1f}" '
                   f'text-anchor="end" fill="#5f6b7c">{_number(tick)}</text>')
    out.append(f'<text class="unit" transform="translate(14 {TOP + plot_h / 2:.1f}) '
               f'rotate(-90)" text-anchor="middle" fill="#5f6b7c">{escape(unit)}</text>')
    # Bars.
    for index, start in enumerate(starts):
        gx = LEFT + index * group_w + group_w * 0.1
        for k, s in enumerate(series):
            value = s.values[index]
            height = plot_h * value / top
            if value and height < 1.5:
                height = 1.5  # one message still shows
            out.append(
                f'<rect class="bar" data-series="{escape(s.key)}" data-start="{start}" '
                f'data-value="{value}" x="{gx + k * bar_w:.1f}" y="{bottom - height:.1f}" '
                f'width="{max(bar_w - 0.5, 0.5):.1f}" height="{height:.1f}" '
                f'fill="{escape(s.color)}"><title>{escape(_bucket_text(start, bucket_seconds))}'
                f': {value:,} {escape(s.label.lower())}</title></rect>')
        label = _time_label(start, bucket_seconds)
        if label:
            tx = LEFT + index * group_w
            out.append(f'<line class="tick-mark" x1="{tx:.1f}" x2="{tx:.1f}" y1="{bottom}" '
                       f'y2="{bottom + 4}" stroke="#8a94a3"/>')
            out.append(f'<text class="tick x" x="{tx:.1f}" y="{bottom + 16}" '
                       f'text-anchor="middle" fill="#5f6b7c">{escape(label)}</text>')
    # Axes.
    out.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" '
               f'stroke="#8a94a3"/>')
    out.append(f'<line class="axis" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{bottom}" '
               f'y2="{bottom}" stroke="#8a94a3"/>')
    out.append(f'<text class="axis-note" x="{LEFT + plot_w}" y="{HEIGHT - 4}" '
               f'text-anchor="end" fill="#5f6b7c">UTC</text>')
    # Limit lines, labelled at their right end.
    for line in drawn:
        ly = y(line.value)
        out.append(f'<line class="limit" data-limit="{line.value:g}" x1="{LEFT}" '
                   f'x2="{LEFT + plot_w}" y1="{ly:.1f}" y2="{ly:.1f}" '
                   f'stroke="{escape(line.color)}" stroke-width="1.5" stroke-dasharray="6 4">'
                   f'<title>{escape(line.label)}</title></line>')
        out.append(f'<text class="limit-label" x="{LEFT + plot_w - 4}" y="{ly - 4:.1f}" '
                   f'text-anchor="end" fill="{escape(line.color)}">{escape(line.label)}</text>')
    out.append(_legend(series, lines, drawn))
    out.append("</svg>")
    return Markup("".join(out))


def _legend(series: Sequence[Series], lines: Sequence[Line], drawn: Sequence[Line]) -> str:
    """Swatches and names along the top, wrapping to a second row when they do not fit."""
    parts, x, row = [], LEFT, 0
    items = [(s.label, s.color, False) for s in series] + [
        (line.label if line in drawn else f"{line.label} (above the chart)", line.color, True)
        for line in lines]
    for text, color, dashed in items:
        width = 26 + int(6.2 * len(text))
        if x + width > WIDTH - RIGHT and x > LEFT:
            x, row = LEFT, row + 1
        base = 18 + 15 * row
        if dashed:
            parts.append(f'<line x1="{x}" x2="{x + 18}" y1="{base - 4}" y2="{base - 4}" '
                         f'stroke="{escape(color)}" stroke-width="1.5" stroke-dasharray="6 4"/>')
        else:
            parts.append(f'<rect x="{x + 3}" y="{base - 10}" width="12" height="12" '
                         f'fill="{escape(color)}"/>')
        parts.append(f'<text x="{x + 22}" y="{base}" fill="#1d2430">{escape(text)}</text>')
        x += width + 12
    return f'<g class="legend">{"".join(parts)}</g>'


def _summary(series: Sequence[Series], lines: Sequence[Line]) -> str:
    """One sentence a screen reader says instead of the picture."""
    parts = [f"{s.label}: {sum(s.values):,} in total, at most {max([0, *s.values]):,} "
             "in one bar" for s in series]
    parts += [line.label for line in lines]
    return "; ".join(parts) + "."
