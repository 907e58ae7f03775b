"""INT8 with NNCF and onnxruntime: BatchNorm folding, NNCF quantizers, QDQ files with int8 weights,
onnxruntime static PTQ, and what onnxruntime really runs as integer code.

The naive NNCF route (quantize -> fine-tune -> strip -> export) gives a graph that onnxruntime
runs in float: BatchNorm sits between each quantized conv and its output, and the weights are
stored as float32 behind QuantizeLinear (shared/facts.md). So BatchNorm is folded first, the
weights are rewritten as int8 initializers, and `int8_coverage` is read from the graph that
onnxruntime actually optimised.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import heapq
import io
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compresskit.backends import quiet_libraries, verbose
from compresskit.backends.onnx_graph import node_macs
from compresskit.models.inputs import call

INTEGER_OPS = {"QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3, "MatMulInteger": 1,
               "ConvInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1}
"""Integer kernels of onnxruntime, and the input index of their constant weight."""
FLOAT_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
             "ConvTranspose"}


class QuantError(Exception):
    """Quantization cannot be done as configured; the message says what to change."""


# -- torch side ---------------------------------------------------------------------------------
def fold_batchnorm(model: nn.Module, example: Any) -> list[str]:
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
            reference = call(model, example)
    finally:
        for h in hooks:
            h.remove()
    from compresskit.models.structure import get_module, set_module

    folded = []
    for conv_name, bn_name in dict.fromkeys(pairs):
        conv, bn = get_module(model, conv_name), get_module(model, bn_name)
        if not bn.track_running_stats or bn.running_mean is None:  # type: ignore[union-attr]
            continue
        saved = (conv, bn)
        set_module(model, conv_name, fuse_conv_bn_eval(conv, bn))  # type: ignore[arg-type,type-var]
        set_module(model, bn_name, nn.Identity() if type(bn) in PLAIN_BATCHNORMS
                   else _NormFolded(copy.deepcopy(bn)))
        with torch.no_grad():
            same = torch.allclose(call(model, example), reference, atol=1e-4, rtol=1e-3)
        if same:
            folded.append(bn_name)
        else:  # the conv's output is also read elsewhere: folding would change the model
            set_module(model, conv_name, saved[0])
            set_module(model, bn_name, saved[1])
    return folded


PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _NormFolded(nn.Module):
    """What is left of a BatchNorm subclass once its normalization is folded into the conv
    before it: timm's BatchNormAct2d normalizes, then applies its dropout and activation in
    the same module, so an Identity in its place drops the activation (and the fold was
    undone: every timm CNN's convs kept their BatchNorm, and QAT quantized each conv's output
    before it, per tensor, across channels of any scale). The subclass's own forward runs with
    identity statistics, in eval mode for the normalization (training would normalize by the
    batch again) and untouched by BatchNorm re-estimation; `drop_identity_batchnorms` takes
    the identity out of the exported graph."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        with torch.no_grad():
            if bn.weight is not None:  # type: ignore[union-attr]
                bn.weight.fill_(1.0).requires_grad_(False)  # type: ignore[union-attr,operator]
            if bn.bias is not None:  # type: ignore[union-attr]
                bn.bias.zero_().requires_grad_(False)  # type: ignore[union-attr,operator]
            bn.running_mean.zero_()  # type: ignore[union-attr,operator]
            bn.running_var.fill_(1.0)  # type: ignore[union-attr,operator]
        bn.eps = 0.0
        bn.track_running_stats = False  # BatchNorm re-estimation passes it by
        self.norm = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.norm.training
        self.norm.training = False
        try:
            return self.norm(x)  # type: ignore[no-any-return]
        finally:
            self.norm.training = training


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


def _nncf() -> Any:
    """nncf, with room for its first-use compile of a torch extension (about 50 s on 2 idle
    cores): its own 60 s limit fails QAT on a busy or slow machine."""

    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "300")
    import nncf

    quiet_libraries()  # importing nncf sets its logger to INFO
    return nncf


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """NNCF draws its own rich progress bars on stdout; they are not our users' business
    unless they ask (`compresskit run --verbose`)."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _squeeze_excite_quantized() -> Iterator[None]:
    """NNCF leaves squeeze-excite blocks float (its SE_BLOCK ignored pattern, which suits
    OpenVINO); onnxruntime then runs their convs in float, and a MobileNetV3 falls to 81% of
    its MACs in integer kernels. Without the pattern NNCF quantizes them like any conv."""
    from nncf.common.graph.patterns.manager import PatternsManager
    from nncf.common.graph.patterns.patterns import IgnoredPatternNames

    original = PatternsManager._get_backend_ignored_patterns_map

    def without_se(backend: Any) -> Any:
        return {k: v for k, v in original(backend).items()
                if k is not IgnoredPatternNames.SE_BLOCK}

    PatternsManager._get_backend_ignored_patterns_map = staticmethod(without_se)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        PatternsManager._get_backend_ignored_patterns_map = original  # type: ignore[method-assign]


def is_transformer(model: nn.Module) -> bool:
    """Whether NNCF's transformer scheme fits: a LayerNorm or an RMSNorm (Llama, Mistral,
    Qwen and T5 spell their own: LlamaRMSNorm, T5LayerNorm), MobileBERT's NoNorm, torch's
    MultiheadAttention, or a module its library calls a self-attention (BertSelfAttention).
    Without it NNCF quantizes the attention mask's arithmetic too (Llama: the -3.4e38 of the
    causal mask through a quantizer, and the loss is nan from the first step; MobileBERT,
    which has no LayerNorm at all, lost 5.3 points in QAT)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm | nn.MultiheadAttention) or type(m).__name__.endswith(
                ("RMSNorm", "LayerNorm", "NoNorm", "SelfAttention")):
            return True
    return False


def nncf_quantize(model: nn.Module, batches: list[torch.Tensor], *, preset: str,
                  ignore: list[str], overflow_fix: bool, per_channel: bool) -> nn.Module:
    nncf = _nncf()
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
    # NNCF's transformer scheme quantizes the Linear layers' and attention's matmuls and leaves
    # what only feeds masks and positions alone (BERT's integer attention-mask arithmetic).
    transformer = is_transformer(model)
    try:
        with _quietly(), _squeeze_excite_quantized():  # NNCF's progress bars, unless --verbose
            return nncf.quantize(
                model, nncf.Dataset(batches), subset_size=len(batches),  # items: batches
                model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                preset=nncf.QuantizationPreset.MIXED if preset == "mixed"
                else nncf.QuantizationPreset.PERFORMANCE,
                ignored_scope=scope, target_device=nncf.TargetDevice.CPU,
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=OverflowFix.ENABLE if overflow_fix else OverflowFix.DISABLE,
                    # NNCF's CPU default is already per-channel weights; naming it explicitly
                    # breaks its LayerNorm handling ("shape '[64]' is invalid for input of size
                    # 1", shared/facts.md), so only per-tensor is spelt out.
                    weights_quantization_params=None if per_channel
                    else QuantizationParameters(per_channel=False),
                    # onnxruntime's QLinearConv takes one input scale: NNCF would otherwise give
                    # depthwise convolutions per-channel input quantizers, left float.
                    activations_quantization_params=QuantizationParameters(per_channel=False)))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantError(f"NNCF could not quantize the model ({type(e).__name__}: {first}). If "
                         "an op is not supported, add the module that holds it to 'ignore'"
                         ) from None


def strip(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """NNCF's quantizers as torch FakeQuantize modules. A quantizer NNCF hooked onto an integer
    tensor (Swin's window index arithmetic) passes it through: its training-time quantizer
    did, while torch's fake_quantize kernels have no integer form."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    stripped = _nncf().strip(model, do_copy=True, example_input=example).eval()
    for m in stripped.modules():
        if isinstance(m, FakeQuantizeBase):
            m.forward = functools.partial(_float_only, m.forward)  # type: ignore[method-assign]
    return stripped  # type: ignore[no-any-return]


def _float_only(quantize: Any, x: torch.Tensor) -> torch.Tensor:
    return quantize(x) if x.is_floating_point() else x  # type: ignore[no-any-return]


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


def fake_quantize_as_qdq(path: Path) -> int:
    """Rewrite each `org.openvinotoolkit:FakeQuantize` that `nncf.strip` left in the graph
    (with torch 2.14, shared quantizers in front of a Concat) as the QuantizeLinear ->
    DequantizeLinear pair onnxruntime runs: levels 256 over [low, high] is uint8 with scale
    (high - low) / 255 and zero point -low / scale; levels 255 with low = -high is int8
    with zero point 0. Returns how many were rewritten; raises QuantError for one that has no
    such form, since onnxruntime would refuse the file."""
    from onnx import helper

    model = onnx.load(str(path))
    consts = _const_arrays(model)
    out_nodes: list[onnx.NodeProto] = []
    changed = 0
    for n in model.graph.node:
        if n.op_type != "FakeQuantize":
            out_nodes.append(n)
            continue
        levels = next((helper.get_attribute_value(a) for a in n.attribute
                       if a.name == "levels"), 256)
        bounds = [consts.get(i) for i in n.input[1:5]]
        if any(b is None or b.size != 1 for b in bounds) or levels not in (255, 256):
            raise QuantError(f"NNCF left a FakeQuantize node ({n.name or n.output[0]}: "
                             f"{levels} levels, per-channel or computed bounds) that "
                             "onnxruntime cannot run; add the module in front of it to "
                             "'ignore'")
        lo, hi, out_lo, out_hi = (float(b.reshape(-1)[0]) for b in bounds)  # type: ignore[union-attr]
        if (lo, hi) != (out_lo, out_hi):
            raise QuantError(f"NNCF left a FakeQuantize node ({n.name or n.output[0]}) whose "
                             "output range differs from its input range; add the module in "
                             "front of it to 'ignore'")
        scale = max((hi - lo) / (levels - 1), 1e-12)
        if levels == 255:
            zp = np.array(0, np.int8)
        else:
            zp = np.array(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
        base = n.output[0]
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, np.float32), f"{base}_fqscale"),
            numpy_helper.from_array(zp, f"{base}_fqzp")])
        out_nodes += [
            helper.make_node("QuantizeLinear", [n.input[0], f"{base}_fqscale", f"{base}_fqzp"],
                             [f"{base}_fq"]),
            helper.make_node("DequantizeLinear", [f"{base}_fq", f"{base}_fqscale",
                                                  f"{base}_fqzp"], [base])]
        changed += 1
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(out_nodes)
        used = {i for n in out_nodes for i in n.input}
        kept = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        del model.opset_import[:]
        model.opset_import.extend([o for o in onnx.load(str(path)).opset_import
                                   if o.domain != "org.openvinotoolkit"])
        onnx.save(model, str(path))
    return changed


def drop_identity_batchnorms(path: Path) -> int:
    """Take out each BatchNormalization that computes its input (scale 1, bias 0, mean 0,
    variance + epsilon 1): what a folded BatchNorm subclass leaves (`_NormFolded`). Returns
    how many were taken out."""
    model = onnx.load(str(path))
    consts = _const_arrays(model)
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for n in model.graph.node:
        params = [consts.get(i) for i in n.input[1:5]]
        if n.op_type == "BatchNormalization" and len(params) == 4 and all(
                p is not None for p in params) and n.output[0] not in outputs and \
                not any(o for o in n.output[1:]):
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            scale, bias, mean, var = (np.asarray(p, np.float32) for p in params)
            if np.all(scale == 1) and np.all(bias == 0) and np.all(mean == 0) and \
                    np.all(var + np.float32(eps) == 1):
                rename[n.output[0]] = rename.get(n.input[0], n.input[0])
                continue
        keep.append(n)
    if not rename:
        return 0
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(path))
    return len(rename)


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


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def shapes_past_quantizers(path: Path) -> int:
    """A Shape (or Size) reading a tensor that a QuantizeLinear also reads now reads the
    quantized tensor (the same shape): onnxruntime fuses DQ -> MatMul -> Q into one integer
    kernel only when the quantizer is the MatMul's sole consumer. HF LeViT flattens each
    Linear's output for its BatchNorm1d and reshapes back by the output's own shape, and 27 of
    its MatMuls ran in float (35% of the MACs in integer kernels). Returns how many moved."""
    model = onnx.load(str(path))
    moved = _shapes_past_quantizers(model)
    if moved:
        onnx.save(model, str(path))
    return moved


def _shapes_past_quantizers(model: onnx.ModelProto) -> int:
    consumers = _consumers(model)
    moved = 0
    for tensor, readers in consumers.items():
        q = next((n for n in readers if n.op_type == "QuantizeLinear" and n.input[0] == tensor),
                 None)
        if q is None:
            continue
        for n in readers:
            if n.op_type in ("Shape", "Size") and n.input[0] == tensor:
                n.input[0] = q.output[0]
                moved += 1
    if moved:  # a Shape listed before its quantizer now reads what the quantizer writes
        _sort_nodes(model)
    return moved


def _sort_nodes(model: onnx.ModelProto) -> None:
    """The graph's nodes in topological order, otherwise as they were."""
    nodes = list(model.graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [sum(1 for i in set(n.input) if i in producer) for n in nodes]
    readers: dict[int, list[int]] = defaultdict(list)
    for k, n in enumerate(nodes):
        for i in set(n.input):
            if i in producer:
                readers[producer[i]].append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise QuantError("the quantized graph has a cycle; this is a bug in compresskit")
    del model.graph.node[:]
    model.graph.node.extend(nodes[k] for k in order)


def close_qdq(path: Path, batches: list[Any]) -> list[str]:
    """Give every layer with quantized weights the DQ -> op -> Q frame onnxruntime needs to run
    it as integer code, where NNCF left a side open; returns what was added, layer by layer.

    NNCF quantizes where OpenVINO wants quantizers, which is not always where onnxruntime looks:
    no quantizer on a model input read by the first layer (an MLP's first Gemm, a ViT's patch
    convolution), none after the last layer (the classifier's logits), and the quantizer after
    an activation rather than after the conv before it (EfficientNet's SiLU). Each missing
    input, and each conv output nothing quantizes, gets a uint8 quantizer over the range the
    tensor takes on `batches` (the float graph run as it is). A MatMul needs no quantized
    output: onnxruntime runs DQ -> MatMul as MatMulIntegerToFloat; nor does a Gemm once its
    bias is stored as int32 (QGemm with a float output), so logits are not quantized."""
    from onnx import helper

    model = onnx.load(str(path))
    consts = _const_arrays(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = _consumers(model)
    graph_inputs = {i.name for i in model.graph.input}

    def dq_of_const(name: str) -> bool:
        n = producers.get(name)
        if n is not None and n.op_type == "Transpose":  # a Linear exported as MatMul
            n = producers.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear" and n.input[0] in consts

    into: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # tensor -> layers reading it
    after: list[str] = []  # conv outputs
    to_stream: list[onnx.NodeProto] = []  # convs that write a LayerNorm stream: ConvInteger
    for n in model.graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2 or not dq_of_const(n.input[1]):
            continue
        act = n.input[0]
        source = producers.get(act)
        if source is None and act not in graph_inputs:
            continue
        if source is None or source.op_type != "DequantizeLinear":
            into[act].append(n)
        users = consumers[n.output[0]]
        if users and all(u.op_type == "QuantizeLinear" for u in users):
            continue
        if n.op_type == "Conv":
            if _group(n) == 1 and _opens_stream(n.output[0], consumers):
                to_stream.append(n)
            else:
                after.append(n.output[0])
    wanted = list(dict.fromkeys([*after, *into]))
    ranges = _observe(model, wanted, batches) if wanted else {}
    wanted = [t for t in wanted if t in ranges]
    done = [f"{_name(n)} output" for t in wanted if t in after for n in [producers[t]]]
    done += [f"{_name(n)} input" for t in wanted if t in into for n in into[t]]
    inserted_after: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for t in wanted:
        lo, hi = ranges[t]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        zp = int(np.clip(np.rint(-lo / scale), 0, 255))
        s_name, z_name = f"{t}_cscale", f"{t}_czp"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, np.float32), s_name),
            numpy_helper.from_array(np.array(zp, np.uint8), z_name)])
        if t in after:  # the conv writes a float tensor a Q/DQ pair hands on under its name
            src, out = f"{t}_cfloat", t
            producers[t].output[0] = src
        else:  # the layers read a quantized copy; other readers keep the float tensor
            src, out = t, f"{t}_cdq"
            for layer in into[t]:
                layer.input[0] = out
        nodes = [helper.make_node("QuantizeLinear", [src, s_name, z_name], [f"{t}_cq"]),
                 helper.make_node("DequantizeLinear", [f"{t}_cq", s_name, z_name], [out])]
        inserted_after[src] += nodes
    _insert_after(model, inserted_after)
    done += [f"{_name(n)} as ConvInteger with a float output" for n in to_stream
             if _conv_integer(model, n)]
    done += _int32_biases(model)
    if done:
        onnx.save(model, str(path))
    return done


def _insert_after(model: onnx.ModelProto, after: dict[str, list[onnx.NodeProto]]) -> None:
    """Put the nodes of `after[t]` right after the node that writes tensor t, or first when no
    node writes it (a graph input), so the graph stays topologically sorted."""
    written = {o for n in model.graph.node for o in n.output}
    order = [q for t, nodes in after.items() if t not in written for q in nodes]
    for n in model.graph.node:
        order.append(n)
        for o in n.output:
            order += after.get(o, [])
    del model.graph.node[:]
    model.graph.node.extend(order)


def _name(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]}"


STREAM_PASS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Add",
               "Identity", "Dropout"}
"""Ops a patch embedding's output passes through on its way to the first LayerNorm."""


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _opens_stream(tensor: str, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether `tensor` reaches a LayerNormalization through shape ops, concatenations and
    additions only (a patch embedding, its class token and position table), unquantized."""
    seen, todo = set(), [tensor]
    while todo:
        t = todo.pop()
        for u in consumers.get(t, []):
            if u.op_type == "LayerNormalization":
                return True
            if u.op_type in STREAM_PASS and u.output[0] not in seen:
                seen.add(u.output[0])
                todo.append(u.output[0])
    return False


def _conv_integer(model: onnx.ModelProto, conv: onnx.NodeProto) -> bool:
    """Rewrite DQ(x) -> Conv(DQ(w), b) as ConvInteger(x_q, w_q) -> Cast -> Mul(x_scale *
    w_scale) [-> Add(b)]: the same integer products, summed in int32 and scaled to float, with
    no 8-bit rounding of the output. False (and nothing changed) where the conv's inputs are
    not a uint8 activation and int8 weights behind DequantizeLinear."""
    from onnx import helper

    consts = _const_arrays(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    x_dq, w_dq = producers.get(conv.input[0]), producers.get(conv.input[1])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" \
            or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in consts \
            or any(i not in consts for i in x_dq.input[1:]) or len(x_dq.input) < 3:
        return False
    w_q, x_zp = consts[w_dq.input[0]], consts[x_dq.input[2]]
    if w_q.dtype != np.int8 or x_zp.dtype != np.uint8 or x_zp.size != 1:
        return False
    out = w_q.shape[0]
    w_scale = consts[w_dq.input[1]].astype(np.float32).reshape(-1)
    w_zp = consts[w_dq.input[2]].reshape(-1) if len(w_dq.input) > 2 and w_dq.input[2] \
        else np.zeros(1, np.int8)
    if np.any(w_zp != 0) or w_scale.size not in (1, out):
        return False
    x_scale = float(consts[x_dq.input[1]].reshape(-1)[0])
    base = conv.output[0]
    scale = (x_scale * w_scale * np.ones(out, np.float32)).reshape(1, out, 1, 1)
    inits = [numpy_helper.from_array(scale.astype(np.float32), f"{base}_iscale"),
             numpy_helper.from_array(np.zeros((), np.int8), f"{base}_wzp")]
    nodes = [helper.make_node("ConvInteger", [x_dq.input[0], w_dq.input[0], x_dq.input[2],
                                              f"{base}_wzp"], [f"{base}_i32"],
                              name=f"{conv.name or base}_integer"),
             helper.make_node("Cast", [f"{base}_i32"], [f"{base}_f"], to=onnx.TensorProto.FLOAT)]
    nodes[0].attribute.extend(a for a in conv.attribute)
    bias = consts.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if len(conv.input) > 2 and conv.input[2] and bias is None:
        return False  # a bias computed in the graph: leave the conv as it is
    if bias is None:
        nodes.append(helper.make_node("Mul", [f"{base}_f", f"{base}_iscale"], [base]))
    else:
        inits.append(numpy_helper.from_array(
            bias.astype(np.float32).reshape(1, out, 1, 1), f"{base}_ibias"))
        nodes += [helper.make_node("Mul", [f"{base}_f", f"{base}_iscale"], [f"{base}_s"]),
                  helper.make_node("Add", [f"{base}_s", f"{base}_ibias"], [base])]
    model.graph.initializer.extend(inits)
    at = list(model.graph.node).index(conv)
    model.graph.node.remove(conv)
    for i, node in enumerate(nodes):
        model.graph.node.insert(at + i, node)
    _drop_dead(model)
    return True


def _int32_biases(model: onnx.ModelProto) -> list[str]:
    """Store each float Conv and Gemm bias as int32 behind a DequantizeLinear (scale: input
    scale times weight scale, zero point 0), as onnxruntime's own quantizer does. Its QDQ Gemm
    fusion wants every input dequantized, and then runs QGemm even with a float output (the
    logits); and for a Conv, onnxruntime's WeightBiasQuantization would otherwise do it at
    load time, out of sight of the graph the parity check simulates. Returns the layers
    changed."""
    from onnx import helper

    consts = _const_arrays(model)
    producers = {o: n for n in model.graph.node for o in n.output}

    def dq_scale(name: str) -> np.ndarray | None:
        n = producers.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.input[1] not in consts:
            return None
        return consts[n.input[1]].astype(np.float32)

    changed = []
    for n in list(model.graph.node):
        if n.op_type not in ("Gemm", "Conv") or len(n.input) < 3 or n.input[2] not in consts \
                or consts[n.input[2]].dtype != np.float32:
            continue
        a_scale, w_scale = dq_scale(n.input[0]), dq_scale(n.input[1])
        bias = consts[n.input[2]]
        if a_scale is None or w_scale is None or a_scale.size != 1 or bias.ndim != 1 \
                or w_scale.size not in (1, bias.size):
            continue
        if w_scale.size == bias.size:
            w_scale = _widen_for_bias(model, producers[n.input[1]], consts, bias,
                                      float(a_scale.reshape(-1)[0]))
        scale = (a_scale.reshape(-1)[0] * w_scale.reshape(-1) * np.ones(bias.size)).astype(
            np.float32)
        q = np.clip(np.rint(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{n.output[0]}_bias"
        model.graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_q"),
            numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.zeros(bias.size, np.int32), f"{base}_zp")])
        dq = helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"],
                              [base], axis=0)
        n.input[2] = base
        model.graph.node.insert(list(model.graph.node).index(n), dq)
        changed.append(f"{_name(n)} bias as int32")
    return changed


def _widen_for_bias(model: onnx.ModelProto, weight_dq: onnx.NodeProto,
                    consts: dict[str, np.ndarray], bias: np.ndarray,
                    a_scale: float) -> np.ndarray:
    """Per-channel weight scales, widened where bias / (input scale x weight scale) would
    overflow int32 (a channel whose weights are all but zero), with that channel's int8
    weights requantized to the wider scale: what onnxruntime's quantizer does, instead of
    clipping the bias, which loses it. Returns the scales in use."""
    w_scale = consts[weight_dq.input[1]].astype(np.float32).reshape(-1)
    need = np.abs(bias) / (a_scale * (2**31 - 1)) * 1.01
    wider = need > w_scale
    if not wider.any() or weight_dq.input[0] not in consts:
        return w_scale
    q = consts[weight_dq.input[0]]
    axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1) % q.ndim
    new_scale = np.where(wider, need, w_scale).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    info = np.iinfo(q.dtype)
    ratio = (w_scale / new_scale).reshape(shape)
    requantized = np.clip(np.rint(q.astype(np.float32) * ratio), info.min, info.max)
    for init in model.graph.initializer:
        if init.name == weight_dq.input[0]:
            init.CopyFrom(numpy_helper.from_array(requantized.astype(q.dtype), init.name))
        elif init.name == weight_dq.input[1]:
            init.CopyFrom(numpy_helper.from_array(
                new_scale.reshape(consts[weight_dq.input[1]].shape), init.name))
    return new_scale


def _observe(model: onnx.ModelProto, tensors: list[str],
             batches: list[Any]) -> dict[str, tuple[float, float]]:
    """Min and max of float `tensors` of the graph over `batches`, run unoptimised."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from compresskit.models import inputs
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for x in batches:
        x = inputs.apply(x, lambda v: v.numpy() if hasattr(v, "numpy") else v)
        values = sess.run(tensors, inputs.feeds(names, x))
        for t, v in zip(tensors, values, strict=True):
            if not np.issubdtype(v.dtype, np.floating) or v.size == 0:
                continue
            lo, hi = float(v.min()), float(v.max())
            old = ranges.get(t)
            ranges[t] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return ranges


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

    from compresskit.models import inputs
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
        excluded = _shape_only_nodes(pre)
        if dynamic:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8,
                             per_channel=per_channel, reduce_range=reduce_range,
                             op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                             nodes_to_exclude=excluded)
        else:
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=per_channel, reduce_range=reduce_range,
                            nodes_to_exclude=excluded)
    model = onnx.load(str(out))
    _shapes_past_quantizers(model)
    _compact(model)
    onnx.save(model, str(out))


def _shape_only_nodes(path: Path) -> list[str]:
    """The nodes whose outputs depend on no input's values, only on shapes and constants
    (position ids and relative-position buckets); they are named in the file if they were
    not. Calibrating them quantizes arithmetic that runs once per shape and may hold
    infinities: HF MPNet's relative-position buckets take log(0) = -inf where a Where then
    picks the other branch; calibrated, the quantizer's scale was infinite, every bucket a
    NaN cast to int64, and onnxruntime's Gather refused index -9223372036854775784."""
    model = onnx.load(str(path))
    live = {i.name for i in model.graph.input}
    out = []
    for k, n in enumerate(model.graph.node):
        if n.op_type not in ("Shape", "Size") and any(i in live for i in n.input):
            live.update(n.output)
        elif n.op_type not in ("Shape", "Size", "Constant"):
            if not n.name:
                n.name = f"compresskit_shape_only_{k}"
            out.append(n.name)
    if any(name.startswith("compresskit_shape_only_") for name in out):
        onnx.save(model, str(path))
    return out


# -- float fallback (max_drop) ----------------------------------------------------------------
def layer_id(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def integer_layers(path: Path) -> list[str]:
    """The layers of a QDQ file onnxruntime can run as integer code, in graph order: weighted
    layers (Conv/Gemm/MatMul) whose weight and activation both come dequantized, and MatMuls
    of two dequantized activations (attention's query-key and probability-value products)."""
    model = onnx.load(str(path))
    consts = _const_arrays(model)
    producers = {o: n for n in model.graph.node for o in n.output}

    def dequantized(name: str, const: bool) -> bool:
        n = producers.get(name)
        if n is not None and n.op_type == "Transpose" and const:
            n = producers.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear" and (n.input[0] in consts) == const

    return [layer_id(n) for n in model.graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) >= 2
            and dequantized(n.input[0], False) and (
                dequantized(n.input[1], True)
                or (n.op_type == "MatMul" and dequantized(n.input[1], False)))]


def _dequantize(consts: dict[str, np.ndarray], node: onnx.NodeProto) -> np.ndarray:
    q = consts[node.input[0]].astype(np.float32)
    scale = consts[node.input[1]].astype(np.float32)
    zero = consts[node.input[2]].astype(np.float32) if len(node.input) > 2 and node.input[2] \
        else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:  # per channel, along `axis`
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def keep_float(source: Path, out: Path, layers: Iterable[str]) -> None:
    """A copy of a QDQ file in which `layers` (ids from `integer_layers`) run in float: each
    reads the float tensor its activation quantizer was given, and float weights and biases
    (the dequantized values, so a QAT layer keeps the weights it was trained with). Nothing
    else changes: the next layer still reads its quantized input, except where `close_qdq`
    quantized a conv's output only so that the conv could run as integer code and no layer
    reads that quantized tensor: that frame goes with its conv (a ViT's patch embedding
    feeds the residual stream, whose 8-bit copy cost its accuracy)."""
    model = onnx.load(str(source))
    consts = _const_arrays(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = _consumers(model)
    wanted = set(layers)
    folded: dict[str, str] = {}
    clipped: dict[str, str] = {}
    added: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if layer_id(node) not in wanted:
            continue
        _drop_output_frame(model, node, consumers)
        for i, name in enumerate(node.input):
            p = producers.get(name)
            perm = None
            if p is not None and p.op_type == "Transpose":
                perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
                p = producers.get(p.input[0])
                if p is None or p.op_type != "DequantizeLinear" or p.input[0] not in consts:
                    continue
            if p is None or p.op_type != "DequantizeLinear":
                continue
            if p.input[0] in consts:
                if name not in folded:
                    w = _dequantize(consts, p)
                    w = np.transpose(w, perm) if perm is not None else w
                    folded[name] = f"{name}_float"
                    model.graph.initializer.append(numpy_helper.from_array(w, folded[name]))
                node.input[i] = folded[name]
            else:
                q = producers.get(p.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    if q.output[0] not in clipped:
                        clipped[q.output[0]] = _clip_like(model, consts, q, added)
                    node.input[i] = clipped[q.output[0]]
    _insert_after(model, added)  # each Clip right after the tensor it clips
    _drop_dead(model)
    onnx.save(model, str(out))


def _drop_output_frame(model: onnx.ModelProto, node: onnx.NodeProto,
                       consumers: dict[str, list[onnx.NodeProto]]) -> None:
    """Take out the Q/DQ pair `close_qdq` put after `node`'s output (tensor t written as
    t_cfloat), when no weighted layer reads t: then it quantized the output only for `node`."""
    src = node.output[0]
    if not src.endswith("_cfloat") or len(consumers[src]) != 1:
        return
    q = consumers[src][0]
    dqs = consumers[q.output[0]] if q.op_type == "QuantizeLinear" else []
    if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
        return
    t = dqs[0].output[0]
    if any(u.op_type in WEIGHTED_OPS for u in consumers[t]):
        return
    node.output[0] = t
    model.graph.node.remove(q)
    model.graph.node.remove(dqs[0])


def _clip_like(model: onnx.ModelProto, consts: dict[str, np.ndarray], q: onnx.NodeProto,
               added: dict[str, list[onnx.NodeProto]]) -> str:
    """The float tensor a QuantizeLinear reads, clipped to the range it can represent: a
    quantizer also clips (onnxruntime's quantizer drops a ReLU whose uint8 quantizer has zero
    point 0), and its layer in float must still see what the integer one saw, less rounding."""
    from onnx import helper

    scale = float(consts[q.input[1]].reshape(-1)[0])
    zp_array = consts[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    info = np.iinfo(zp_array.dtype)
    zero = float(zp_array.reshape(-1)[0])
    lo, hi = (info.min - zero) * scale, (info.max - zero) * scale
    src = q.input[0]
    out = f"{src}_clip{sum(map(len, added.values()))}"
    bounds = [numpy_helper.from_array(np.array(v, np.float32), f"{out}_{k}")
              for k, v in (("lo", lo), ("hi", hi))]
    model.graph.initializer.extend(bounds)
    added[src].append(helper.make_node("Clip", [src, bounds[0].name, bounds[1].name], [out]))
    return out


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes nothing reads any more, then initializers nothing reads."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
