"""INT8 with NNCF and onnxruntime: BatchNorm folding, NNCF quantizers, QDQ files with int8 weights,
onnxruntime static PTQ, and what onnxruntime really runs as integer code.

The naive NNCF route (quantize -> fine-tune -> strip -> export) gives a graph that onnxruntime
runs in float: BatchNorm sits between each quantized conv and its output, and the weights are
stored as float32 behind QuantizeLinear (shared/facts.md). So BatchNorm is folded first, the
weights are rewritten as int8 initializers, and `int8_coverage` is read from the graph that
onnxruntime actually optimised.
"""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compresskit.backends.onnx_graph import node_macs

INTEGER_OPS = {"QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3, "MatMulInteger": 1,
               "ConvInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1}
"""Integer kernels of onnxruntime, and the input index of their constant weight."""
FLOAT_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
             "ConvTranspose"}


class QuantError(Exception):
    """Quantization cannot be done as configured; the message says what to change."""


# -- torch side ---------------------------------------------------------------------------------
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Fold each BatchNorm that directly follows a convolution (its input is the conv's output
    tensor) into that convolution, in place; returns the folded BatchNorm names. The result is
    checked against the unfolded model, and a fold that changes outputs is undone."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # tensors held: ids stay unique
    pairs: list[tuple[str, str]] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            hooks.append(m.register_forward_hook(
                lambda mod, i, out: produced.__setitem__(id(out), (mod, out))))
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, i: pairs.append((names[produced[id(i[0])][0]], names[mod]))
                if id(i[0]) in produced else None))
    try:
        with torch.no_grad():
            reference = model(example)
    finally:
        for h in hooks:
            h.remove()
    from compresskit.structure import get_module, set_module

    folded = []
    for conv_name, bn_name in dict.fromkeys(pairs):
        conv, bn = get_module(model, conv_name), get_module(model, bn_name)
        if not bn.track_running_stats or bn.running_mean is None:  # type: ignore[union-attr]
            continue
        saved = (conv, bn)
        set_module(model, conv_name, fuse_conv_bn_eval(conv, bn))  # type: ignore[arg-type,type-var]
        set_module(model, bn_name, nn.Identity())
        with torch.no_grad():
            same = torch.allclose(model(example), reference, atol=1e-4, rtol=1e-3)
        if same:
            folded.append(bn_name)
        else:  # the conv's output is also read elsewhere: folding would change the model
            set_module(model, conv_name, saved[0])
            set_module(model, bn_name, saved[1])
    return folded


def module_patterns_to_regex(patterns: Iterable[str]) -> list[str]:
    """Our `ignore` globs over module names as regexes over NNCF node names, which spell the
    module path with slashes (module 'features.0.0' -> node 'features/0/0/conv2d/0')."""
    out = []
    for p in patterns:
        body = "".join({".": "/", "*": ".*", "?": "."}.get(c, re.escape(c)) for c in p)
        out.append(f"^{body}(/.*)?$")
    return out


class _Top(nn.Module):
    """A bare nn.Sequential inside a module (nncf.quantize fails on a top-level Sequential)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        return self.model(*x)  # type: ignore[no-any-return]


def nncf_quantize(model: nn.Module, batches: list[torch.Tensor], *, preset: str,
                  ignore: list[str], overflow_fix: bool, per_channel: bool) -> nn.Module:
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

    if isinstance(model, nn.Sequential):  # NNCF's hooks need a top-level module's own forward
        model = _Top(model)
        ignore = [f"model.{p}" for p in ignore]
    scope = nncf.IgnoredScope(patterns=module_patterns_to_regex(ignore), validate=False) \
        if ignore else None
    try:
        return nncf.quantize(
            model, nncf.Dataset(batches), subset_size=sum(len(b) for b in batches),
            preset=nncf.QuantizationPreset.MIXED if preset == "mixed"
            else nncf.QuantizationPreset.PERFORMANCE,
            ignored_scope=scope, target_device=nncf.TargetDevice.CPU,
            advanced_parameters=AdvancedQuantizationParameters(
                overflow_fix=OverflowFix.ENABLE if overflow_fix else OverflowFix.DISABLE,
                weights_quantization_params=QuantizationParameters(per_channel=per_channel),
                # onnxruntime's QLinearConv takes one input scale: NNCF would otherwise give
                # depthwise convolutions per-channel input quantizers, left float.
                activations_quantization_params=QuantizationParameters(per_channel=False)))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantError(f"NNCF could not quantize the model ({type(e).__name__}: {first}). If "
                         "an op is not supported, add the module that holds it to 'ignore'"
                         ) from None


def strip(model: nn.Module, example: torch.Tensor) -> nn.Module:
    import nncf

    return nncf.strip(model, do_copy=True, example_input=example).eval()


# -- ONNX side ----------------------------------------------------------------------------------
def _const_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # topological order: an Identity follows what it copies
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    arrays[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in arrays:
            arrays[n.output[0]] = arrays[n.input[0]]
    return arrays


def int8_weights(path: Path) -> int:
    """Replace QuantizeLinear(constant float weight) by its int8 result, so the file stores
    integer weights (same scale, zero point and axis); returns how many were rewritten."""
    model = onnx.load(str(path))
    consts = _const_arrays(model)
    keep, new_inits, dropped = [], [], set()
    consumers: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        for i in n.input:
            consumers[i] += 1
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in consts and len(n.input) >= 3 \
                and n.input[1] in consts and n.input[2] in consts:
            x, scale, zp = consts[n.input[0]], consts[n.input[1]], consts[n.input[2]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * x.ndim
                shape[axis % x.ndim] = -1
                scale, zp_b = scale.reshape(shape), zp.reshape(shape)
            else:
                zp_b = zp
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(x / scale) + zp_b.astype(np.int32), info.min, info.max)
            new_inits.append(numpy_helper.from_array(q.astype(zp.dtype), n.output[0]))
            if consumers[n.input[0]] == 1:
                dropped.add(n.input[0])
            continue
        keep.append(n)
    if not new_inits:
        return 0
    graph = model.graph
    rest = [i for i in graph.initializer if i.name not in dropped]
    kept_nodes = [n for n in keep if not (n.op_type == "Constant" and n.output[0] in dropped)]
    del graph.initializer[:]
    graph.initializer.extend(rest + new_inits)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    _compact(model)
    onnx.save(model, str(path))
    return len(new_inits)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def unsigned_activations(path: Path) -> int:
    """Re-encode signed (int8) activation QuantizeLinear/DequantizeLinear pairs as uint8 with
    the zero point moved by 128: the same values exactly, since q_u8 = q_s8 + 128. NNCF gives
    activations without a ReLU before them (MobileNetV2's linear bottlenecks) int8 quantizers;
    onnxruntime fuses a conv into QLinearConv only when its input and output types match, and
    integer kernels on x86 want uint8 activations. Returns how many were re-encoded."""
    model = onnx.load(str(path))
    consts = _const_arrays(model)
    consumers = _consumers(model)
    changed = 0
    for n in list(model.graph.node):
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[0] in consts \
                or n.input[2] not in consts or consts[n.input[2]].dtype != np.int8:
            continue
        users = consumers[n.output[0]]
        if not users or any(u.op_type != "DequantizeLinear" or len(u.input) < 3
                            or u.input[2] != n.input[2] for u in users):
            continue
        name = f"{n.output[0]}_zero_point_u8"
        zp = (consts[n.input[2]].astype(np.int16) + 128).astype(np.uint8)
        model.graph.initializer.append(numpy_helper.from_array(zp, name))
        n.input[2] = name
        for u in users:
            u.input[2] = name
        changed += 1
    if changed:
        _compact(model)
        onnx.save(model, str(path))
    return changed


def drop_saturated_activations(path: Path) -> list[str]:
    """Remove each Relu or Clip whose only consumer is a QuantizeLinear that already saturates
    inside the activation's range, so Q(act(x)) == Q(x). NNCF's QAT graph keeps
    Conv -> Clip (ReLU6) -> QuantizeLinear, which onnxruntime first fuses into a float
    FusedConv, leaving the conv out of its integer kernels; onnxruntime's own quantizer drops
    these activations the same way. Returns the names of the removed nodes."""
    model = onnx.load(str(path))
    consts = _const_arrays(model)
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    removed: dict[str, str] = {}  # activation output -> its input
    for n in model.graph.node:
        if n.op_type not in ("Relu", "Clip") or n.output[0] in outputs:
            continue
        users = consumers[n.output[0]]
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(users[0].input) < 3:
            continue
        q = users[0]
        if q.input[1] not in consts or q.input[2] not in consts:
            continue
        scale, zp = consts[q.input[1]], consts[q.input[2]]
        if scale.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        low = float((info.min - int(zp.reshape(-1)[0])) * float(scale.reshape(-1)[0]))
        high = float((info.max - int(zp.reshape(-1)[0])) * float(scale.reshape(-1)[0]))
        if n.op_type == "Relu":
            lo, hi = 0.0, float("inf")
        else:
            lo_name, hi_name = [*n.input[1:3], "", ""][:2]
            if (lo_name and lo_name not in consts) or (hi_name and hi_name not in consts):
                continue
            lo = float(consts[lo_name]) if lo_name else -float("inf")
            hi = float(consts[hi_name]) if hi_name else float("inf")
        if lo <= low and high <= hi:
            removed[n.output[0]] = n.input[0]
    if not removed:
        return []
    names = [n.name or n.output[0] for n in model.graph.node if n.output and n.output[0] in removed]
    kept = [n for n in model.graph.node if not (n.output and n.output[0] in removed)]
    for n in kept:
        n.input[:] = [removed.get(i, i) for i in n.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _compact(model)
    onnx.save(model, str(path))
    return names


def _compact(model: onnx.ModelProto) -> None:
    """Drop Identity copies of constants and give internal tensors short names: on a small
    model, NNCF's long hook names weigh more than the int8 weights themselves."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits}
    nodes = [n for n in graph.node if n.output[0] not in alias]
    keep = {v.name for v in [*graph.input, *graph.output]}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        name = alias.get(name, name)
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for i in graph.initializer:
        i.name = short(i.name)
    for n in nodes:
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def optimized_graph(path: Path, out: Path) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs after full optimisation, saved to `out`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


def _weight_root(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """Follow DequantizeLinear/QuantizeLinear/Transpose back to the stored weight."""
    seen = 0
    while name in producers and producers[name].op_type in {
            "DequantizeLinear", "QuantizeLinear", "Transpose", "Identity"} and seen < 4:
        name = producers[name].input[0]
        seen += 1
    return name


def int8_coverage(source: Path, optimized: onnx.ModelProto) -> dict[str, Any]:
    """Share of the Conv/Gemm/MatMul MACs with constant weights that onnxruntime runs in
    integer kernels. MACs come from the source graph (onnx shape inference); nodes are matched
    to the optimised graph by the shape of their stored weight (optimisation renames and fuses
    nodes but keeps weight tensors); same-shape groups are credited by count."""
    src = onnx.load(str(source))
    producers = {o: n for n in src.graph.node for o in n.output}
    shapes = {i.name: tuple(i.dims) for i in src.graph.initializer}
    for n in src.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    groups: dict[tuple[int, ...], list[Any]] = defaultdict(list)
    for row in node_macs(source):
        root = _weight_root(row.operand, producers)
        if root in shapes:
            groups[tuple(sorted(shapes[root]))].append(row)
    opt_shapes = {i.name: tuple(i.dims) for i in optimized.graph.initializer}
    opt_producers = {o: n for n in optimized.graph.node for o in n.output}
    integer: dict[tuple[int, ...], int] = defaultdict(int)
    float_nodes = []
    for n in optimized.graph.node:
        if n.op_type in INTEGER_OPS and len(n.input) > INTEGER_OPS[n.op_type]:
            w = n.input[INTEGER_OPS[n.op_type]]
            if w in opt_shapes:
                integer[tuple(sorted(opt_shapes[w]))] += 1
        elif n.op_type in FLOAT_OPS and len(n.input) > 1 \
                and _weight_root(n.input[1], opt_producers) in opt_shapes:
            float_nodes.append(f"{n.op_type} {n.name or n.output[0]}")
    total = sum(r.macs for rows in groups.values() for r in rows)
    covered = 0.0
    for key, rows in groups.items():
        share = min(1.0, integer.get(key, 0) / len(rows))
        covered += share * sum(r.macs for r in rows)
    return {"int8_coverage": round(covered / total, 4) if total else 0.0,
            "macs_with_constant_weights": total, "float_nodes": float_nodes,
            "op_counts": _op_counts(optimized)}


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        counts[n.op_type] += 1
    return dict(sorted(counts.items()))


def ptq(fp32: Path, out: Path, batches: list[Any], *, per_channel: bool,
        reduce_range: bool, dynamic: bool = False) -> None:
    """onnxruntime quantization: static (QDQ, uint8 activations calibrated on `batches`, int8
    weights) or dynamic (int8 weights of MatMul/Gemm and of embedding tables read by Gather,
    activations quantized at run time)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compresskit import inputs

    names = [i.name for i in onnx.load(str(fp32)).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else inputs.feeds(names, x)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        if dynamic:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8,
                             per_channel=per_channel, reduce_range=reduce_range,
                             op_types_to_quantize=["MatMul", "Gemm", "Gather"])
        else:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=per_channel, reduce_range=reduce_range)
    model = onnx.load(str(out))
    _compact(model)
    onnx.save(model, str(out))

