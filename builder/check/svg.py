"""A scatter plot as inline SVG text, drawn by our own code: size against quality, the Pareto front marked.

    scatter(points, title="Mean KL", x_label="bits per weight", y_label="mean KL", metric="mean_kl", log_y=True)

No plotting library and no script: the page that holds it renders anywhere, and the same points always
give the same bytes (coordinates printed with two decimals).
"""

import math
from html import escape

from builder.check.pareto import staircase

WIDTH, HEIGHT = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 78, 24, 34, 58    # margins in px: tick labels left, axis title below
ZERO_BAND = 26                               # px below the lowest decade where zeros sit on a log axis
FRONT, OTHER = "#c2410c", "#2563eb"          # Pareto points and front line; the other releases


def fmt(value: float) -> str:
    """A coordinate: two decimals, no "-0.00"."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def label(value: float) -> str:
    """A tick label: short and exact enough to read (0.001, 0.05, 2, 12.5, 1e-05)."""
    return f"{value:.6g}"


def nice_step(span: float, count: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten step giving about count ticks over span."""
    raw = span / count if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def linear_axis(values: list, from_zero: bool) -> tuple:
    """(low, high, ticks) of a linear axis over values, on whole steps; 0 included when from_zero."""
    low, high = min(values), max(values)
    if from_zero:
        low, high = min(low, 0.0), max(high, 0.0)
    if high == low:
        high = low + 1.0
    step = nice_step(high - low)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = [low + i * step for i in range(round((high - low) / step) + 1)]
    return low, high, [round(t, 12) for t in ticks]


def uses_log(values: list) -> bool:
    """A log axis when the positive values span a factor of ten or more (mean KL of FP8 and INT4)."""
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) >= 10 * min(positive) and min(values) >= 0


class Axis:
    """Maps data values to pixels along one direction; zeros on a log axis go to their own band."""

    def __init__(self, values: list, start: float, end: float, log: bool, from_zero: bool):
        self.log, self.start, self.end = log, start, end
        if log:
            positive = [v for v in values if v > 0]
            self.low, self.high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
            if self.high == self.low:
                self.high += 1
            self.zeros = any(v == 0 for v in values)
            self.ticks = [10.0 ** e for e in range(self.low, self.high + 1)] + ([0.0] if self.zeros else [])
        else:
            self.low, self.high, self.ticks = linear_axis(values, from_zero)
            self.zeros = False

    def __call__(self, value: float) -> float:
        start, end = self.start, self.end
        if self.log:
            band = ZERO_BAND if self.zeros else 0
            if value <= 0:
                return start
            start += band if end > start else -band
            share = (math.log10(value) - self.low) / (self.high - self.low)
        else:
            share = (value - self.low) / (self.high - self.low)
        return start + share * (end - start)


def scatter(points: list, *, title: str, x_label: str, y_label: str, metric: str, log_y: bool = False,
            higher_is_better: bool = False) -> str:
    """An <svg class="plot"> of points ({release, label, x, y, pareto}): one circle per point (class
    "point", plus "pareto" on the front, data-release naming it), the front as a dashed staircase."""
    x_axis = Axis([p["x"] for p in points], LEFT, WIDTH - RIGHT, log=False, from_zero=True)
    y_values = [p["y"] for p in points]
    y_axis = Axis(y_values, HEIGHT - BOTTOM, TOP, log=log_y and uses_log(y_values), from_zero=not higher_is_better)
    better = "higher" if higher_is_better else "lower"
    middle = fmt((TOP + HEIGHT - BOTTOM) / 2)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-metric="{escape(metric)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
             f'<text x="{LEFT}" y="{TOP - 12}" font-size="14" font-weight="600">{escape(title)}</text>']
    parts += grid(x_axis, y_axis)
    parts += [f'<text x="{fmt((LEFT + WIDTH - RIGHT) / 2)}" y="{HEIGHT - 14}" text-anchor="middle" '
              f'font-size="13">{escape(x_label)} (smaller is left)</text>',
              f'<text x="18" y="{middle}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {middle})">'
              f'{escape(y_label)}, {better} is better{" (log scale)" if y_axis.log else ""}</text>']
    steps = staircase([(p["x"], p["y"]) for p in points if p["pareto"]], higher_is_better)
    if len(steps) > 1:
        path = " ".join(f"{fmt(x_axis(x))},{fmt(y_axis(y))}" for x, y in steps)
        parts.append(f'<polyline class="front" points="{path}" fill="none" stroke="{FRONT}" '
                     'stroke-width="1.5" stroke-dasharray="5 4"/>')
    centres = [(x_axis(p["x"]), y_axis(p["y"])) for p in points]
    placed = [(x - 6, y - 6, x + 6, y + 6) for x, y in centres]  # labels keep off every point and each other
    for point in sorted(points, key=lambda p: (p["pareto"], p["release"])):  # front drawn on top
        x, y = x_axis(point["x"]), y_axis(point["y"])
        box = place_label(point["label"], x, y, placed)
        placed.append(box)
        parts += marker(point, x, y, box)
    parts.append("</svg>")
    return "\n".join(parts)


def grid(x_axis: Axis, y_axis: Axis) -> list:
    """Axes frame, grid lines and tick labels."""
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" '
             'stroke="#9ca3af"/>']
    for tick in x_axis.ticks:
        x = fmt(x_axis(tick))
        parts += [f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{bottom}" stroke="#e5e7eb"/>',
                  f'<text x="{x}" y="{bottom + 18}" text-anchor="middle" font-size="12">{label(tick)}</text>']
    for tick in y_axis.ticks:
        y = fmt(y_axis(tick))
        parts += [f'<line x1="{LEFT}" y1="{y}" x2="{right}" y2="{y}" stroke="#e5e7eb"/>',
                  f'<text x="{LEFT - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" '
                  f'font-size="12">{label(tick)}</text>']
    return parts


def place_label(text: str, x: float, y: float, placed: list) -> tuple:
    """(left, top, right, bottom) of a point's label: above right of it, else below right, above left,
    below left, whichever overlaps no label placed before; else the first, moved down until free."""
    width, height = 6.2 * len(text) + 2, 12      # px of 11 px text, generously
    sides = [(x + 8, y - 18), (x + 8, y + 6), (x - 8 - width, y - 18), (x - 8 - width, y + 6)]
    if x + 8 + width > WIDTH - RIGHT:             # near the right edge: left side first
        sides = sides[2:] + sides[:2]
    boxes = [(left, top, left + width, top + height) for left, top in sides]
    for box in boxes:
        if not any(overlaps(box, other) for other in placed):
            return box
    left, top, right, bottom = boxes[0]
    while any(overlaps((left, top, right, bottom), other) for other in placed):
        top, bottom = top + height, bottom + height
    return left, top, right, bottom


def overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def marker(point: dict, x: float, y: float, box: tuple) -> list:
    """One release's circle, its hover title and its short label in the box place_label chose."""
    pareto = point["pareto"]
    kind = "point pareto" if pareto else "point"
    title = f'{point["release"]}: {point["x"]:.3f} bits per weight, {point["y"]:.6g}'
    return [f'<circle class="{kind}" data-release="{escape(point["release"])}" cx="{fmt(x)}" cy="{fmt(y)}" '
            f'r="{6 if pareto else 5}" fill="{FRONT if pareto else OTHER}" stroke="#111827" '
            f'stroke-width="{1.5 if pareto else 0.5}"><title>{escape(title)}</title></circle>',
            f'<text x="{fmt(box[0])}" y="{fmt(box[3] - 2)}" font-size="11" fill="#374151">'
            f'{escape(point["label"])}</text>']
