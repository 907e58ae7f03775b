"""The command line: a thin typer layer over compresskit.api (no logic, no torch at import)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from compresskit import __version__
from compresskit.errors import EXIT_BAD_INPUT, EXIT_STAGE_FAILED, ConfigError, StageError

app = typer.Typer(
    name="compresskit", no_args_is_help=True, add_completion=False,
    help="Distil, prune, factorize and quantize a PyTorch model into a small ONNX student, "
         "measured on the device you ship to.")
WIDTH = 100
"""No terminal line of a run wider than this: stage logs and tables wrap (a narrower terminal
wraps at its own width). Errors stay one line each (soft_wrap), to be read and grepped whole."""
err = Console(stderr=True, highlight=False)
err.width = min(err.width, WIDTH) if err.is_terminal else WIDTH
out = Console(highlight=False, soft_wrap=True)


def _fail_config(e: ConfigError) -> None:
    n = len(e.problems)
    err.print(f"[red]error:[/red] {n} problem{'s' if n > 1 else ''} in the input:", markup=True,
              soft_wrap=True)
    for p in e.problems:
        err.print(f"  {p}", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _version(value: bool) -> None:
    if value:
        out.print(f"compresskit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    overrides: list[str] = typer.Argument(
        None, help="Overrides as key.path=value, e.g. stages.1.epochs=5 seed=1."),
    output_dir: Path = typer.Option(None, "--output-dir", "-o",
                                    help="Run folder (default: runs/<name>)."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage, ignoring the cache."),
    nproc: int = typer.Option(
        None, "--nproc", min=1,
        help="Train with N processes on this machine (launches torchrun for you)."),
    verbose: bool = typer.Option(
        False, "--verbose", help="Let torch, NNCF and torchao print their own logs and "
                                 "progress bars."),
) -> None:
    """Run a pipeline; finished stages are cached and skipped on the next run."""
    import os
    import signal

    from compresskit import api
    from compresskit.engine import distributed
    if verbose:  # read by every process, torchrun's included
        os.environ["COMPRESSKIT_VERBOSE"] = "1"
    if nproc and nproc > 1 and not distributed.launched():
        raise typer.Exit(_torchrun(nproc, pipeline, overrides or [], output_dir, force))
    main = distributed.is_main()

    got: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        report = api.run(pipeline, overrides or [], output_dir=output_dir, force=force,
                         console=err)
    except ConfigError as e:
        if not main:  # every rank finds the same problem; rank 0 says it once
            raise typer.Exit(EXIT_BAD_INPUT) from None
        _fail_config(e)
    except StageError as e:
        if main:
            from rich.markup import escape

            err.print(f"[red]error:[/red] {escape(str(e))}", markup=True, soft_wrap=True)
            err.print("Finished stages are kept; fix the cause and run the same command to "
                      "resume.")
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    except KeyboardInterrupt:
        if main:
            err.print("\ninterrupted: finished stages and training checkpoints are kept; run "
                      "the same command to resume.")
        raise typer.Exit(128 + (got[0] if got else signal.SIGINT)) from None
    if main:
        _summary(report)


def _torchrun(nproc: int, pipeline: Path, overrides: list[str], output_dir: Path | None,
              force: bool) -> int:
    """`--nproc N`: the same command under torchrun, one machine, N processes."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "compresskit", "run", str(pipeline), *overrides]
    if output_dir:
        cmd += ["--output-dir", str(output_dir)]
    if force:
        cmd.append("--force")
    err.print(f"launching: {' '.join(cmd[1:])}", markup=False, soft_wrap=True)
    return subprocess.call(cmd)


def _summary(report: dict[str, Any]) -> None:
    """What a run leaves in the terminal: the stages, one comparison per target, the verdict.
    At most 100 columns; the findings and every figure are in report.md."""
    from compresskit.measure.quality import LABELS, METRICS
    from compresskit.ops.latency import fmt_ms
    from compresskit.report import verdicts
    from compresskit.report.findings import grouped_warnings

    narrow = Console(highlight=False,
                     width=min(out.width, WIDTH) if out.is_terminal else WIDTH)
    metrics = METRICS[report.get("task", "classify")]
    t = Table(title=f"{report['name']}: {report['seconds']:.1f} s", title_justify="left")
    for col in ("stage", "status", "seconds", "params", *(LABELS[m] for m in metrics)):
        t.add_column(col, justify="left" if col in ("stage", "status") else "right")
    for s in report["stages"]:
        values = [s["metrics"].get(m) for m in metrics]
        t.add_row(f"{s['index']:02d}-{s['type']}", s["status"], f"{s['seconds']:.1f}",
                  f"{s['params']:,}" if s["params"] else "-",
                  *(f"{v:.4f}" if isinstance(v, float) else "-" for v in values))
    narrow.print(t)
    metric = metrics[0]
    lm = [b for b in report["benchmarks"] if b.get("kind") == "lm"]
    if lm:
        c = Table(title="cpu: decoders, 1 thread", title_justify="left")
        for col in ("file", "tokens/s", "x teacher", "TTFT ms", "perplexity", "agreement",
                    "size"):
            c.add_column(col, justify="left" if col == "file" else "right", no_wrap=True)
        for b in lm:
            c.add_row(f"{b['model']} {b['precision']}", f"{b['decode_tokens_per_s']:.1f}",
                      f"{b.get('speedup_vs_teacher', float('nan')):.2f}x",
                      f"{b['ttft_ms']:.0f}", f"{b['perplexity']:.2f}",
                      f"{b['agreement']:.3f}" if b["agreement"] is not None else "-",
                      _size(b["bytes"]))
        narrow.print(c)
    for target in dict.fromkeys(b["target"] for b in report["benchmarks"]
                                if b.get("kind") != "lm"):
        rows = [b for b in report["benchmarks"] if b["target"] == target]
        bs = min(b["batch_size"] for b in rows)
        longest = max((b.get("length") or 0) for b in rows)
        rows = [b for b in rows if b["batch_size"] == bs and (b.get("length") or 0) == longest]
        ref = next((b for b in rows if b.get("model") == "teacher"
                    and b.get("precision") == "fp32"), rows[0])
        at = f"batch {bs}" + (f", length {longest}" if longest else "")
        c = Table(title=f"{target}, {at}: against {Path(ref['artifact']).name}",
                  title_justify="left")
        change = "points" if metric == "accuracy" else "change"
        for col in ("file", "p50", "speed-up", f"{LABELS[metric]}", change, "size"):
            c.add_column(col, justify="left" if col == "file" else "right", no_wrap=True)
        for b in rows:
            delta = b[metric] - ref[metric]
            c.add_row(Path(b["artifact"]).name, fmt_ms(b["latency_ms"]["p50"]),
                      f"{ref['latency_ms']['p50'] / b['latency_ms']['p50']:.2f}x",
                      f"{b[metric]:.4f}",
                      f"{100 * delta:+.1f}" if metric == "accuracy" else f"{delta:+.4f}",
                      _size(b.get("bytes") or b.get("file_bytes")))
        narrow.print(c)
    for line in verdicts(report):
        narrow.print(f"[bold]{line}[/bold]")
    flagged = grouped_warnings(report)
    if flagged:
        narrow.print(f"[yellow]{len(flagged)} warning{'s' if len(flagged) > 1 else ''}[/yellow] "
                     "(each once; details in report.md):")
        for line in flagged:
            narrow.print(f"  {line}", markup=False)
    out.print(f"report: {Path(report['run_dir']) / 'report.md'} (and report.html)")


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


@app.command()
def search(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file with a 'search:' section."),
    overrides: list[str] = typer.Argument(
        None, help="Overrides as key.path=value, applied before the search's own."),
    trials: int = typer.Option(20, "--trials", min=1, help="Trials to finish in all."),
    storage: str = typer.Option(
        None, "--storage",
        help="An Optuna storage shared by several workers (an RDB URL such as "
             "sqlite:///study.db or postgresql://..., or a journal file on a shared disk); "
             "default: a journal in <run folder>/search."),
    budget: str = typer.Option(
        None, "--budget",
        help="Pick the most accurate point under a budget, e.g. 'latency <= 0.4x teacher on "
             "cpu', 'latency <= 2 ms', 'size <= 500 kB'."),
    output_dir: Path = typer.Option(None, "--output-dir", "-o",
                                    help="Run folder (default: runs/<name>)."),
) -> None:
    """Explore the pipeline's compression knobs; write the Pareto front (search/report.html
    and a ready-to-run pipeline file per point). Killed and rerun, it resumes."""
    from compresskit.search import run_search

    try:
        summary = run_search(pipeline, trials, storage=storage, budget=budget,
                             output_dir=output_dir, overrides=overrides or [],
                             say=lambda line: err.print(line, markup=False, soft_wrap=True))
    except ConfigError as e:
        _fail_config(e)
    except StageError as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    _search_summary(summary)
    pick = summary["budget"]
    if pick is not None and not pick["met"]:
        raise typer.Exit(EXIT_STAGE_FAILED)


def _search_summary(summary: dict[str, Any]) -> None:
    from compresskit.search import _unmet

    front = summary["front"]
    t = Table(title=f"Pareto front: {len(front)} of {summary['trials']} trials "
                    f"({summary['target']})", title_justify="left")
    keys = list(dict.fromkeys(k for p in front for k in p["params"]))
    for col in ("trial", *keys, "accuracy", "latency", "size"):
        t.add_column(col, justify="left" if col == "trial" else "right")
    for p in sorted(front, key=lambda p: p["latency_ms"]):
        t.add_row(str(p["trial"]), *(f"{v:.4g}" if isinstance(v, float) else str(v)
                                     for v in (p["params"].get(k, "") for k in keys)),
                  f"{p['accuracy']:.4f}", f"{p['latency_ms']:.4g} ms", _size(p["bytes"]))
    Console(highlight=False, width=min(out.width, WIDTH) if out.is_terminal else WIDTH).print(t)
    pick = summary["budget"]
    if pick is not None:
        out.print(f"{pick['text']}: " + (
            f"trial {pick['trial']}, accuracy {pick['accuracy']:.4f}: {pick['pipeline']}"
            if pick["met"] else _unmet(pick)), markup=False, soft_wrap=True)
    if front:
        folder = Path(front[0]["pipeline"]).parent.parent
        out.print(f"report: {folder / 'report.html'}; pipelines: {folder / 'pareto'}",
                  markup=False, soft_wrap=True)


@app.command()
def validate(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML file."),
    overrides: list[str] = typer.Argument(None, help="Overrides as key.path=value."),
    schema_only: bool = typer.Option(
        False, "--schema-only", help="Check the file against the schema only (no torch, instant)."),
) -> None:
    """Check a pipeline file: schema, stage order, sources, checkpoints, input shape."""
    from compresskit import api
    try:
        loaded = api.validate(pipeline, overrides or [], deep=not schema_only)
    except ConfigError as e:
        _fail_config(e)
    stages = " -> ".join(s.type for s in loaded.config.stages)
    out.print(f"{pipeline}: ok ({stages})")


def _bad_input(message: str) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def bench(
    models: list[Path] = typer.Argument(
        ..., help="ONNX files (any, not only compresskit's); several are timed interleaved "
                  "and compared with the first."),
    target: list[str] = typer.Option(["cpu"], "--target", "-t",
                                     help="Target profile (repeatable); see `compresskit ls`."),
    batch_size: list[int] = typer.Option([1], "--batch-size", "-b",
                                         help="Batch size (repeatable)."),
    threads: int = typer.Option(0, "--threads", help="Intra-op threads (0: the target's)."),
    warmup: int = typer.Option(20, "--warmup", help="Untimed runs first."),
    runs: int = typer.Option(200, "--runs", help="Timed rounds."),
    seconds: float = typer.Option(0.0, "--seconds",
                                  help="Time for this long instead of --runs (0: off)."),
    input_shape: list[str] = typer.Option(
        [], "--input-shape",
        help="Shape without the batch for inputs with dynamic dimensions: 3,224,224 (the only "
             "input) or NAME=3,224,224 (repeatable)."),
    memory: bool = typer.Option(True, "--memory/--no-memory",
                                help="Peak RSS per file in a fresh process."),
    json_file: Path = typer.Option(None, "--json", help="Also write the rows to this file."),
    targets_file: Path = typer.Option(
        None, "--targets-file",
        help="YAML with a 'targets:' mapping (as in a pipeline file) defining targets of your "
             "own, e.g. a device over ssh."),
) -> None:
    """Time ONNX files with onnxruntime on a target: cold start, p50/p90/p95/p99, throughput,
    peak memory. A target defined with ssh: or command: is measured on that device."""
    from compresskit.measure import bench as bench_mod
    from compresskit.measure.targets import TARGETS, resolve
    from compresskit.registry import did_you_mean

    if any(b < 1 for b in batch_size):
        _bad_input(f"--batch-size must be at least 1, got {min(batch_size)}")
    if runs < 1 or warmup < 0 or threads < 0 or seconds < 0:
        _bad_input("--runs must be at least 1, and --warmup, --threads, --seconds not negative")
    defined: dict[str, Any] = {}
    if targets_file is not None:
        try:
            defined = bench_mod.load_targets(targets_file)
        except bench_mod.BenchInputError as e:
            _bad_input(str(e))
    known = [*defined, *(t for t in TARGETS if t not in defined)]
    for name in target:
        if name not in known:
            _bad_input(f"unknown target '{name}'{did_you_mean(name, known)}; known: "
                       f"{', '.join(known)}" + ("" if defined else
                                                "; define your own with --targets-file"))
    try:
        shapes = bench_mod.parse_shapes(input_shape)
    except ValueError as e:
        _bad_input(str(e))
    settings = bench_mod.Settings(batch_sizes=tuple(dict.fromkeys(batch_size)),
                                  threads=threads or None, warmup=warmup, runs=runs,
                                  seconds=seconds or None, memory=memory)
    failure = None
    try:
        rows = bench_mod.run_files(models, [resolve(t, defined) for t in target], settings,
                                   shapes)
    except bench_mod.BenchInputError as e:
        _bad_input(str(e))
    except bench_mod.DeviceError as e:  # keep what the other targets measured
        rows, failure = e.rows, str(e)
    if rows:
        out.print(bench_mod.table(rows))
        for device in {json.dumps(r["device"], sort_keys=True): r["device"]
                       for r in rows if r.get("device")}.values():
            out.print(bench_mod.describe_device(device))
    if json_file is not None and rows:
        json_file.write_text(json.dumps({"compresskit_version": __version__,
                                         "benchmarks": rows}, indent=2) + "\n")
        out.print(f"wrote {json_file}")
    if failure is not None:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(failure)}", markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_STAGE_FAILED)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder holding report.json.")) -> None:
    """Rebuild report.md and report.html of a run from its report.json."""
    from compresskit import report as report_mod
    from compresskit.engine.artifacts import read_json

    data = read_json(run_dir / "report.json")
    if not isinstance(data, dict) or "stages" not in data:
        _bad_input(f"{run_dir}: no readable report.json there; give the folder a "
                   "`compresskit run` wrote (runs/<name> by default)")
    report_mod.write(run_dir, data)  # type: ignore[arg-type]
    out.print(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.html'}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files (for editor completion and checks)."""
    from compresskit.config import PipelineConfig

    sys.stdout.write(json.dumps(PipelineConfig.model_json_schema(), indent=2) + "\n")


@app.command(name="ls")
def list_things(what: str = typer.Argument(
        "", help="Only one list: stages, data or targets.")) -> None:
    """List stage types, built-in data sources and benchmark targets."""
    from compresskit.data.sources import DATASETS
    from compresskit.measure.targets import TARGETS
    from compresskit.stages import STAGES

    def first_sentence(doc: str | None) -> str:
        text = " ".join((doc or "").split())
        return text.split(". ")[0].split(": ")[0].rstrip(".") + "."

    lists = {
        "stages": [(k, first_sentence(v.config.__doc__)) for k, v in STAGES.items()],
        "data sources": [(k, first_sentence(f.__doc__)) for k, f in DATASETS.items()],
        "targets": [(k, t.description) for k, t in TARGETS.items()],
    }
    if what:
        picked = [k for k in lists if k.startswith(what.lower())]
        if not picked:
            _bad_input(f"nothing to list called '{what}'; try stages, data or targets")
        lists = {k: lists[k] for k in picked}
    for title, items in lists.items():
        t = Table(title=title, title_justify="left", show_header=False)
        t.add_column("name", style="bold")
        t.add_column("description")
        for name, doc in items:
            t.add_row(name, doc)
        out.print(t)


def main() -> None:
    app()
