"""The GPU kit's one table: per model, recipe and tool, its runs side by side (pure: records in, text out)."""

GIB = 1 << 30
HEADER = ("| model | recipe | tool | layers | s / layer | runs (s) | peak GPU memory (GiB) | peak RSS (GiB) | "
          "identical twice |\n|---|---|---|---:|---:|---:|---:|---:|---|")


def outcome(run: dict) -> str:
    """What one run came to, in a few words: its seconds, or why it has none."""
    if "skipped" in run:
        return f"skipped ({run['skipped']})"
    if run.get("code") != 0:
        return f"FAILED ({run.get('error') or 'exit ' + str(run.get('code'))})"
    return f"{run['seconds']:.1f}"


def identical(runs: list) -> str:
    """yes / NO when two runs finished; why not, otherwise."""
    done = [run for run in runs if run.get("code") == 0 and "skipped" not in run]
    if len(done) < 2:
        return "not run twice" if len(runs) < 2 or any("skipped" in r for r in runs) else "-"
    return "yes" if done[0]["content_digest"] == done[1]["content_digest"] else "NO"


def per_layer(run: dict, layers: int) -> str:
    """Seconds of the layer-by-layer work per decoder layer ('*': whole run, the work was not timed apart)."""
    if run.get("code") != 0 or "skipped" in run:
        return ""
    if "work_seconds" in run:
        return f"{run['work_seconds'] / layers:.2f}"
    return f"{run['seconds'] / layers:.2f}*"


def gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def markdown(rows: list, models: dict) -> tuple:
    """(the table, whether every run that ran succeeded and every pair of finished runs matched)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["recipe"], row["tool"]), []).append(row)
    lines, ok = [HEADER], True
    for (model, recipe, tool), runs in groups.items():
        runs.sort(key=lambda run: run["attempt"])
        first = next((run for run in runs if run.get("code") == 0 and "skipped" not in run), runs[0])
        same = identical(runs)
        ok &= same != "NO" and all(run.get("code") == 0 for run in runs if "skipped" not in run)
        lines.append(f"| {model} | {recipe} | {tool} | {models[model]['layers']} | "
                     f"{per_layer(first, models[model]['layers'])} | {', '.join(outcome(run) for run in runs)} | "
                     f"{gib(first.get('peak_gpu_bytes'))} | {gib(first.get('peak_rss_bytes'))} | {same} |")
    return "\n".join(lines), ok
