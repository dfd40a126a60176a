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


def _bin_bounds(axis: dict[str, Any], count: int, length: float) -> list[float]:
    """Where each of `count` bins starts along a plot side of `length`, and where the last
    ends: evenly, or by the axis's `edges` when its bins differ in width."""
    edges = axis.get("edges")
    if edges is not None and len(edges) == count + 1:
        span = (axis["high"] - axis["low"]) or 1
        return [(edge - axis["low"]) / span * length for edge in edges]
    return [index * length / max(count, 1) for index in range(count + 1)]


def step_line(preview: dict[str, Any]) -> Markup:
    values: list[float] = preview["values"]
    (axis,) = preview["axes"]
    low, high = axis["low"], axis["high"]
    y_low = min(0.0, min(values, default=0.0))
    y_high = max(values, default=0.0) or 1.0
    y_high = y_high * 1.05 if y_high > 0 else y_high
    bounds = _bin_bounds(axis, len(values), PLOT_WIDTH)

    def y_of(value: float) -> float:
        return TOP + PLOT_HEIGHT - (value - y_low) / ((y_high - y_low) or 1) * PLOT_HEIGHT

    points = [f"{LEFT:.1f},{y_of(0 if y_low <= 0 <= y_high else y_low):.1f}"]
    for index, value in enumerate(values):
        y = y_of(value)
        points.append(f"{LEFT + bounds[index]:.1f},{y:.1f}")
        points.append(f"{LEFT + bounds[index + 1]:.1f},{y:.1f}")
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
    x_bounds = _bin_bounds(x_axis, len(values), PLOT_WIDTH)
    y_bounds = _bin_bounds(y_axis, len(values[0]) if values else 0, PLOT_HEIGHT)
    parts = _frame(preview["title"], x_axis["title"], y_axis["title"],
                   (x_axis["low"], x_axis["high"]), (y_axis["low"], y_axis["high"]))
    cells = []
    for x_index, column in enumerate(values):
        for y_index, value in enumerate(column):
            if value == 0:
                continue  # empty cells stay background: the eye reads them as "nothing"
            x = LEFT + x_bounds[x_index]
            y = TOP + PLOT_HEIGHT - y_bounds[y_index + 1]
            width = x_bounds[x_index + 1] - x_bounds[x_index]
            height = y_bounds[y_index + 1] - y_bounds[y_index]
            cells.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width + 0.3:.1f}" '
                         f'height="{height + 0.3:.1f}" fill="{_heat_colour((value - lowest) / spread)}"/>')
    parts.insert(2, f'<g class="cells">{"".join(cells)}</g>')
    parts.append(f'<text class="tick-label" x="{WIDTH - RIGHT}" y="16" text-anchor="end">'
                 f'z: {_number(lowest)} … {_number(highest)}</text>')
    return _svg(parts, f"{preview['class']} {preview['title']}: heat map "
                       f"{len(values)}×{len(values[0]) if values else 0}")


def draw(preview: dict[str, Any]) -> Markup:
    return step_line(preview) if preview["dimensions"] == 1 else heat_map(preview)
