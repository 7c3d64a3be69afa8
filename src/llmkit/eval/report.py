"""Reports of `llmkit eval`: report.md and report.html (tables + bar charts), and `compare` across runs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from llmkit.errors import InputError
from llmkit.fsutil import atomic_write_text

COUNTS = {"n", "tokens", "bytes", "files", "parameters", "prompt_tokens", "new_tokens", "graded"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "" if v is None else str(v)


def _chart_png(title: str, labels: list[str], series: dict[str, list[float | None]]) -> bytes:
    """A grouped bar chart (one group per label, one bar per series) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) * max(1, len(series))), 3.2))
    width = 0.8 / max(1, len(series))
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + j * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _charts(runs: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, bytes]]:
    """(task, png) per top-level task: its metrics (not counts) for every run."""
    tasks = sorted({t for r in runs.values() for t in r if "/" not in t})
    out = []
    for t in tasks:
        metrics = sorted(
            {
                m
                for r in runs.values()
                for m, v in r.get(t, {}).items()
                if m not in COUNTS and isinstance(v, int | float)
            }
        )
        if t == "robustness":
            metrics = [m for m in metrics if m.endswith("drop")]
        if not metrics:
            continue
        series = {name: [r.get(t, {}).get(m) for m in metrics] for name, r in runs.items()}
        out.append((t, _chart_png(t, metrics, series)))
    return out


def _table_md(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    names = list(runs)
    base = names[0]
    head = "| task | metric | " + " | ".join(names)
    head += " | " + " | ".join(f"Δ {n}" for n in names[1:]) + " |" if len(names) > 1 else " |"
    lines = [head, "|" + "---|" * (2 + len(names) + max(0, len(names) - 1))]
    tasks = sorted({t for r in runs.values() for t in r})
    for t in tasks:
        metrics = sorted({m for r in runs.values() for m in r.get(t, {})})
        for m in metrics:
            vals = [runs[n].get(t, {}).get(m) for n in names]
            row = f"| {t} | {m} | " + " | ".join(_fmt(v) for v in vals)
            if len(names) > 1:
                b = runs[base].get(t, {}).get(m)
                deltas = [
                    (v - b) if isinstance(v, int | float) and isinstance(b, int | float) else None for v in vals[1:]
                ]
                row += " | " + " | ".join(
                    ("+" if (d or 0) >= 0 else "") + _fmt(d) if d is not None else "" for d in deltas
                )
            lines.append(row + " |")
    return "\n".join(lines) + "\n"


def _table_html(md_table: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md_table.strip().splitlines()]
    head, body = rows[0], rows[2:]
    h = "<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
    b = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table>{h}{b}</table>"


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}img{margin:8px}"
)


def _write(out: Path, stem: str, title: str, intro: str, runs: dict[str, dict[str, dict[str, float]]]) -> None:
    table = _table_md(runs)
    charts = _charts(runs)
    (out / "charts").mkdir(exist_ok=True)
    md = [f"# {title}\n", intro, "", table]
    imgs = []
    for t, png in charts:
        f = out / "charts" / f"{stem}_{t}.png"
        f.write_bytes(png)
        md.append(f"![{t}](charts/{f.name})")
        imgs.append(f'<img alt="{html.escape(t)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
        f"{_table_html(table)}{''.join(imgs)}</body></html>\n"
    )
    atomic_write_text(out / f"{stem}.html", page)


def write_reports(out: str | Path, report: dict[str, Any]) -> None:
    """report.md + report.html (+ charts/report_*.png) for one run."""
    out = Path(out)
    m = report.get("model", {})
    intro = (
        f"model: {report.get('model_name')} ({m.get('kind')}, hash {m.get('hash')}); "
        f"tasks: {', '.join(report['config']['tasks'])}; date {report.get('date')}"
    )
    _write(
        out,
        "report",
        f"llmkit eval: {report.get('model_name')}",
        intro,
        {report.get("model_name", "run"): report["results"]},
    )


def load_run(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise InputError(f"{path}: no results.json; expected a folder written by `llmkit eval --out`")
    return json.loads(f.read_text(encoding="utf-8"))


def compare(runs: list[str | Path], out: str | Path | None = None) -> str:
    """Side-by-side table of several runs (deltas against the first); with `out`, also compare.md/html/json."""
    if len(runs) < 1:
        raise InputError("llmkit eval compare needs at least one run folder")
    loaded: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        name = Path(r).name
        while name in loaded:
            name += "'"
        loaded[name] = load_run(r)["results"]
    table = _table_md(loaded)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write(out, "compare", "llmkit eval compare", f"runs: {', '.join(str(r) for r in runs)}", loaded)
        atomic_write_text(
            out / "compare.json", json.dumps({"runs": [str(r) for r in runs], "results": loaded}, indent=2)
        )
    return table
