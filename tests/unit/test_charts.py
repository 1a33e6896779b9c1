"""The server-side SVG bar chart: bars with their values, axes, ticks, legend, limit lines."""

import re
from datetime import UTC, datetime

from webapp.charts import Line, Series, bar_chart, nice_step, scale_top

T0 = int(datetime(2026, 11, 19, 0, tzinfo=UTC).timestamp())
STARTS = [T0 + 3600 * n for n in range(48)]


def chart(values, lines=(), second=None):
    series = [Series("messages", "Messages", "#123456", values)]
    if second is not None:
        series.append(Series("recipients", "Recipients", "#abcdef", second))
    return str(bar_chart(chart_id="c1", title="Messages per hour", unit="per hour",
                         starts=STARTS, bucket_seconds=3600, series=series, lines=lines))


def bars(svg, series="messages"):
    return [(int(start), int(value)) for start, value in re.findall(
        rf'data-series="{series}" data-start="(\d+)" data-value="(\d+)"', svg)]


def test_one_bar_per_bucket_and_series_with_its_value():
    values = [0] * 48
    values[5], values[47] = 3, 12
    svg = chart(values, second=[1] * 48)
    found = bars(svg)
    assert len(found) == 48 and dict(found)[STARTS[5]] == 3 and dict(found)[STARTS[47]] == 12
    assert len(bars(svg, "recipients")) == 48
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'role="img"' in svg and "<title id=\"c1-title\">Messages per hour</title>" in svg
    assert "Messages: 15 in total, at most 12 in one bar" in svg  # the screen reader's text


def test_taller_value_draws_a_taller_bar_and_one_message_still_shows():
    values = [0] * 48
    values[0], values[1] = 1, 200
    svg = chart(values)
    heights = [float(h) for h in re.findall(r'data-value="\d+" x="[\d.]+" y="[\d.]+" '
                                            r'width="[\d.]+" height="([\d.]+)"', svg)]
    assert heights[1] > heights[0] >= 1.5 and heights[2] == 0


def test_axes_ticks_and_time_labels_in_utc():
    svg = chart([4] * 48)
    y_ticks = re.findall(r'class="tick y"[^>]*>([\d,]+)</text>', svg)
    assert y_ticks[0] == "0" and len(y_ticks) >= 3
    x_ticks = re.findall(r'class="tick x"[^>]*>([^<]+)</text>', svg)
    assert x_ticks[:4] == ["19 Nov", "06:00", "12:00", "18:00"] and "20 Nov" in x_ticks
    assert ">per hour</text>" in svg and ">UTC</text>" in svg
    assert 'class="legend"' in svg and ">Messages</text>" in svg


def test_limit_line_is_drawn_at_its_value_with_its_label():
    svg = chart([10] * 48, lines=[Line("Limit per hour: 20", 20, "#000")])
    (limit,) = re.findall(r'class="limit" data-limit="(\d+)"[^>]*y1="([\d.]+)"', svg)
    bar_top = float(re.search(r'data-value="10" x="[\d.]+" y="([\d.]+)"', svg).group(1))
    assert limit[0] == "20" and float(limit[1]) < bar_top  # above the bars
    assert svg.count("Limit per hour: 20") >= 2  # on the line and in the legend


def test_limit_far_above_the_bars_is_named_not_drawn():
    svg = chart([2] * 48, lines=[Line("Limit per day: 10,000", 10000, "#000")])
    assert 'class="limit"' not in svg
    assert "Limit per day: 10,000 (above the chart)" in svg
    assert max(int(t.replace(",", "")) for t in
               re.findall(r'class="tick y"[^>]*>([\d,]+)<', svg)) < 10


def test_empty_chart_still_has_axes_and_draws_the_limit():
    svg = chart([0] * 48, lines=[Line("Limit per hour: 5", 5, "#000")])
    assert 'class="axis"' in svg and 'data-limit="5"' in svg


def test_labels_are_escaped():
    svg = str(bar_chart(chart_id="x", title="<b>", unit="u", starts=STARTS[:1],
                        bucket_seconds=3600, series=[Series("s", "<i>", "#000", [1])]))
    assert "<b>" not in svg and "<i>" not in svg and "&lt;i&gt;" in svg


def test_round_tick_steps():
    assert nice_step(4) == 1 and nice_step(37) == 10 and nice_step(120) == 50
    assert scale_top([0, 7], [])[:2] == (8, 2)
    assert scale_top([], [])[0] >= 1
