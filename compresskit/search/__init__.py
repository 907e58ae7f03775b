"""`compresskit search`: explore a pipeline's compression knobs with Optuna and return the Pareto
front of accuracy against latency (and/or size), each point measured on its exported file.

Each trial is the pipeline with the knobs of `search.space` set (as overrides), run in a folder
of its own under <run folder>/search/trials/. A trial starts from a copy of the finished trial
whose stages agree with it the longest, so the stage cache reruns only what the knobs changed.
The study lives in Optuna's journal file in the search folder: a killed search resumes where it
stopped (trials that were running are run again with the same knobs, from their own folder).
Several workers, on one machine or many, share a study through `--storage` (an RDB URL, or a
journal file on a shared disk): that is Optuna's way to distribute, and the only one here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from compresskit.engine.loader import LoadedPipeline, apply_overrides, load_dict
from compresskit.errors import ConfigError, Problem, StageError

JOURNAL = "journal.log"

UNITS = {"ms": 1.0, "s": 1000.0, "b": 1.0, "bytes": 1.0, "kb": 1e3, "mb": 1e6}


def parse_budget(text: str) -> dict[str, Any]:
    """'latency <= 0.4x teacher on edge', 'latency <= 2 ms', 'size <= 500 kB'."""
    m = re.fullmatch(r"\s*(latency|size)\s*<=\s*([0-9]*\.?[0-9]+)\s*"
                     r"(x\s*teacher|x|ms|s|kb|mb|bytes|b)?\s*(?:on\s+([A-Za-z0-9_.-]+))?\s*",
                     text, re.IGNORECASE)
    if m is None:
        raise ConfigError(f"--budget '{text}' is not a budget; write e.g. 'latency <= 0.4x "
                          "teacher on cpu', 'latency <= 2 ms' or 'size <= 500 kB'")
    what, value, unit, target = m.group(1).lower(), float(m.group(2)), (m.group(3) or ""), \
        m.group(4)
    unit = unit.lower().replace(" ", "")
    relative = unit.startswith("x")
    if not relative:
        unit = unit or ("ms" if what == "latency" else "bytes")
        if (what == "latency") != (unit in ("ms", "s")):
            raise ConfigError(f"--budget '{text}': {unit} is not a unit of {what}")
        value *= UNITS[unit]
    return {"objective": what, "value": value, "relative": relative, "target": target,
            "text": text.strip()}


def _suggest(trial: Any, key: str, rng: Any) -> Any:
    if rng.choices is not None:
        return trial.suggest_categorical(key, rng.choices)
    if rng.is_int():
        return trial.suggest_int(key, int(rng.low), int(rng.high), step=int(rng.step or 1),
                                 log=rng.log)
    return trial.suggest_float(key, rng.low, rng.high, step=rng.step, log=rng.log)


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items() if k != "artifact"]


def _base(loaded: LoadedPipeline) -> dict[str, Any]:
    return {k: v for k, v in loaded.raw.items() if k != "search"}


def _with(loaded: LoadedPipeline, params: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(_base(loaded))
    problems = apply_overrides(data, _overrides(params))
    if problems:
        raise ConfigError(problems)
    return data


def check_space(loaded: LoadedPipeline) -> None:
    """Every knob is a pipeline key and every value of its range makes a valid pipeline."""
    search = loaded.config.search
    assert search is not None
    for key, rng in search.space.items():
        where = ("search", "space", key)
        if key == "artifact":
            if rng.choices is None:
                raise ConfigError(loaded.problem(where, "'artifact' takes choices: file names "
                                                 "in artifacts/, e.g. student.qat.int8.onnx"))
            continue
        values: list[Any] = rng.choices if rng.choices is not None else [rng.low, rng.high]
        for value in values:
            if rng.choices is None and rng.is_int():
                value = int(value)
            try:
                load_dict(_with(loaded, {key: value}), loaded.base_dir)
            except ConfigError as e:
                first = e.problems[0] if e.problems else None
                said = first.message if first else str(e)
                at = f" (at {first.key})" if first and first.key else ""
                raise ConfigError(loaded.problem(
                    where, f"search key '{key}' = {value!r} does not make a valid pipeline: "
                           f"{said}{at}")) from None


def _measures(report: dict[str, Any], artifact: str, batch_size: int) -> dict[str, Any]:
    """Per benchmark target: the trial's file and the FP32 teacher's latency, size, metric."""
    metric = report.get("metric", "accuracy")
    if artifact == "student.int8":
        students = [a for a in report["artifacts"] if a.get("model") == "student"
                    and a.get("format") == "onnx"]
        chosen = next((a for a in reversed(students) if a.get("precision") == "int8"),
                      next((a for a in students if a.get("precision") == "fp32"), None))
        if chosen is None:
            raise StageError("search", "the pipeline wrote no student ONNX file to measure; "
                             "it needs an export stage (and a benchmark stage)")
        artifact = Path(chosen["path"]).name
    out: dict[str, Any] = {"artifact": artifact}
    rows = [b for b in report["benchmarks"] if b["batch_size"] == batch_size]
    longest = max(((b.get("length") or 0) for b in rows), default=0)  # `lengths`: the longest
    for b in rows:
        if (b.get("length") or 0) != longest:
            continue
        row = out.setdefault(b["target"], {})
        name = Path(b["artifact"]).name
        values = {"accuracy": b.get(metric), "latency_ms": b["latency_ms"]["p50"],
                  "bytes": b.get("bytes") or b.get("file_bytes")}
        if name == artifact:
            row.update(values)
        if b.get("model") == "teacher" and b.get("precision") == "fp32":
            row["teacher"] = values
    return out


def _objectives(measures: dict[str, Any], search: Any) -> tuple[float, ...]:
    row = measures.get(search.target) or {}
    if "latency_ms" not in row:
        raise StageError("search", f"the benchmark stage measured no {measures['artifact']} "
                         f"on {search.target} at batch {search.batch_size}; add the target "
                         "and batch size to it")
    key = {"accuracy": "accuracy", "latency": "latency_ms", "size": "bytes"}
    return tuple(float(row[key[o]]) for o in search.objectives)


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _donor(study: Any, stages: list[Any], rest: Any) -> tuple[Path, int] | None:
    """The finished or failed trial whose stages agree with `stages` the longest (same
    everything else): its folder holds those stages, cached (a failed trial's stages before
    the one that failed are as good; the runner checks every stage's hash anyway)."""
    import optuna

    best: tuple[Path, int] | None = None
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=done):
        if t.user_attrs.get("rest") != rest or "run_dir" not in t.user_attrs:
            continue
        n = _common_prefix(t.user_attrs.get("stages", []), stages)
        folder = Path(t.user_attrs["run_dir"])
        if n and folder.is_dir() and (best is None or n > best[1]):
            best = (folder, n)
    return best


def run_search(pipeline: str | Path, trials: int, *, storage: str | None = None,
               budget: str | None = None, output_dir: str | Path | None = None,
               overrides: list[str] | tuple[str, ...] = (),
               say: Any = print) -> dict[str, Any]:
    """Run (or resume, or join) the search; write the front; return the summary."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("compresskit search needs Optuna: pip install 'compresskit[search]'"
                          ) from None
    from rich.console import Console

    from compresskit import api
    from compresskit.engine.loader import load_pipeline
    from compresskit.engine.lock import RunLock

    loaded = load_pipeline(pipeline, overrides)
    search = loaded.config.search
    if search is None:
        raise ConfigError(Problem(
            "the pipeline has no 'search:' section; add one with 'space' (pipeline keys and "
            "their ranges) and 'objectives' (see README, 'Search')", file=str(loaded.path)))
    check_space(loaded)
    wanted = parse_budget(budget) if budget else None
    run_dir = Path(output_dir) if output_dir else Path("runs") / loaded.config.name
    folder = run_dir / "search"
    folder.mkdir(parents=True, exist_ok=True)
    lock = None if storage else RunLock(folder)
    if lock:
        lock.acquire()
    try:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: our one line
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        if storage is None or "://" not in storage:  # a journal file: ours, or a shared one
            where: Any = JournalStorage(JournalFileBackend(str(storage or folder / JOURNAL)))
        else:  # an RDB URL (sqlite:///..., postgresql://..., mysql://...)
            where = storage
        study = optuna.create_study(
            study_name=loaded.config.name, storage=where, load_if_exists=True,
            directions=["maximize" if o == "accuracy" else "minimize"
                        for o in search.objectives],
            sampler=optuna.samplers.TPESampler(seed=loaded.config.seed + os.getpid() % 1000
                                               if storage else loaded.config.seed))
        state = optuna.trial.TrialState
        if lock:  # alone on this study: a trial still "running" was killed; run it again
            for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
                study._storage.set_trial_state_values(t._trial_id, state=state.FAIL)
                study.enqueue_trial(t.params, user_attrs={"resumed_from": t.number})
        quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115  # closed with the search
        rest = json.dumps({k: v for k, v in _base(loaded).items() if k != "stages"},
                          sort_keys=True, default=str)

        def objective(trial: Any) -> tuple[float, ...]:
            params = {k: _suggest(trial, k, r) for k, r in search.space.items()}
            trial_loaded = load_dict(_with(loaded, params), loaded.base_dir)
            stages = [s.model_dump(mode="json") for s in trial_loaded.config.stages]
            resumed = trial.user_attrs.get("resumed_from")
            here = folder / "trials" / f"{(resumed if resumed is not None else trial.number):04d}"
            donor = _donor(study, stages, rest) if not here.exists() else None
            if donor is not None:
                shutil.copytree(donor[0], here, ignore=shutil.ignore_patterns(".lock"))
            trial.set_user_attr("run_dir", str(here))
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            trial.set_user_attr("stages", stages)
            trial.set_user_attr("rest", rest)
            try:
                report = api.run(trial_loaded, output_dir=here, show_progress=False,
                                 console=quiet)
                measures = _measures(report, params.get("artifact", search.artifact),
                                     search.batch_size)
                values = _objectives(measures, search)
            except StageError as e:  # this trial's knobs failed a stage: the search goes on
                say(f"trial {trial.number} failed: {e} (its folder: {here})")
                raise
            trial.set_user_attr("measures", measures)
            reran = sum(s["status"] == "done" for s in report["stages"])
            trial.set_user_attr("stages_run", reran)
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in params.items())
            say(f"trial {trial.number}: {shown} -> "
                + ", ".join(f"{o} {v:.4g}" for o, v in zip(search.objectives, values,
                                                          strict=True))
                + f" ({measures['artifact']}; {reran} of {len(report['stages'])} stages run"
                + (f", the rest from trial folder {donor[0].name}" if donor else "") + ")")
            return values

        def finished() -> int:
            return len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))

        if finished() < trials:
            stop = optuna.study.MaxTrialsCallback(trials, states=(state.COMPLETE, state.RUNNING))
            study.optimize(objective, n_trials=2 * (trials - finished()) + 2, callbacks=[stop],
                           catch=(StageError,))
        quiet.file.close()
        return summarize(study, loaded, folder, wanted, say)
    finally:
        if lock:
            lock.release()


def summarize(study: Any, loaded: LoadedPipeline, folder: Path, wanted: dict[str, Any] | None,
              say: Any) -> dict[str, Any]:
    """The Pareto front as a table, a plot (search/report.html), ready-to-run pipeline files
    (search/pareto/) and search/pareto.json; and the budget's pick."""
    import optuna
    import yaml

    search = loaded.config.search
    assert search is not None
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise StageError("search", "no trial finished; the trial folders under "
                         f"{folder / 'trials'} say why")
    front_ids = {t.number for t in study.best_trials}
    points = []
    for t in sorted(done, key=lambda t: t.number):
        row = t.user_attrs["measures"][search.target]
        points.append({"trial": t.number, "params": t.params, "pareto": t.number in front_ids,
                       "artifact": t.user_attrs["measures"]["artifact"],
                       "accuracy": row["accuracy"], "latency_ms": row["latency_ms"],
                       "bytes": row["bytes"], "teacher": row.get("teacher"),
                       "measures": t.user_attrs["measures"],
                       "stages_run": t.user_attrs.get("stages_run"),
                       "worker": t.user_attrs.get("worker"),
                       "run_dir": t.user_attrs["run_dir"]})
    pareto_dir = folder / "pareto"
    shutil.rmtree(pareto_dir, ignore_errors=True)
    pareto_dir.mkdir()
    for p in points:
        if not p["pareto"]:
            continue
        data = _with(loaded, p["params"])
        header = (f"# A Pareto point of `compresskit search {loaded.path}`: trial {p['trial']}, "
                  f"{p['artifact']}: accuracy {p['accuracy']:.4f}, {p['latency_ms']:.4g} ms "
                  f"(batch {search.batch_size}, {search.target}), {p['bytes']:,} bytes.\n"
                  f"# Relative paths are the original pipeline's ({loaded.base_dir}): run it "
                  "from there.\n")
        path = pareto_dir / f"trial-{p['trial']:04d}.yaml"
        path.write_text(header + yaml.safe_dump(data, sort_keys=False))
        p["pipeline"] = str(path)
    pick = _pick(points, wanted, search) if wanted else None
    summary = {"trials": len(done), "objectives": search.objectives, "target": search.target,
               "points": points, "front": [p for p in points if p["pareto"]], "budget": pick}
    (folder / "pareto.json").write_text(json.dumps(summary, indent=1, default=str))
    (folder / "report.html").write_text(_html(summary, loaded))
    return summary


def _pick(points: list[dict[str, Any]], wanted: dict[str, Any], search: Any) -> dict[str, Any]:
    """The most accurate point within the budget; else the one that came closest."""
    target = wanted["target"] or search.target

    def cost(p: dict[str, Any]) -> float | None:
        row = p["measures"].get(target) or {}
        key = "latency_ms" if wanted["objective"] == "latency" else "bytes"
        if key not in row:
            return None
        if wanted["relative"]:
            teacher = row.get("teacher") or {}
            return row[key] / teacher[key] if teacher.get(key) else None
        return float(row[key])

    scored: list[tuple[dict[str, Any], float]] = [
        (p, c) for p in points for c in [cost(p)] if c is not None]
    if not scored:
        return {"met": False, "text": wanted["text"],
                "why": f"no trial was measured on {target} (add it to the benchmark stage)"}
    within = [(p, c) for p, c in scored if c <= wanted["value"]]
    if within:
        p, c = max(within, key=lambda pc: (pc[0]["accuracy"], -pc[1]))
        return {"met": True, "text": wanted["text"], "trial": p["trial"], "cost": c,
                "accuracy": p["accuracy"], "pipeline": p.get("pipeline"), "params": p["params"]}
    p, c = min(scored, key=lambda pc: pc[1])
    return {"met": False, "text": wanted["text"], "trial": p["trial"], "cost": c,
            "over_by": c / wanted["value"] - 1, "accuracy": p["accuracy"],
            "params": p["params"]}


def _html(summary: dict[str, Any], loaded: LoadedPipeline) -> str:
    import html as escape

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compresskit.report.html import STYLE, _png

    points = summary["points"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rest = [p for p in points if not p["pareto"]]
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
    ax.scatter([p["latency_ms"] for p in rest], [p["accuracy"] for p in rest], c="#999",
               label="trials")
    ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], "o-",
            c="#c0392b", label="Pareto front")
    for p in front:
        ax.annotate(str(p["trial"]), (p["latency_ms"], p["accuracy"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"latency p50, ms (batch {loaded.config.search.batch_size}, "  # type: ignore[union-attr]
                  f"{summary['target']})")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    image = _png(fig)
    plt.close(fig)
    keys = list(dict.fromkeys(k for p in points for k in p["params"]))
    head = "".join(f"<th>{escape.escape(h)}</th>" for h in
                   ["trial", *keys, "file", "accuracy", "latency ms", "bytes", "pipeline"])
    rows = []
    for p in front:
        cells = [str(p["trial"]), *(str(p["params"].get(k, "")) for k in keys), p["artifact"],
                 f"{p['accuracy']:.4f}", f"{p['latency_ms']:.4g}", f"{p['bytes']:,}",
                 Path(p.get("pipeline", "")).name]
        rows.append("<tr>" + "".join(f"<td>{escape.escape(c)}</td>" for c in cells) + "</tr>")
    pick = summary["budget"]
    said = ""
    if pick:
        said = (f"<p><b>{escape.escape(pick['text'])}</b>: "
                + (f"trial {pick['trial']}, accuracy {pick['accuracy']:.4f}" if pick["met"]
                   else escape.escape(_unmet(pick))) + "</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>search: "
            f"{escape.escape(loaded.config.name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Search: {escape.escape(loaded.config.name)}</h1>"
            f"<p>{summary['trials']} trials; objectives {', '.join(summary['objectives'])}; "
            f"{len(front)} points on the Pareto front.</p>{said}"
            f"<img src='{image}' alt='accuracy against latency'>"
            f"<h2>Pareto front</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
            "</body></html>")


def _unmet(pick: dict[str, Any]) -> str:
    if "trial" not in pick:
        return f"no point can be judged: {pick['why']}"
    return (f"no trial meets it; the closest, trial {pick['trial']}, is "
            f"{pick['over_by']:.0%} over (accuracy {pick['accuracy']:.4f})")
