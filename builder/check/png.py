"""The report's plots as PNG files, through matplotlib when it is installed (the `report` extra).

    png.render(models, report.METRICS) -> ({"<model>-kl.png": bytes, ...}, None or why skipped)

The page itself needs none of this (its plots are inline SVG); PNGs are for READMEs and model cards.
Same points, same bytes: no date or software name in the file, fixed size and resolution, one font.
"""

import io

SKIPPED = "matplotlib is not installed (pip install '.[report]' adds it)"
FRONT, OTHER = "#c2410c", "#2563eb"
SIZE, DPI = (7.6, 4.4), 100  # inches, dots per inch: 760 x 440 px, as the SVG


def render(models: list, metrics: tuple) -> tuple:
    """({file name: PNG bytes} for every model and metric with a point, None), or ({}, reason)."""
    try:
        import matplotlib
    except ImportError:
        return {}, SKIPPED
    matplotlib.use("Agg")
    from matplotlib import pyplot

    files = {}
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "svg.hashsalt": "report", "path.simplify": False}):
        for model in models:
            for metric in metrics:
                points = model["points"][metric["key"]]
                if points:
                    files[f"{model['model']}-{metric['png']}.png"] = plot(pyplot, points, metric)
    return files, None


# Where a label may sit beside its point (points right, up; alignment), nearest first: the first that
# overlaps no label already placed is taken (the last one otherwise).
PLACES = tuple((dx, dy * up, across, "bottom" if up > 0 else "top") for dy in (6, 16, 26, 36) for up in (1, -1)
               for dx, across in ((6, "left"), (-6, "right")))


def label(figure, axes, points: list) -> list:
    """Each point's label beside it, in the first place (PLACES) inside the figure that covers no point
    and no label placed before it, left to right; the labels' boxes (pixels), in that order."""
    from matplotlib.transforms import Bbox

    renderer = figure.canvas.get_renderer()
    centres = [axes.transData.transform((p["x"], p["y"])) for p in points]
    taken = [Bbox.from_extents(x - 5, y - 5, x + 5, y + 5) for x, y in centres]  # the markers, in pixels
    for point in sorted(points, key=lambda p: (p["x"], p["y"], p["release"])):
        for number, (dx, dy, across, up) in enumerate(PLACES):
            text = axes.annotate(point["label"], (point["x"], point["y"]), textcoords="offset points",
                                 xytext=(dx, dy), ha=across, va=up, fontsize=8, color="#374151")
            box = text.get_window_extent(renderer)
            inside = figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1
            if number == len(PLACES) - 1 or (inside and not any(box.overlaps(other) for other in taken)):
                taken.append(box)
                break
            text.remove()
    return taken[len(points):]


def plot(pyplot, points: list, metric: dict) -> bytes:
    """One scatter plot: front points orange and joined by steps, labels beside each point."""
    from builder.check.pareto import staircase
    from builder.check.svg import uses_log

    figure, axes = pyplot.subplots(figsize=SIZE, dpi=DPI)
    try:
        ys = [p["y"] for p in points]
        if metric["log"] and uses_log(ys):  # zeros (BF16's KL) have no place on a log axis: symlog keeps them
            if min(ys) > 0:
                axes.set_yscale("log")
            else:
                axes.set_yscale("symlog", linthresh=min(y for y in ys if y > 0))
        steps = staircase([(p["x"], p["y"]) for p in points if p["pareto"]], metric["higher"])
        if len(steps) > 1:
            axes.plot([x for x, _ in steps], [y for _, y in steps], color=FRONT, linestyle="--", linewidth=1.2)
        for point in sorted(points, key=lambda p: (p["pareto"], p["release"])):
            axes.scatter([point["x"]], [point["y"]], s=48 if point["pareto"] else 36, zorder=3,
                         color=FRONT if point["pareto"] else OTHER, edgecolors="#111827")
        axes.margins(x=0.05, y=0.12)  # room for the labels above the highest point
        axes.set_xlim(left=0)
        axes.set_xlabel("bits per weight (smaller is left)")
        better = "higher" if metric["higher"] else "lower"
        axes.set_ylabel(f"{metric['axis']} ({better} is better)")
        axes.set_title(metric["title"], fontsize=10)
        axes.grid(True, color="#e5e7eb")
        figure.tight_layout()
        label(figure, axes, points)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
        return buffer.getvalue()
    finally:
        pyplot.close(figure)
