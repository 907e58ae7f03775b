"""torch -> ONNX with the TorchScript exporter (dynamo=False).

It handles the stripped QAT graphs the dynamo exporter fails on (shared/facts.md), is fast, and
writes the same bytes for the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(Exception):
    pass


def input_axes(inputs: Sequence[Any] | None) -> tuple[list[str], dict[str, dict[int, str]]]:
    """ONNX input names and dynamic axes: the batch, and each input's `dynamic` axes."""
    if not inputs:
        return [INPUT_NAME], {INPUT_NAME: {0: "batch"}}
    names = [i.name for i in inputs]
    axes = {i.name: {0: "batch", **{a + 1: n for a, n in i.dynamic.items()}} for i in inputs}
    return names, axes


def export_onnx(model: nn.Module, example: Any, path: Path, opset: int,
                inputs: Sequence[Any] | None = None) -> None:
    """Write `model` to `path` with named inputs (the pipeline's `input:`), a dynamic batch
    axis on every input and the output, and each input's dynamic axes."""
    model = model.eval()
    names, axes = input_axes(inputs)
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=opset,
                input_names=names, output_names=[OUTPUT_NAME],
                dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}},
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
