"""How much the teacher-output cache saves per distillation epoch.

A width-48 ResNet teacher (237M MACs per image) distils a width-8 ResNet student on the
3x32x32 digits (`digits_rgb32`, 1,293 training images), one epoch at a time, with the library's
own training loop and loss (distill/objective.py), once with the teacher run on every batch and
once with its logits read from the memory-mapped cache. The two variants alternate, so machine
noise hits both alike; medians and the median of paired ratios are printed. The one-off cost of
building the cache (one teacher pass over the split) is printed apart. Weights are random: the
time of a forward pass does not depend on their values.

Run: python benchmarks/teacher_cache.py [--rounds 3] [--teacher-width 48] [--student-width 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit.backends.onnx_export import export_onnx  # noqa: E402
from compresskit.backends.onnx_graph import total_macs  # noqa: E402
from compresskit.config import DistillConfig  # noqa: E402
from compresskit.data.sources import digits_rgb32  # noqa: E402
from compresskit.distill.objective import Distiller, Objective, Teacher  # noqa: E402
from compresskit.distill.teacher_cache import TeacherOutputs, data_digest  # noqa: E402
from compresskit.train.loop import fit  # noqa: E402
from models.resnet import resnet  # noqa: E402


def macs(model: torch.nn.Module, folder: Path, name: str) -> int:
    path = folder / f"{name}.onnx"
    export_onnx(model.eval(), torch.zeros(1, 3, 32, 32), path, 17)
    return total_macs(path)


def epoch_seconds(student: torch.nn.Module, source: TeacherOutputs, train: object,
                  cfg: DistillConfig) -> float:
    distiller = Distiller(student, {})
    objective = Objective(cfg, distiller, source, [Teacher("teacher", 1.0, 4.0)], 4.0)
    start = time.perf_counter()
    fit(distiller, train, cfg.options(1), batch_size=64, step=objective,  # type: ignore[arg-type]
        device=torch.device("cpu"), seed=0)
    objective.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--teacher-width", type=int, default=48)
    parser.add_argument("--student-width", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    train = digits_rgb32()["train"]
    teacher = resnet(width=args.teacher_width).eval()
    student = resnet(width=args.student_width)
    folder = Path(tempfile.mkdtemp())
    t_macs, s_macs = macs(teacher, folder, "teacher"), macs(student, folder, "student")
    print(f"teacher {t_macs / 1e6:.1f}M MACs, student {s_macs / 1e6:.1f}M MACs per image: "
          f"{t_macs / s_macs:.1f}x; {len(train):,} training images, batch 64, "
          f"{torch.get_num_threads()} threads")
    cfg = DistillConfig(type="distill", epochs=1, lr=1e-3)
    live = TeacherOutputs({"teacher": teacher}, {}, torch.device("cpu"))
    cached = TeacherOutputs({"teacher": teacher}, {}, torch.device("cpu"))
    start = time.perf_counter()
    cached.use_cache(folder / "cache", train, data_digest(train, "digits_rgb32"), "float32",
                     256, lambda _: None)
    print(f"building the cache (once per teacher and data): {time.perf_counter() - start:.2f} s")
    times: dict[str, list[float]] = {"live": [], "cached": []}
    for _ in range(args.rounds):
        for name, source in (("live", live), ("cached", cached)):
            times[name].append(epoch_seconds(resnet(width=args.student_width), source, train,
                                             cfg))
    ratios = [c / v for c, v in zip(times["cached"], times["live"], strict=True)]
    print("| teacher outputs | epoch seconds (median) | all rounds |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")
    print(f"cached / live epoch time, median of paired ratios: {statistics.median(ratios):.3f} "
          f"({1 / statistics.median(ratios):.1f}x faster)")


if __name__ == "__main__":
    main()
