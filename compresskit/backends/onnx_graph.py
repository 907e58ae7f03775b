"""Reading ONNX graphs: multiply-accumulates per node, counted on the exported graph itself.

Shapes come from onnx's shape inference (onnxruntime's symbolic shape inference where onnx's
leaves a counted node unknown, as in Hugging Face transformer graphs) with the batch set to 1,
so the count is per sample, and other symbolic dimensions (a sequence length) set to `sizes`.
Conv, ConvTranspose, Gemm and MatMul are counted; elementwise ops,
pooling and normalisation are not (they are a small share of the work of the models this
toolkit compresses, and no MAC convention agrees on them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import shape_inference

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class NodeMacs:
    name: str
    op: str
    macs: int
    operand: str
    """The second input: the weight of a Conv or Gemm, or of a MatMul by a constant (directly
    an initializer, or behind QuantizeLinear/DequantizeLinear in a quantized graph)."""


def _fix_batch(model: onnx.ModelProto, sizes: dict[str, int] | None = None) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = (sizes or {}).get(dim.dim_param, 1)


def _shapes(model: onnx.ModelProto, symbolic: bool = False) -> dict[str, list[int]]:
    if symbolic:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    else:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    out: dict[str, list[int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[value.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def node_macs(path: Path | str, sizes: dict[str, int] | None = None) -> list[NodeMacs]:
    """MACs per sample of every Conv/Gemm/MatMul node whose shapes are known; `sizes` gives
    symbolic dimensions other than the batch by name (e.g. {'sequence': 128})."""
    model = onnx.load(str(path))
    _fix_batch(model, sizes)
    shapes = _shapes(model)
    counted = [n for n in model.graph.node if n.op_type in COUNTED and n.output]
    if any(i not in shapes for n in counted for i in [n.output[0], *n.input[:2]]):
        try:
            shapes = _shapes(model, symbolic=True)
        except Exception:  # noqa: BLE001 - keep onnx's partial shapes
            pass
    rows = []
    for node in model.graph.node:
        if node.op_type not in COUNTED or not node.output:
            continue
        out = shapes.get(node.output[0])
        ins = [shapes.get(i) for i in node.input[:2]]
        if out is None or any(s is None for s in ins):
            continue
        a, b = ins[0], ins[1]
        assert a is not None and b is not None
        if node.op_type == "Conv":
            macs = math.prod(out) * math.prod(b[1:])  # per output element: cin/groups * kh * kw
        elif node.op_type == "ConvTranspose":
            macs = math.prod(a) * math.prod(b[1:])
        elif node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            macs = math.prod(out) * k
        else:
            macs = math.prod(out) * a[-1]
        rows.append(NodeMacs(node.name, node.op_type, int(macs), node.input[1]))
    return rows


def total_macs(path: Path | str, sizes: dict[str, int] | None = None) -> int:
    return sum(r.macs for r in node_macs(path, sizes))

