"""torch -> ONNX with the TorchScript exporter (dynamo=False).

It handles the stripped QAT graphs the dynamo exporter fails on (shared/facts.md), is fast, and
writes the same bytes for the same model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(Exception):
    pass


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write `model` to `path` with a dynamic batch axis on its one input and output."""
    model = model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export could not trace the model: {first}. Models with "
                          "data-dependent control flow or unsupported ops need changes "
                          "(or a higher opset)") from None


def check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from None
