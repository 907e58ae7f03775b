"""How much faster INT8 runs than FP32 on this CPU, by network width (no training needed).

Builds models/resnet.py at several widths with random weights, exports FP32 ONNX, quantizes it
with the ptq stage's onnxruntime recipe (QDQ, uint8 activations, int8 per-channel 7-bit weights),
checks that onnxruntime runs it in integer kernels, and times both files interleaved at batch 1
on one thread (median of paired ratios). Latency does not depend on the weights' values.

Run: python benchmarks/int8_vs_fp32.py [--runs 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresskit import measure  # noqa: E402
from compresskit.backends import quant  # noqa: E402
from compresskit.backends.onnx_export import export_onnx  # noqa: E402
from compresskit.backends.onnx_graph import total_macs  # noqa: E402
from models.resnet import resnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    tmp = Path(tempfile.mkdtemp())
    print("| width | MACs | FP32 ms | INT8 ms | speedup (median of paired ratios) | "
          "int8_coverage | size ratio |")
    print("|---|---|---|---|---|---|---|")
    for width in (16, 32, 48, 64):
        torch.manual_seed(0)
        fp32, int8 = tmp / f"w{width}.onnx", tmp / f"w{width}.int8.onnx"
        export_onnx(resnet(width=width).eval(), torch.from_numpy(x[:2]), fp32, 17)
        quant.ptq(fp32, int8, [x[i:i + 16] for i in range(0, 64, 16)], per_channel=True,
                  reduce_range=True)
        cov = quant.int8_coverage(int8, quant.optimized_graph(int8, tmp / "opt.onnx"))
        t = measure.latency({"fp32": fp32, "int8": int8}, x, args.runs)
        print(f"| {width} | {total_macs(fp32) / 1e6:.0f}M | {t['p50_ms']['fp32']:.3f} | "
              f"{t['p50_ms']['int8']:.3f} | {t['speedup']['int8']:.2f}x | "
              f"{cov['int8_coverage']:.3f} | {int8.stat().st_size / fp32.stat().st_size:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
