"""builder report: an HTML page of releases (size against quality, the Pareto front), from what built
artifacts record; rendered in a real headless Chromium."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from builder import build as build_module
from builder.check import pareto, svg
from conftest import Repo, release_text

MODEL = "tiny-llama"
EVAL = "  - override /eval: docstrings\n"
# release suffix -> (recipe, target, extra defaults lines, extra YAML): an eval group with 2 windows of
# 32 tokens, so each build writes eval.json in a couple of seconds.
BUILT = {
    "bf16": ("bf16", "cpu", EVAL, ""),
    "fp8-dynamic": ("fp8-dynamic", "cpu", EVAL, ""),
    "w8a8-int8": ("w8a8-int8", "cpu", EVAL, ""),
    "w4a16": ("w4a16", "vllm-h100", EVAL, "quant:\n  weights:\n    group_size: 32\n"),
    "gguf-q8_0": ("gguf-q8_0", "llama-cpp", EVAL, ""),
    "fp8-dynamic-noeval": ("fp8-dynamic", "cpu", "", ""),  # built, nothing measured: a row, no point
}
NOT_BUILT = "mlx-4bit"
METRICS = ("mean_kl", "perplexity_increase_pct")


def write_release(root: Path, suffix: str, recipe: str, target: str, defaults: str, extra: str) -> str:
    name = f"{MODEL}-{suffix}"
    text = release_text(name, MODEL, recipe, target)
    evaluated = "eval:\n  samples: 2\n  sequence_length: 32\n" if defaults else ""
    text = text.replace("\n\nrelease:", f"\n{defaults}\n{evaluated}{extra}\nrelease:")
    (root / "specs" / "release" / f"{name}.yaml").write_text(text)
    return name


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Repo:
    """A repository with a tiny Llama's releases built into artifacts/<release>/ and one left unbuilt."""
    repo = Repo.fresh(tmp_path_factory.mktemp("report") / "repo")
    repo.add_model(MODEL, tokenizer="bpe")  # BPE with merges: what a GGUF vocabulary needs
    for other in (repo.root / "specs" / "release").glob("*.yaml"):
        other.unlink()  # the shipped releases (the report of "all" stays quick) and add_model's, which have no eval
    for suffix, (recipe, target, defaults, extra) in BUILT.items():
        name = write_release(repo.root, suffix, recipe, target, defaults, extra)
        build_module.build(repo.root, name, (), out=repo.root / "artifacts" / name, log=lambda message: None)
    write_release(repo.root, NOT_BUILT, "mlx-4bit", "mlx", EVAL, "quant:\n  weights:\n    group_size: 32\n")
    return repo


@pytest.fixture(scope="module")
def page(built, tmp_path_factory) -> Path:
    """`builder report` (every release, default out) run once: the page's folder."""
    result = built.run("report", check=0)
    assert "wrote" in result.stdout
    return built.root / "reports"


class Page(HTMLParser):
    """The report's table rows (cell texts by release) and the plots' circles (class, release by metric)."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.circles, self.tags = {}, {}, []
        self.row = self.cell = self.metric = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "tr" and "data-release" in attrs:
            self.row = self.rows.setdefault(attrs["data-release"], [])
        elif tag == "td" and self.row is not None:
            self.cell = []
        elif tag == "svg":
            self.metric = attrs.get("data-metric")
        elif tag == "circle" and self.metric:
            self.circles.setdefault(self.metric, []).append((attrs["class"].split(), attrs["data-release"]))

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr":
            self.row = None


def column(name: str) -> int:
    from builder.check.page import COLUMNS

    return COLUMNS.index(name)


def source_parameters(weights: Path) -> int:
    """Every element of every tensor of the source checkpoint, counted from its safetensors header."""
    data = (weights / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for size in info["shape"]:
                count *= size
            total += count
    return total


def test_each_built_release_is_a_row_with_the_figures_its_artifact_records(built, page):
    rows = Page((page / "index.html").read_text()).rows
    assert sorted(rows) == sorted(f"{MODEL}-{suffix}" for suffix in [*BUILT, NOT_BUILT])
    parameters = source_parameters(built.root / "weights" / MODEL)
    for suffix in BUILT:
        name = f"{MODEL}-{suffix}"
        artifact = built.root / "artifacts" / name
        manifest = json.loads((artifact / "manifest.json").read_text())
        cells = rows[name]
        assert cells[column("artifact_id")] == manifest["artifact_id"]
        assert cells[column("content digest")] == manifest["content_digest"]
        weight_bytes = sum(p.stat().st_size for p in artifact.iterdir() if p.suffix in (".safetensors", ".gguf"))
        assert cells[column("weight bytes")] == f"{weight_bytes:,}"
        assert cells[column("bits per weight")] == f"{8 * weight_bytes / parameters:.3f}"
        assert cells[column("recipe")] == BUILT[suffix][0] and cells[column("target")] == BUILT[suffix][1]
        if (artifact / "eval.json").is_file():
            recorded = json.loads((artifact / "eval.json").read_text())
            assert cells[column("mean KL")] == repr(recorded["mean_kl"])
            assert cells[column("perplexity increase %")] == repr(recorded["perplexity_increase_pct"])
            assert cells[column("quality gate")] == "max_mean_kl 0.05, max_perplexity_increase_pct 5.0; passed"
        else:
            assert cells[column("mean KL")] == cells[column("Pareto front")] == ""
            assert cells[column("quality gate")] == "none"
            assert "not evaluated" in cells[column("status")]


def test_a_release_without_a_built_artifact_is_listed_as_not_built_with_no_numbers(page):
    cells = Page((page / "index.html").read_text()).rows[f"{MODEL}-{NOT_BUILT}"]
    assert cells[column("status")] == "not built"
    assert cells[column("recipe")] == "mlx-4bit" and cells[column("target")] == "mlx"
    assert cells[column("weight bytes"):] == [""] * (len(cells) - column("weight bytes"))


def test_a_built_artifact_that_the_committed_lock_no_longer_names_is_marked_stale(built):
    from builder.check import report

    name = f"{MODEL}-bf16"
    lock_file = built.root / "locks" / f"{name}.json"
    lock_file.parent.mkdir(exist_ok=True)
    manifest = json.loads((built.root / "artifacts" / name / "manifest.json").read_text())
    try:
        lock_file.write_text(json.dumps({"artifact_id": manifest["artifact_id"]}))
        assert report.row(built.root, name)["status"] == "built"
        lock_file.write_text(json.dumps({"artifact_id": "sha256:" + "0" * 64}))
        row = report.row(built.root, name)
        assert row["status"] == "built; the committed lock names another artifact_id"
        assert row["artifact_id"] == manifest["artifact_id"]  # the figures stay the artifact's own
    finally:
        lock_file.unlink()


def test_the_plots_hold_one_point_per_evaluated_release_with_the_pareto_front_marked(built, page):
    circles = Page((page / "index.html").read_text()).circles
    evaluated = {f"{MODEL}-{s}": json.loads((built.root / "artifacts" / f"{MODEL}-{s}" / "eval.json").read_text())
                 for s in BUILT if (built.root / "artifacts" / f"{MODEL}-{s}" / "eval.json").is_file()}
    rows = Page((page / "index.html").read_text()).rows
    size = {name: float(rows[name][column("bits per weight")]) for name in evaluated}
    for metric in METRICS:
        assert sorted(release for _, release in circles[metric]) == sorted(evaluated)
        marked = {release for classes, release in circles[metric] if "pareto" in classes}
        dominated = {a for a in evaluated for b in evaluated if size[b] <= size[a] and
                     evaluated[b][metric] <= evaluated[a][metric] and
                     (size[b] < size[a] or evaluated[b][metric] < evaluated[a][metric])}
        assert marked == set(evaluated) - dominated and marked
    assert "task_recovery" not in circles  # no eval.json here records tasks: no plot, no invented points


def test_the_report_is_the_same_bytes_wherever_and_whenever_it_runs_and_names_no_local_path(built, page, tmp_path):
    first = (page / "index.html").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    built.run("report", "--out", str(elsewhere), cwd=built.root / "specs", env={"TZ": "Asia/Tokyo", "LANG": "C"},
              check=0)
    assert (elsewhere / "index.html").read_bytes() == first
    text = first.decode()
    assert str(built.root) not in text and "/tmp" not in text
    # self-contained: no script, no stylesheet or image fetched (the favicon is an empty data: URL)
    tags = Page(text).tags
    assert not [t for t, _ in tags if t in ("script", "img", "iframe", "object")]
    assert [a.get("href") for t, a in tags if t == "link"] == ["data:,"]
    assert "url(" not in text and "@import" not in text


def test_pngs_are_written_with_matplotlib_and_skipped_with_a_reason_without_it(built, tmp_path):
    out = tmp_path / "out"
    result = built.run("report", "--out", str(out), check=0)
    pngs = sorted(p.name for p in out.glob("*.png"))
    if importlib.util.find_spec("matplotlib") is None:
        assert pngs == [] and "PNG skipped: matplotlib is not installed" in result.stderr
        return
    assert pngs == [f"{MODEL}-kl.png", f"{MODEL}-perplexity.png"]
    again = tmp_path / "again"
    built.run("report", "--out", str(again), check=0)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data == (again / name).read_bytes()
        assert b"Software" not in data and b"matplotlib" not in data
        assert len(colour_counts(pixels(out / name))) > 2


def test_an_unknown_release_is_bad_input_and_nothing_is_written(built, tmp_path):
    out = tmp_path / "out"
    result = built.run("report", f"{MODEL}-bf16", "no-such-release", "--out", str(out))
    assert result.returncode == 2
    assert "specs/release/no-such-release.yaml: no such release; known:" in result.stderr
    assert not out.exists()


def test_the_pareto_front_keeps_what_nothing_beats_on_both_size_and_quality():
    points = [(4.0, 0.10), (8.0, 0.01), (8.0, 0.02), (16.0, 0.0), (17.0, 0.0), (4.0, 0.10)]
    assert pareto.front(points) == [True, True, False, True, False, True]  # equal points share the front
    assert pareto.front([(4.0, 0.90), (8.0, 0.99), (8.5, 0.95)], higher_is_better=True) == [True, True, False]
    assert pareto.staircase([(8.0, 0.01), (4.0, 0.1), (16.0, 0.0)]) == \
        [(4.0, 0.1), (8.0, 0.1), (8.0, 0.01), (16.0, 0.01), (16.0, 0.0)]


def test_a_log_axis_puts_a_zero_on_its_own_band_below_the_lowest_decade():
    axis = svg.Axis([0.0, 2e-5, 0.1], 400, 0, log=True, from_zero=True)
    assert axis.ticks == [1e-05, 1e-04, 1e-03, 1e-02, 1e-01, 0.0]
    assert axis(0.0) == 400 and axis(1e-5) == 400 - svg.ZERO_BAND and axis(0.1) == 0
    assert not svg.uses_log([0.0, 0.01, 0.05])  # less than a decade: linear
    assert svg.linear_axis([-0.57, 0.08], from_zero=True)[2] == [-0.6, -0.4, -0.2, 0.0, 0.2]


# --- A real browser ---------------------------------------------------------------------------------

def chromium() -> str:
    """Debian's chromium; missing, the test skips here and fails in CI (CI=true), which installs it."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: CI must run .ci/chromium.sh before the tests")
        pytest.skip("chromium is not installed (.ci/chromium.sh installs Debian's); CI runs this test")
    return path


def render(page: Path, tmp_path: Path) -> tuple:
    """Open page in headless Chromium: (screenshot path, serialized DOM, console lines)."""
    shot = tmp_path / "screenshot.png"
    home = tmp_path / "home"  # Chromium's profile, caches and crash reports stay in tmp_path
    environment = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                   "XDG_CACHE_HOME": str(home / ".cache")}
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--user-data-dir={home / 'profile'}", "--no-first-run", "--enable-logging=stderr",
                             "--v=0", "--window-size=1280,1200", f"--screenshot={shot}", "--dump-dom",
                             page.resolve().as_uri()], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return shot, result.stdout, console


def pixels(png: Path):
    """The (height, width, 3) RGB array of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium and
    matplotlib write), decoded with zlib and numpy (no imaging library in the test environment)."""
    import numpy

    data, chunks, at = png.read_bytes(), {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.setdefault(kind, []).append(data[at + 8:at + 8 + length])
        at += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    stride = width * channels
    raw = numpy.frombuffer(zlib.decompress(b"".join(chunks[b"IDAT"])), numpy.uint8).reshape(height, stride + 1)
    image, previous = numpy.zeros((height, stride), numpy.uint8), numpy.zeros(stride, numpy.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(numpy.int64)
        if kind == 1:    # Sub: a running sum along the row, per channel
            line = line.reshape(width, channels).cumsum(axis=0).reshape(-1)
        elif kind == 2:  # Up
            line = line + previous
        elif kind in (3, 4):  # Average, Paeth: each byte needs the one decoded before it
            line = numpy.array(unfilter(kind, line.tolist(), previous.tolist(), channels))
        previous = line % 256
        image[y] = previous
    return image.reshape(height, width, channels)[:, :, :3]


def unfilter(kind: int, line: list, up: list, channels: int) -> list:
    """One PNG row under the Average (3) or Paeth (4) filter."""
    for i in range(len(line)):
        left = line[i - channels] if i >= channels else 0
        if kind == 3:
            line[i] = (line[i] + (left + up[i]) // 2) & 0xFF
            continue
        corner = up[i - channels] if i >= channels else 0
        estimate = left + up[i] - corner
        near, above, diagonal = abs(estimate - left), abs(estimate - up[i]), abs(estimate - corner)
        line[i] = (line[i] + (left if near <= above and near <= diagonal else up[i] if above <= diagonal
                              else corner)) & 0xFF
    return line


def test_the_page_renders_in_headless_chromium_with_its_plots_and_no_console_errors(built, page, tmp_path):
    shot, dom, console = render(page / "index.html", tmp_path)
    assert console == []
    image = pixels(shot)
    assert image.shape == (1200, 1280, 3)
    drawn = colour_counts(image)
    assert len(drawn) > 50 and drawn.get((255, 255, 255), 0) < 0.99 * image.shape[0] * image.shape[1]  # not blank
    front, other = tuple(bytes.fromhex(svg.FRONT[1:])), tuple(bytes.fromhex(svg.OTHER[1:]))
    assert drawn.get(front, 0) > 50 and drawn.get(other, 0) > 50  # Pareto points and the others were painted
    served, written = Page(dom), Page((page / "index.html").read_text())
    assert served.circles == written.circles and sorted(served.circles) == sorted(METRICS)
    assert served.rows == written.rows


def colour_counts(image) -> dict:
    """{(r, g, b): pixels of that colour} of an image array."""
    import numpy

    wide = image.astype(numpy.uint32)
    packed = (wide[..., 0] << 16 | wide[..., 1] << 8 | wide[..., 2]).ravel()
    values, counts = numpy.unique(packed, return_counts=True)
    return {(v >> 16, v >> 8 & 0xFF, v & 0xFF): n for v, n in zip(values.tolist(), counts.tolist())}


def test_the_console_check_sees_a_script_error(tmp_path):
    """The browser check can fail: a page whose script throws shows up in the console lines."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>x</p>'
                      "<script>undefinedFunction();</script></body></html>")
    _, dom, console = render(broken, tmp_path)
    assert "<p>x</p>" in dom and any("Uncaught ReferenceError" in line for line in console)


def test_png_labels_of_crowded_points_cover_no_other_label_or_point_and_stay_in_the_picture():
    """Releases of one size and nearly one quality (FP8 and INT8 at ~9.7 bits, the FP4 cluster at ~7) get
    labels that each can be read: none overlaps another label or a marker, none runs off the figure."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from builder.check import png

    names = ["fp8-dynamic", "fp8-dynamic-capitals", "w8a8-int8", "mxfp8", "nvfp4", "mxfp4a16", "w4a16",
             "nvfp4a16", "mlx-4bit", "gguf-q4_0", "gguf-q8_0-at-the-right-edge"]
    xy = [(9.7, 0.017), (9.7, 0.017), (9.7, 0.026), (9.9, 0.030), (6.75, 0.36), (6.9, 0.36), (6.9, 0.24),
          (6.9, 0.20), (7.05, 0.15), (7.05, 0.15), (10.2, 0.001)]
    points = [{"x": x, "y": y, "label": name, "release": name, "pareto": False} for name, (x, y) in zip(names, xy)]
    figure, axes = pyplot.subplots(figsize=png.SIZE, dpi=png.DPI)
    try:
        axes.scatter([x for x, _ in xy], [y for _, y in xy])
        axes.set_yscale("log")
        axes.set_xlim(left=0)
        figure.tight_layout()
        boxes = png.label(figure, axes, points)
        centres = [axes.transData.transform(point) for point in xy]
    finally:
        pyplot.close(figure)
    assert len(boxes) == len(points)
    assert not [(a, b) for a in range(len(boxes)) for b in range(a) if boxes[a].overlaps(boxes[b])]
    assert not [(box, centre) for box in boxes for centre in centres if box.contains(*centre)]
    assert all(0 <= box.x0 and box.x1 <= figure.bbox.x1 for box in boxes)
