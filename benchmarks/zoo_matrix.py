"""The compatibility matrix: every zoo architecture (tests/zoo/archs.py: torchvision, timm,
Hugging Face transformers, torch's own) through distill -> prune -> lowrank -> qat -> export ->
ptq -> benchmark, on tiny data (320 training samples), a few distillation epochs and one epoch
of recovery and QAT: a compatibility run, not a training run.

Writes a markdown table (architecture x stage: done, or what failed and why; INT8 coverage,
FP32 and INT8 accuracy, INT8/FP32 latency) and a JSON file of the same rows.

Run: python benchmarks/zoo_matrix.py [--more] [--only NAME ...] [--out runs/zoo] [--epochs 3]
         [--attention-epochs N] [--train-samples 320] [--test-samples 160] [--max-drop P]
The defaults are the compatibility run (tests/e2e/test_zoo_matrix.py); the README's accuracy
columns come from `--epochs 8 --attention-epochs 16 --train-samples 1000 --test-samples 360
--max-drop 1`, where the students learn enough for "INT8 within a point of FP32" to mean
something.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "tests" / "zoo"
STAGES = ("distill", "prune", "lowrank", "qat", "export", "ptq", "benchmark")
TEACHERS = {"image": ("ImageTeacher", {"source": "archs.py:digit_images"},
                      {"shape": [3, 32, 32]}),
            "text": ("TokenTeacher", {"source": "archs.py:digit_tokens"},
                     [{"name": "input_ids", "shape": [64], "dtype": "int64"},
                      {"name": "attention_mask", "shape": [64], "dtype": "int64"}])}


def archs() -> Any:
    """tests/zoo/archs.py, loaded by path: putting tests/zoo on sys.path would let its
    models.py shadow the repo's models/ package."""
    import importlib.util

    if "compresskit_zoo_archs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("compresskit_zoo_archs", ZOO / "archs.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["compresskit_zoo_archs"]


def entry(name: str) -> tuple[str, str, Any]:
    """(family, task, builder) of a zoo architecture, first 25 or extended."""
    return {**archs().ARCHS, **archs().MORE}[name]  # type: ignore[no-any-return]


STAGE_BUDGET = 180.0
"""Seconds any stage may take on any zoo model ("a few minutes"), reported against."""


def _data(task: str, samples: tuple[int, int]) -> dict[str, Any]:
    return {**TEACHERS[task][1], "batch_size": 32,
            "kwargs": {"n_train": samples[0], "n_test": samples[1]}}


def _pipeline(name: str, task: str, teacher: Path, epochs: int,
              samples: tuple[int, int], max_drop: float | None = None) -> dict[str, Any]:
    cls, _, inputs = TEACHERS[task]
    student: dict[str, Any] = {"source": "archs.py:build", "kwargs": {"name": name}}
    if entry(name)[0] == "transformers":
        student["output"] = {"key": "logits"}
    fast = {"latency_runs": 10}
    budget = {} if max_drop is None else {"max_drop": max_drop}
    stages: list[dict[str, Any]] = [
        {"type": "distill", "epochs": epochs, "lr": 0.003},
        {"type": "prune", "ratio": 0.25, "recover": 1, "lr": 0.001, "trace_seconds": 60, **fast},
        {"type": "lowrank", "rank_ratio": 0.5, "recover": 1, "lr": 0.001, "min_reduction": 0.1,
         **fast},
        # QAT fine-tunes: 1e-4 for the CNNs, 2e-5 (a transformer's fine-tuning rate) for the
        # attention models and the MLP, where 1e-4 moved a tiny ViT more than a point.
        # logit_tol 0.1: torchvision's shufflenet_v2 cascades rounding through its channel
        # shuffles onto a few samples in a hundred (7 of 160 between 0.026 and 0.074 of the
        # logit range, top-1 agreement 1.0); a wrong kernel moves every sample.
        # The coverage floors (0.95 of the MACs for CNNs, 0.90 for the others) are the
        # stage's own, so max_drop keeps no layer in float that would take a file under them.
        {"type": "qat", "epochs": 1, "lr": 2e-5 if name in archs().NOT_CNN else 1e-4,
         "calibration_samples": 64, "logit_tol": 0.1,
         "min_int8_coverage": floor(name), **budget},
        {"type": "export", "models": ["student"], "bundle": False},
        {"type": "ptq", "calibration_samples": 64},
        {"type": "benchmark", "runs": 20, "warmup": 3, "memory": False},
    ]
    return {
        "name": name.replace(" ", "-"), "seed": 0,
        "data": _data(task, samples),
        "input": inputs,
        "teacher": {"source": f"archs.py:{cls}", "checkpoint": str(teacher)},
        "student": student,
        "stages": [{**stage, "time_budget": STAGE_BUDGET} for stage in stages],
    }


def floor(name: str) -> float:
    """The INT8 coverage an architecture's file must reach: 0.95 of the MACs of its layers with
    constant weights for a CNN, 0.90 for a transformer or an MLP."""
    return 0.9 if name in archs().NOT_CNN else 0.95


def teachers(out: Path, samples: tuple[int, int] = (320, 160),
             epochs: int = 6) -> dict[str, Path]:
    """Train the image and the token teacher once; later runs reuse them (stage cache)."""
    from compresskit import api
    found = {}
    for task, (cls, _, inputs) in TEACHERS.items():
        report = api.run({
            "name": f"teacher-{task}", "seed": 0, "data": _data(task, samples),
            "input": inputs, "teacher": {"source": f"archs.py:{cls}"},
            "student": {"source": f"archs.py:{cls}"},
            "stages": [{"type": "train", "model": "teacher", "epochs": epochs, "lr": 0.01}]},
            base_dir=ZOO, output_dir=out / f"teacher-{task}", show_progress=False)
        found[task] = Path(report["run_dir"]) / "00-train" / "teacher.pt"
    return found


def run_one(name: str, out: Path, teacher_paths: dict[str, Path], epochs: int,
            samples: tuple[int, int] = (320, 160),
            max_drop: float | None = None) -> dict[str, Any]:
    """One architecture through the chain; the row of the matrix."""
    from compresskit import api
    from compresskit.errors import ConfigError, StageError

    family, task, _ = entry(name)
    row: dict[str, Any] = {"architecture": name, "family": family, "task": task,
                           "kind": "transformer/mlp" if name in archs().NOT_CNN else "cnn",
                           "stages": {}, "seconds": {}}
    start = time.perf_counter()
    report: dict[str, Any] | None = None
    error = ""
    try:
        report = api.run(_pipeline(name, task, teacher_paths[task], epochs, samples, max_drop),
                         base_dir=ZOO,
                         output_dir=out / name.replace(" ", "-"), show_progress=False)
    except (ConfigError, StageError) as e:
        error = str(e).replace("\n", " ")
        report = _read(out / name.replace(" ", "-") / "report.json")
    except Exception as e:  # a bug of ours: the matrix says so instead of stopping the run
        error = f"internal error {type(e).__name__}: {e}".replace("\n", " ")
        report = _read(out / name.replace(" ", "-") / "report.json")
    row["seconds_total"] = time.perf_counter() - start
    stages = (report or {}).get("stages", [])
    for s in stages:
        row["stages"][s["type"]] = s["status"]
        row["seconds"][s["type"]] = s["seconds"]
    row["over_budget"] = [s["type"] for s in stages if s.get("over_budget")]
    for t in STAGES:
        if t not in row["stages"]:
            row["stages"][t] = "not reached"
    if error:
        failed = next((t for t in STAGES if row["stages"][t] in ("failed", "not reached")),
                      "config")
        row["stages"][failed] = "failed"
        row["error"] = error[:400]
    by_type = {s["type"]: s["metrics"] for s in stages}
    qat = by_type.get("qat", {})
    row["int8_coverage"] = qat.get("int8_coverage")
    row["fp32_accuracy"] = qat.get("fp32_accuracy")
    row["int8_accuracy"] = qat.get("accuracy")
    lat = qat.get("latency_ms") or {}
    if lat.get("fp32") and lat.get("int8"):
        row["int8_latency_ratio"] = lat["int8"] / lat["fp32"]
    ptq = by_type.get("ptq", {})
    row["ptq_int8_coverage"] = ptq.get("int8_coverage")
    row["ptq_accuracy"] = ptq.get("accuracy")
    row["meets_floor"] = row["int8_coverage"] is not None and \
        row["int8_coverage"] >= floor(row["architecture"])
    # Both INT8 files against the FP32 student they came from (qat trains on, so it may gain).
    if row["fp32_accuracy"] is not None and row["int8_accuracy"] is not None:
        row["int8_within_1_point"] = row["int8_accuracy"] >= row["fp32_accuracy"] - 0.01
    if row["fp32_accuracy"] is not None and row["ptq_accuracy"] is not None:
        row["ptq_within_1_point"] = row["ptq_accuracy"] >= row["fp32_accuracy"] - 0.01
    row["float_layers"] = qat.get("float_nodes", [])
    kept = (qat.get("float_fallback") or {}).get("kept_float")  # max_drop's choice
    row["qat_kept_float"] = None if kept is None else [k["layer"] for k in kept]
    return row


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["architecture", *STAGES, "INT8 coverage", "FP32 acc", "QAT INT8 acc",
            "PTQ INT8 acc", "INT8/FP32 ms", "slowest stage"]
    budget = any(r.get("qat_kept_float") is not None for r in rows)
    if budget:
        head.insert(-2, "QAT layers kept float")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mark = {"done": "done", "cached": "done", "failed": "**failed**", "not reached": "-"}

    def num(v: Any, f: str) -> str:
        return "-" if v is None else format(v, f)

    def kept(r: dict[str, Any]) -> list[str]:
        layers = r.get("qat_kept_float")
        return (["-" if layers is None else str(len(layers))] if budget else [])

    for r in rows:
        lines.append("| " + " | ".join([
            r["architecture"], *(mark.get(r["stages"][t], r["stages"][t]) for t in STAGES),
            num(r.get("int8_coverage"), ".3f"), num(r.get("fp32_accuracy"), ".3f"),
            num(r.get("int8_accuracy"), ".3f"), num(r.get("ptq_accuracy"), ".3f"),
            *kept(r), num(r.get("int8_latency_ratio"), ".2f"), _slowest(r)])
            + " |")
    failures = [f"- {r['architecture']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + failures if failures else []))


def _slowest(row: dict[str, Any]) -> str:
    if not row["seconds"]:
        return "-"
    stage = max(row["seconds"], key=row["seconds"].get)
    over = " (over budget)" if row.get("over_budget") else ""
    return f"{stage} {row['seconds'][stage]:.0f} s{over}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architecture names (default: all)")
    parser.add_argument("--more", action="store_true",
                        help="the extended zoo (tests/zoo/archs.py MORE: the architectures "
                             "tried after the first 25) instead of the first 25")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo")
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--attention-epochs", type=int, default=None,
                        help="distillation epochs of the attention models and the MLP "
                             "(default: --epochs); tiny transformers trained from scratch "
                             "learn slowest, and a weak student's near-ties make its INT8 "
                             "accuracy noisy")
    parser.add_argument("--train-samples", type=int, default=320,
                        help="digits to train on (the training part holds 1437; the "
                             "validation digits come after these)")
    parser.add_argument("--test-samples", type=int, default=160,
                        help="digits to measure accuracy on (at most 360), and as many "
                             "other digits to validate on")
    parser.add_argument("--max-drop", type=float, default=None,
                        help="qat's max_drop (accuracy points): layers that lose more are "
                             "kept in float (ptq, the baseline, is measured as it comes)")
    args = parser.parse_args(argv)
    zoo = archs().MORE if args.more else archs().ARCHS
    names = args.only or list(zoo)
    unknown = [n for n in names if n not in {**archs().ARCHS, **archs().MORE}]
    if unknown:
        parser.error(f"unknown architecture {unknown[0]!r}; choose from: {', '.join(zoo)}")
    args.out.mkdir(parents=True, exist_ok=True)
    samples = (args.train_samples, args.test_samples)
    paths = teachers(args.out, samples)
    rows = []
    for name in names:
        epochs = args.epochs if args.attention_epochs is None or name not in archs().NOT_CNN \
            else args.attention_epochs
        row = run_one(name, args.out, paths, epochs, samples, args.max_drop)
        rows.append(row)
        states = ", ".join(f"{t} {row['stages'][t]}" for t in STAGES)
        print(f"{name}: {states} ({row['seconds_total']:.0f} s)" + (
            f"\n  {row['error']}" if row.get("error") else ""), file=sys.stderr, flush=True)
    (args.out / "matrix.json").write_text(json.dumps(rows, indent=1))
    (args.out / "matrix.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
