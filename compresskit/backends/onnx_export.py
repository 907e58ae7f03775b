"""torch -> ONNX with the TorchScript exporter (dynamo=False).

It handles the stripped QAT graphs the dynamo exporter fails on (shared/facts.md), is fast, and
writes the same bytes for the same model.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
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
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with tempfile.TemporaryFile(mode="w+b") as log:
        try:
            # In eval mode without grad, nn.TransformerEncoder and nn.MultiheadAttention take
            # a fused fast path (aten::_transformer_encoder_layer_fwd) the exporter does not
            # know; the plain path computes the same.
            torch.backends.mha.set_fastpath_enabled(False)
            with warnings.catch_warnings(), torch.no_grad(), _stdout_to(log):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, args, str(path), dynamo=False, opset_version=opset,
                    input_names=names, output_names=[OUTPUT_NAME],
                    dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True)
        except Exception as e:
            log.seek(0)
            raise ExportError(_explain(e, log.read().decode(errors="replace"), opset)) from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    whole_window_pools(path)


def whole_window_pools(path: Path) -> int:
    """Rewrite each AveragePool whose window covers its whole (static) input, without padding,
    as GlobalAveragePool, which computes the same. Hugging Face's EfficientNet pools with
    `AvgPool2d(hidden_dim, ceil_mode=True)` (count_include_pad on), a window far larger than its
    feature map. onnxruntime's float AveragePool divides by the cells inside the input, as torch
    does; its fused QLinearAveragePool divides by the whole window (here 320 x 320), so the INT8
    file pooled to zeros (onnxruntime 1.32). QLinearGlobalAveragePool is exact. Returns how
    many were rewritten."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    pools = [n for n in model.graph.node if n.op_type == "AveragePool"]
    if not pools:
        return 0
    dims = _spatial_dims(model, [n.input[0] for n in pools])
    done = 0
    for node in pools:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(attrs.get("kernel_shape", []))
        spatial = dims.get(node.input[0])
        if (spatial is None or len(node.output) != 1 or len(spatial) != len(kernel)
                or any(attrs.get("pads", [0]))
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
                or any(d != 1 for d in attrs.get("dilations", [1]))):
            continue
        strides = list(attrs.get("strides", [1] * len(kernel)))
        # One window per axis, starting at 0 and holding every cell: the kernel is the input,
        # or larger with ceil_mode and no second window (the first one's overhang < stride).
        ceil = attrs.get("ceil_mode", 0)
        if not all(k == d or (ceil and d < k < d + s)
                   for k, d, s in zip(kernel, spatial, strides, strict=True)):
            continue
        node.op_type = "GlobalAveragePool"
        del node.attribute[:]
        done += 1
    if done:
        onnx.save(model, str(path))
    return done


def _spatial_dims(model: Any, names: list[str]) -> dict[str, list[int]]:
    """The static dimensions after batch and channels of the tensors `names`: by onnx's shape
    inference, else by onnxruntime's symbolic one (which follows the Cast/Constant chains of a
    QAT graph's Pad). Best effort: an unknown shape is left out."""
    from onnx import shape_inference

    def found(inferred: Any) -> dict[str, list[int]]:
        out = {}
        for v in [*inferred.graph.input, *inferred.graph.value_info]:
            dims = v.type.tensor_type.shape.dim[2:]
            if v.name in names and dims and all(d.HasField("dim_value") for d in dims):
                out[v.name] = [d.dim_value for d in dims]
        return out

    shapes: dict[str, list[int]] = {}
    with contextlib.suppress(Exception):
        shapes = found(shape_inference.infer_shapes(model))
    if len(shapes) < len(set(names)):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with contextlib.suppress(Exception):
            shapes = found(SymbolicShapeInference.infer_shapes(model, auto_merge=True))
    return shapes


@contextlib.contextmanager
def _stdout_to(log: Any) -> Iterator[None]:
    """Send the process's stdout (file descriptor 1) to `log`: on a failure the TorchScript
    exporter prints its whole graph there from C++, hundreds of lines no user should meet."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(log.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _explain(error: Exception, graph_log: str, opset: int) -> str:
    """One sentence: what the exporter could not do, where in the model, and what to try."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    op = re.search(r"operator '([\w:.]+)'", first)
    if op is None:
        return (f"torch.onnx.export could not trace the model: {first[:300]}. Models with "
                "data-dependent control flow or unsupported ops need changes (or a higher "
                "opset)")
    where = ""
    for line in graph_log.splitlines():
        if f"= {op.group(1)}(" in line and "scope: " in line:
            where = _module_of(line.split("scope: ", 1)[1].split(" # ", 1)[0])
            break
    return (f"torch.onnx.export has no ONNX form for the operator '{op.group(1)}' at opset "
            f"{opset}{where}; write that part with standard torch ops, try a higher opset, "
            "or keep it out of the exported model")


def _module_of(scope: str) -> str:
    """' in module enc.layers.0 (TransformerEncoderLayer)' from a TorchScript scope such as
    'Top::/pkg.TransformerEncoder::enc/pkg.TransformerEncoderLayer::layers.0'."""
    parts = [p.split("::", 1) for p in scope.strip().split("/") if "::" in p]
    names = [name for _, name in parts if name]
    if not names:
        return ""
    cls = parts[-1][0].rsplit(".", 1)[-1]
    return f", used in module '{'.'.join(names)}' ({cls})"


def check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from None
