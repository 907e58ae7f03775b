"""Does pruning with default settings buy latency in proportion to MACs? (no training needed)

Runs the prune stage as a user would, `{type: prune, start_from: teacher, ratio: 0.3}` with
nothing else set (round_to from this CPU, L2 importance, no recovery here to keep it short), on
models/resnet.py with random weights at two widths, and reads the stage's own measurement:
MACs counted on the exported graph and batch-1 one-thread latency of the two ONNX files timed
interleaved (median of paired ratios). The issue's bar: latency falls by at least 0.75x as much
as MACs do.

Run: python benchmarks/prune_defaults.py [--widths 32 48] [--runs 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit import api  # noqa: E402
from compresskit.backends.device_runner import device_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 48])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    info = device_info()
    print(f"{info['cpu']}, flags: {' '.join(info['isa'])}; onnxruntime {info['onnxruntime']}\n")
    print("| width | round_to chosen | MACs cut | latency cut | latency cut / MACs cut |")
    print("|---|---|---|---|---|")
    for width in args.widths:
        with tempfile.TemporaryDirectory() as tmp:
            report = api.run({
                "name": f"prune-defaults-{width}", "data": {"source": "digits_rgb32"},
                "input": {"shape": [3, 32, 32]},
                "teacher": {"source": "models/resnet.py:resnet", "kwargs": {"width": width}},
                "stages": [{"type": "prune", "start_from": "teacher", "ratio": args.ratio,
                            "recover": 0, "latency_runs": args.runs}]},
                base_dir=ROOT, output_dir=tmp, show_progress=False)
        m = report["stages"][0]["metrics"]
        macs_cut = 1 - m["change"]["macs_ratio"]
        latency_cut = 1 - 1 / m["change"]["latency_speedup"]
        print(f"| {width} | {m['round_to']} | {macs_cut:.1%} | {latency_cut:.1%} | "
              f"{latency_cut / macs_cut:.2f} |")


if __name__ == "__main__":
    main()
