"""report.html: the report's tables and plots in one self-contained file (styles inline, plots
as embedded PNG), so it opens anywhere without a network."""

from __future__ import annotations

import base64
import html as escape
import io
import re
from pathlib import Path
from typing import Any

from compresskit.report.text import findings, sections, verdicts

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
code { font-size: 12px; } .verdict li { font-weight: 600; } img { max-width: 100%; }
"""

CHECK = """
<script>
// For tests in a headless browser: how many plots decoded, how many did not.
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-images-loaded',
    imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
  document.body.setAttribute('data-images-broken',
    imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length);
});
</script>
"""


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _cell(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escape.escape(text))


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy
    (higher), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, data URI) of each plot: accuracy against latency per target with the Pareto
    front, and the size of the model after each stage."""
    if report.get("task") == "causal-lm":
        from compresskit.report import lm

        fig = lm.plot(report)
        return [] if fig is None else [
            ("Decode tokens/s (1 thread) against perplexity; the dashed line joins the files "
             "no other beats on both", _png(fig))]
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from compresskit.measure import quality
    out = []
    metric = str(report.get("metric", "accuracy"))
    label = quality.LABELS.get(metric, metric)
    for target in dict.fromkeys(b["target"] for b in report["benchmarks"]):
        rows = [b for b in report["benchmarks"] if b["target"] == target]
        bs = min(b["batch_size"] for b in rows)
        longest = max((b.get("length") or 0) for b in rows)
        rows = [b for b in rows if b["batch_size"] == bs and (b.get("length") or 0) == longest]
        pts = [(b["latency_ms"]["p50"], b[metric]) for b in rows]
        front = pareto(pts)
        fig, ax = plt.subplots(figsize=(8.0, 4.2))
        # Every file in the legend, each with its own marker; only the few on the Pareto
        # front are labelled on the plot, so labels do not pile up on each other.
        for i, (b, (x, y)) in enumerate(zip(rows, pts, strict=True)):
            ax.scatter([x], [y], marker=MARKERS[i % len(MARKERS)], s=60, zorder=3,
                       label=Path(b["artifact"]).name.removesuffix(".onnx"))
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post",
                color="#d62728", linewidth=2.5, alpha=0.6, label="Pareto front", zorder=2)
        # Two labels at most, far apart: the fastest file and the most accurate one.
        for i, align in dict.fromkeys([(front[0], "left"), (front[-1], "right")]):
            ax.annotate(Path(rows[i]["artifact"]).name.removesuffix(".onnx"), pts[i],
                        fontsize=8, ha=align, xytext=(8 if align == "left" else -8, -14),
                        textcoords="offset points")
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        values = [p[1] for p in pts]
        if 0.0 <= min(values) and max(values) <= 1.0:  # a share: no zoom that turns a point
            ax.set_ylim(max(0.0, min(values) - 0.1), 1.0)  # into a cliff
        ax.set_xlabel(f"p50 latency, ms (batch {bs}, log scale)")
        ax.set_ylabel(label)
        ax.set_title(f"{target}: {label} against latency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        out.append((f"Accuracy against latency on {target}, batch {bs}; the red line joins "
                    "the files no other file beats on both.", _png(fig)))
        plt.close(fig)
    sized = [s for s in report["stages"] if s.get("params")]
    files = [a for a in report["artifacts"] if a.get("format") == "onnx"]
    if sized or files:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        names = [f"{s['index']:02d}-{s['type']}" for s in sized]
        axes[0].bar(names, [s["params"] for s in sized], color="#2ca02c")
        axes[0].set_yscale("log")
        axes[0].set_title("parameters after each stage")
        axes[0].tick_params(axis="x", rotation=45)
        axes[1].bar([Path(a["path"]).name.removesuffix(".onnx") for a in files],
                    [a["bytes"] / 1024 for a in files], color="#9467bd")
        axes[1].set_yscale("log")
        axes[1].set_title("ONNX file size, KiB")
        axes[1].tick_params(axis="x", rotation=45)
        fig.tight_layout()
        out.append(("Size per stage (parameters) and per exported file.", _png(fig)))
        plt.close(fig)
    return out


def html(report: dict[str, Any]) -> str:
    title = f"compresskit report: {report['name']}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{escape.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{escape.escape(title)}</h1>",
             f"<p>compresskit {escape.escape(report['compresskit_version'])}, pipeline "
             f"<code>{escape.escape(report['pipeline'])}</code>, "
             f"{escape.escape(report['created'])}.</p>"]
    ship = verdicts(report)
    if ship:
        parts.append("<h2>Verdict</h2><ul class='verdict'>"
                     + "".join(f"<li>{_cell(v)}</li>" for v in ship) + "</ul>")
    found, appendix = findings(report)
    if found:
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{_cell(f)}</li>" for f in found)
                     + "</ul>")
    for caption, uri in plots(report):
        parts.append(f"<figure><img src='{uri}' alt='{escape.escape(caption)}'>"
                     f"<figcaption>{escape.escape(caption)}</figcaption></figure>")
    for sec in sections(report):
        parts.append(f"<h2>{escape.escape(sec.title)}</h2><table><thead><tr>"
                     + "".join(f"<th>{escape.escape(h)}</th>" for h in sec.header)
                     + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
                               for row in sec.rows) + "</tbody></table>")
        parts += [f"<p>{_cell(n)}</p>" for n in sec.notes]
    if appendix:
        parts.append("<h2>Appendix: every comparison</h2><ul>"
                     + "".join(f"<li>{_cell(f)}</li>" for f in appendix) + "</ul>")
    parts.append(CHECK + "</body></html>")
    return "\n".join(parts)
