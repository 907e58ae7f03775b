"""A run's report: report.json (the contract other tools read, `build`), report.md (`text`) and
report.html (`html`), written together by `write`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from compresskit import __version__
from compresskit.engine.artifacts import write_json, write_text
from compresskit.measure import quality
from compresskit.report.html import html, pareto
from compresskit.report.text import device_line, headline, markdown, sections, tied, verdicts

__all__ = ["build", "device_line", "headline", "html", "markdown", "pareto", "sections", "tied",
           "verdicts", "write"]


def build(name: str, records: list[Any], seconds: float, pipeline: str,
          task: str = "classify") -> dict[str, Any]:
    stages, artifacts, benchmarks = [], [], []
    for r in records:
        m = r.manifest
        budget = r.time_budget
        took = m.get("seconds", r.seconds)  # what computing the stage took, cached or not
        stages.append({
            "index": r.index, "type": r.type, "name": r.name, "status": r.status,
            "seconds": r.seconds,
            "computed_seconds": m.get("seconds"),
            "time_budget": budget,
            "over_budget": None if budget is None else bool(took > budget),
            "params": m.get("params"), "metrics": m.get("metrics", {}),
        })
        artifacts += m.get("artifacts", [])
        benchmarks += m.get("benchmarks", [])
    return {
        "name": name, "compresskit_version": __version__, "seconds": seconds,
        "pipeline": pipeline, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task, "metric": quality.primary(task),
        "stages": stages, "artifacts": artifacts, "benchmarks": benchmarks,
    }


def write(run_dir: Path, report: dict[str, Any]) -> None:
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", markdown(report))
    write_text(run_dir / "report.html", html(report))
