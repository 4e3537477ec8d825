"""The report's HTML page: one section per model, its plots (inline SVG) and one table row per release.

    page.render(models, report.METRICS) -> str   (builder/check/report.py gathers the models)

Self-contained: inline CSS and SVG, no script, no font or image fetched, no clock or path of this machine.
"""

from html import escape

from builder.check import svg

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #111827; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
p.note { max-width: 960px; color: #374151; font-size: 14px; line-height: 1.45; }
figure { margin: 12px 0 20px; } figcaption { font-size: 13px; color: #4b5563; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #d1d5db; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } td.number { text-align: right; white-space: nowrap; }
td.digest { font-family: ui-monospace, monospace; font-size: 11px; word-break: break-all; min-width: 160px; }
tr.not-built td { color: #6b7280; background: #fafafa; }
tr.pareto td:first-child { font-weight: 600; }
""".strip()

HOW = ("Every number below is read from what built artifacts record: <code>artifacts/&lt;release&gt;/"
       "manifest.json</code> (artifact_id, content digest, file sizes), <code>release.json</code> (the resolved "
       "spec) and <code>eval.json</code> (quality measured at build time). <b>Bits per weight</b> = 8 &times; "
       "the bytes of the artifact's weight files (every <code>.safetensors</code> or <code>.gguf</code> file its "
       "manifest lists: quantized values, scales, zero points, the tensors left unquantized and the files' "
       "headers) / the source model's parameter count (every tensor of the source checkpoint, as the "
       "architecture in release.json lists it; tied embeddings counted once). A release with no built artifact "
       "is listed as not built, with no numbers. The Pareto front (orange) holds the releases no other release "
       "beats on both size and quality.")
COLUMNS = ("release", "status", "recipe", "format", "target", "quality gate", "weight bytes", "bits per weight",
           "mean KL", "perplexity increase %", "task recovery", "Pareto front", "artifact_id", "content digest")


def render(models: list, metrics: tuple) -> str:
    """The whole page for the models report.by_model grouped."""
    built = sum(item["built"] for model in models for item in model["rows"])
    total = sum(len(model["rows"]) for model in models)
    body = ["<h1>Releases: size against quality</h1>",
            f'<p class="note">{total} release{"s" * (total != 1)}, {built} built. {HOW}</p>']
    for model in models:
        body += section(model, metrics)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n"  # no favicon request
            "<title>Release report</title>\n<style>\n" + STYLE + "\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def section(model: dict, metrics: tuple) -> list:
    """One model: a plot per quality figure some built release records, then the table."""
    name = escape(model["model"])
    heading = f"<h2>{name} <small>({escape(model['model_id'])})</small></h2>" if model["model_id"] else \
        f"<h2>{name}</h2>"
    parts = [f'<section class="model" data-model="{name}">', heading]
    for metric in metrics:
        points = model["points"][metric["key"]]
        if not points:
            parts.append(f'<p class="note">No built release of {name} records {escape(metric["short"])}.</p>')
            continue
        plot = svg.scatter(points, title=metric["title"], x_label="bits per weight", y_label=metric["axis"],
                           metric=metric["key"], log_y=metric["log"], higher_is_better=metric["higher"])
        on_front = sum(p["pareto"] for p in points)
        parts += ["<figure>", plot,
                  f"<figcaption>{escape(metric['short'])} against bits per weight: {len(points)} built "
                  f"release{'s' * (len(points) != 1)}, {on_front} on the Pareto front.</figcaption>", "</figure>"]
    parts += table(model["rows"]) + ["</section>"]
    return parts


def table(rows: list) -> list:
    """One row per release, built or not."""
    lines = ["<table>", "<thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in COLUMNS) + "</tr></thead>",
             "<tbody>"]
    for item in rows:
        kind = "built" if item["built"] else "not-built"
        if item.get("pareto"):
            kind += " pareto"
        cells = [text(item["release"] + f" {item['version']}"), text(status(item)), text(recipe(item)),
                 text(item["format"]), text(item["target"]), text(gate(item))]
        if item["built"]:
            cells += [number(f"{item['weight_bytes']:,}"), number(f"{item['bits_per_weight']:.3f}"),
                      *(number(figure(item, key)) for key in ("mean_kl", "perplexity_increase_pct", "task_recovery")),
                      text(", ".join(item.get("pareto", [])) or ("no" if item["evaluated"] else "")),
                      digest(item["artifact_id"]), digest(item["content_digest"])]
        else:
            cells += [text("")] * (len(COLUMNS) - len(cells))
        lines.append(f'<tr class="{kind}" data-release="{escape(item["release"])}">' + "".join(cells) + "</tr>")
    return lines + ["</tbody>", "</table>"]


def status(item: dict) -> str:
    if not item["built"]:
        return item["status"]
    if not item["evaluated"]:
        return f"{item['status']}; not evaluated (no eval group)"
    return item["status"]


def recipe(item: dict) -> str:
    overrides = item.get("overrides") or []
    return item["recipe"] + (f" (built with overrides: {' '.join(overrides)})" if overrides else "")


def gate(item: dict) -> str:
    passed = item.get("gate_passed")
    verdict = {True: "; passed", False: "; missed"}.get(passed, "")
    return item["gate"] + (verdict if item["gate"] != "none" else "")


def figure(item: dict, key: str) -> str:
    """A recorded figure as recorded (eval.json rounds to 6 decimals); blank when not measured."""
    value = item.get(key)
    return "" if value is None else f"{value:.6g}" if key == "task_recovery" else repr(value)


def text(value: str) -> str:
    return f"<td>{escape(value)}</td>"


def number(value: str) -> str:
    return f'<td class="number">{escape(value)}</td>'


def digest(value: str | None) -> str:
    return f'<td class="digest">{escape(value or "")}</td>'
