"""Does distillation beat cross-entropy training of the same small student? Over several seeds.

Runs the first two stages of pipelines/digits.yaml (train the width-64 CNN teacher, then distil
the width-6 student with `baseline: true`, which also trains the same student from the same
initialisation with cross-entropy alone, same epochs and optimiser) once per seed, and prints
the test accuracy of both, their mean and standard deviation over seeds, and the student's
share of the teacher's parameters. Extra `key=value` arguments override the pipeline (e.g.
stages.1.temperature=2).

Run: python benchmarks/kd_vs_ce.py [--seeds 0 1 2] [overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit import api  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = yaml.safe_load((ROOT / "pipelines" / "digits.yaml").read_text())
    cfg["stages"] = cfg["stages"][:2]
    cfg["stages"][1]["baseline"] = True
    rows = []
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp()) / f"seed{seed}"
        report = api.run({**cfg, "seed": seed}, args.overrides, output_dir=out, base_dir=ROOT,
                         show_progress=False)
        teacher, distill = (s for s in report["stages"])
        m = distill["metrics"]
        rows.append((seed, m["teacher_accuracy"], m["accuracy"], m["baseline_accuracy"],
                     distill["params"] / teacher["params"]))
    print("| seed | teacher | KD student | CE student | KD - CE (points) |")
    print("|---|---|---|---|---|")
    for seed, t, kd, ce, _ in rows:
        print(f"| {seed} | {t:.4f} | {kd:.4f} | {ce:.4f} | {100 * (kd - ce):+.2f} |")
    kd_acc, ce_acc = [r[2] for r in rows], [r[3] for r in rows]
    gains = [100 * (k - c) for k, c in zip(kd_acc, ce_acc, strict=True)]

    def spread(v: list[float]) -> str:
        return f"{statistics.mean(v):.4f} +/- {statistics.stdev(v) if len(v) > 1 else 0:.4f}"

    print(f"KD {spread(kd_acc)}, CE {spread(ce_acc)} (mean +/- std over {len(rows)} seeds); "
          f"gain {statistics.mean(gains):+.2f} points (min {min(gains):+.2f}, max "
          f"{max(gains):+.2f}); student/teacher parameters 1/{1 / rows[0][4]:.0f}")


if __name__ == "__main__":
    main()
