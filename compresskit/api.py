"""Run and validate pipelines from Python: what the CLI calls, and what a search loop calls with
parameters built in code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from compresskit import report as report_mod
from compresskit.backends import quiet_libraries
from compresskit.engine.artifacts import write_text
from compresskit.engine.loader import LoadedPipeline, load_dict, load_pipeline
from compresskit.engine.lock import RunLock


def load(pipeline: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
         base_dir: str | Path = ".") -> LoadedPipeline:
    if isinstance(pipeline, dict):
        return load_dict(pipeline, base_dir=base_dir, overrides=overrides)
    return load_pipeline(pipeline, overrides)


def validate(pipeline: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
             deep: bool = True, base_dir: str | Path = ".") -> LoadedPipeline:
    """Raise ConfigError listing every problem; with deep=True also build the models and run
    one dry forward pass (imports torch). `base_dir` resolves a dict pipeline's sources."""
    loaded = load(pipeline, overrides, base_dir)
    if deep:
        from compresskit.engine.checks import deep_check

        deep_check(loaded)
    return loaded


def run(pipeline: str | Path | dict[str, Any] | LoadedPipeline,
        overrides: list[str] | tuple[str, ...] = (), *, output_dir: str | Path | None = None,
        force: bool = False, base_dir: str | Path = ".", console: Any = None,
        show_progress: bool = True) -> dict[str, Any]:
    """Run every stage not already finished; return the report (also written to the run folder).

    Raises ConfigError for bad input and StageError when a stage fails; finished stages are kept
    either way, and the report written so far says which stage failed.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from compresskit.engine import distributed as dist
    from compresskit.engine.runner import Runner

    quiet_libraries()
    loaded = (pipeline if isinstance(pipeline, LoadedPipeline)
              else load(pipeline, overrides, base_dir))
    cfg = loaded.config
    run_dir = Path(output_dir) if output_dir else Path("runs") / cfg.name
    main = dist.is_main()
    console = console if main and console is not None else Console(stderr=True, quiet=not main)
    show_progress = show_progress and main
    progress = Progress(TextColumn("  {task.description}"), BarColumn(), TextColumn(
        "epoch {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        disable=not show_progress, transient=False)
    runner = Runner(loaded, run_dir, force=force, console=console,
                    progress=progress if main else None)
    start = time.perf_counter()
    if not main:  # torchrun's other ranks train; rank 0 alone owns the run folder
        try:
            runner.run()
        finally:
            dist.shutdown()
        return {"run_dir": str(run_dir), "rank": dist.rank()}
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        try:
            with progress:
                runner.run()
        finally:
            dist.shutdown()
            if runner.records:
                report = report_mod.build(cfg.name, runner.records, time.perf_counter() - start,
                                          str(loaded.path), cfg.task)
                write_text(run_dir / "resolved.yaml",
                           yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
                report_mod.write(run_dir, report)
    report["run_dir"] = str(run_dir)
    return report
