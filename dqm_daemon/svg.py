"""Histogram previews drawn as inline SVG on the server: 1D as a step line, 2D as a heat map,
each with its title, axis labels and tick values. No script, no image files."""

from __future__ import annotations

from html import escape
from typing import Any

from markupsafe import Markup

WIDTH, HEIGHT = 380, 250
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 26, 44
PLOT_WIDTH, PLOT_HEIGHT = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
# A colour-blind-safe sequential scale (viridis anchors), low → high.
HEAT_SCALE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / (count - 1)
    return [low + index * step for index in range(count)]


def _frame(title: str, x_title: str, y_title: str, x_range: tuple[float, float],
           y_range: tuple[float, float]) -> list[str]:
    """Title, axes box, tick marks with values, and axis titles."""
    parts = [
        f'<text class="plot-title" x="{WIDTH / 2}" y="16" text-anchor="middle">{escape(title)}</text>',
        f'<rect class="plot-frame" x="{LEFT}" y="{TOP}" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}"/>',
    ]
    x_low, x_high = x_range
    for tick in _ticks(x_low, x_high):
        x = LEFT + (tick - x_low) / ((x_high - x_low) or 1) * PLOT_WIDTH
        parts.append(f'<line class="tick" x1="{x:.1f}" y1="{TOP + PLOT_HEIGHT}" x2="{x:.1f}" '
                     f'y2="{TOP + PLOT_HEIGHT + 4}"/>')
        parts.append(f'<text class="tick-label" x="{x:.1f}" y="{TOP + PLOT_HEIGHT + 15}" '
                     f'text-anchor="middle">{_number(tick)}</text>')
    y_low, y_high = y_range
    for tick in _ticks(y_low, y_high):
        y = TOP + PLOT_HEIGHT - (tick - y_low) / ((y_high - y_low) or 1) * PLOT_HEIGHT
        parts.append(f'<line class="tick" x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick-label" x="{LEFT - 6}" y="{y + 3:.1f}" '
                     f'text-anchor="end">{_number(tick)}</text>')
    parts.append(f'<text class="axis-title" x="{LEFT + PLOT_WIDTH / 2}" y="{HEIGHT - 6}" '
                 f'text-anchor="middle">{escape(x_title)}</text>')
    parts.append(f'<text class="axis-title" transform="translate(12 {TOP + PLOT_HEIGHT / 2}) '
                 f'rotate(-90)" text-anchor="middle">{escape(y_title)}</text>')
    return parts


def _svg(parts: list[str], label: str) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg class="preview" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(label)}">{body}</svg>'
    )


def step_line(preview: dict[str, Any]) -> Markup:
    values: list[float] = preview["values"]
    (axis,) = preview["axes"]
    low, high = axis["low"], axis["high"]
    y_low = min(0.0, min(values, default=0.0))
    y_high = max(values, default=0.0) or 1.0
    y_high = y_high * 1.05 if y_high > 0 else y_high
    bin_width = PLOT_WIDTH / max(len(values), 1)

    def y_of(value: float) -> float:
        return TOP + PLOT_HEIGHT - (value - y_low) / ((y_high - y_low) or 1) * PLOT_HEIGHT

    points = [f"{LEFT:.1f},{y_of(0 if y_low <= 0 <= y_high else y_low):.1f}"]
    for index, value in enumerate(values):
        y = y_of(value)
        points.append(f"{LEFT + index * bin_width:.1f},{y:.1f}")
        points.append(f"{LEFT + (index + 1) * bin_width:.1f},{y:.1f}")
    parts = _frame(preview["title"], axis["title"], "entries" if "Profile" not in preview["class"]
                   else "mean", (low, high), (y_low, y_high))
    parts.append(f'<polyline class="step" points="{" ".join(points)}"/>')
    return _svg(parts, f"{preview['class']} {preview['title']}: step line of {len(values)} bins")


def _heat_colour(fraction: float) -> str:
    fraction = min(max(fraction, 0.0), 1.0) * (len(HEAT_SCALE) - 1)
    index = min(int(fraction), len(HEAT_SCALE) - 2)
    within = fraction - index
    low, high = HEAT_SCALE[index], HEAT_SCALE[index + 1]
    red, green, blue = (round(a + (b - a) * within) for a, b in zip(low, high, strict=True))
    return f"#{red:02x}{green:02x}{blue:02x}"


def heat_map(preview: dict[str, Any]) -> Markup:
    values: list[list[float]] = preview["values"]  # [x][y]
    x_axis, y_axis = preview["axes"]
    flat = [value for column in values for value in column]
    lowest, highest = min(flat, default=0.0), max(flat, default=0.0)
    spread = (highest - lowest) or 1.0
    cell_width = PLOT_WIDTH / max(len(values), 1)
    cell_height = PLOT_HEIGHT / max(len(values[0]) if values else 1, 1)
    parts = _frame(preview["title"], x_axis["title"], y_axis["title"],
                   (x_axis["low"], x_axis["high"]), (y_axis["low"], y_axis["high"]))
    cells = []
    for x_index, column in enumerate(values):
        for y_index, value in enumerate(column):
            if value == 0:
                continue  # empty cells stay background: the eye reads them as "nothing"
            x = LEFT + x_index * cell_width
            y = TOP + PLOT_HEIGHT - (y_index + 1) * cell_height
            cells.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell_width + 0.3:.1f}" '
                         f'height="{cell_height + 0.3:.1f}" fill="{_heat_colour((value - lowest) / spread)}"/>')
    parts.insert(2, f'<g class="cells">{"".join(cells)}</g>')
    parts.append(f'<text class="tick-label" x="{WIDTH - RIGHT}" y="16" text-anchor="end">'
                 f'z: {_number(lowest)} … {_number(highest)}</text>')
    return _svg(parts, f"{preview['class']} {preview['title']}: heat map "
                       f"{len(values)}×{len(values[0]) if values else 0}")


def draw(preview: dict[str, Any]) -> Markup:
    return step_line(preview) if preview["dimensions"] == 1 else heat_map(preview)
