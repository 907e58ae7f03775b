"""A causal LM as a KV-cache ONNX decoder, and its INT8 and INT4 files.

The FP32 decoder comes from onnxruntime-genai's model builder (`python -m
onnxruntime_genai.models.builder`, run as a child process on a plain transformers folder of the
model's weights): it writes the layout onnxruntime-genai runs, with GroupQueryAttention and
rotary embeddings fused. The builder covers the architectures it lists (Llama, Mistral, Qwen,
Phi, Gemma, ...); another architecture is a clear error naming it. Every file is checked
against torch before it is published: logits without past and with past, and greedy tokens.

INT8 is onnxruntime's dynamic quantization of the FP32 file (MatMulInteger, activations
quantized per call). INT4 is the builder's weight-only MatMulNBits (block-wise scales; the
embedding table shares the LM head's INT4 weights), built from the same weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compresskit.engine.artifacts import Artifact, sha256_file
from compresskit.lm import models as lm_models
from compresskit.lm.decoder import Decoder, folder_bytes

BUILDER = "onnxruntime_genai.models.builder"
INSTALL = "pip install onnxruntime-genai onnx-ir"


class LMExportError(Exception):
    """The decoder could not be built or does not compute what torch computes."""


def builder_available() -> str | None:
    """None when the model builder imports, else why not."""
    import importlib.util

    for module in ("onnxruntime_genai", "onnx_ir"):
        if importlib.util.find_spec(module) is None:
            return f"the KV-cache export needs {module}; {INSTALL}"
    return None


def build(hf_folder: Path, out: Path, precision: str, extra: dict[str, Any] | None = None,
          log: Any = None) -> Path:
    """Run the model builder on a transformers folder; the decoder's model.onnx."""
    why = builder_available()
    if why:
        raise LMExportError(why)
    cache = out.parent / f".{out.name}.cache"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", BUILDER, "-i", str(hf_folder), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    if extra:
        cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(cache, ignore_errors=True)
    model = out / "model.onnx"
    if done.returncode != 0 or not model.exists():
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
                    lines[-1] if lines else "no output")
        raise LMExportError(f"onnxruntime-genai's model builder could not write a {precision} "
                            f"decoder: {last.strip()[:300]}")
    return model


def parity(model: nn.Module, path: Path, ids: torch.Tensor, atol: float,
           greedy_tokens: int = 32) -> dict[str, Any]:
    """The decoder against torch: logits of a block without past, of its second half after
    the first half's past, and `greedy_tokens` greedy tokens from its first 16."""
    m = lm_models.unwrap(model).eval()
    dec = Decoder(path)
    with torch.no_grad():
        ref = m(input_ids=ids[None], use_cache=False).logits[0].float().numpy()
    full, _ = dec(ids[None].numpy())
    half = ids.shape[0] // 2
    _, past = dec(ids[None, :half].numpy())
    rest, _ = dec(ids[None, half:].numpy(), past)
    scale = float(np.abs(ref).max())
    out: dict[str, Any] = {"max_abs_diff": float(np.abs(full[0] - ref).max()),
           "max_abs_diff_with_past": float(np.abs(rest[0] - ref[half:]).max()),
           "logit_scale": scale}
    prompt = [int(t) for t in ids[:16]]
    want = lm_models.greedy(m, ids[None, :16], greedy_tokens)
    got = dec.greedy(prompt, greedy_tokens)
    out["greedy_tokens"] = greedy_tokens
    out["greedy_match"] = sum(1 for a, b in zip(want, got, strict=True) if a == b) \
        if len(want) == len(got) else 0
    out["greedy_first_mismatch"] = next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
    out["ok"] = out["max_abs_diff"] <= atol * max(1.0, scale) and \
        out["max_abs_diff_with_past"] <= atol * max(1.0, scale) and \
        out["greedy_first_mismatch"] is None
    return out


def dynamic_int8(fp32: Path, out: Path) -> Path:
    """onnxruntime's dynamic INT8 of the decoder's MatMuls (weights per channel, int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.onnx"
    quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (fp32.parent / name).exists():
            shutil.copy(fp32.parent / name, out / name)
    return target


def coverage(path: Path) -> dict[str, Any]:
    """Which weight MatMuls run quantized: MatMulNBits / MatMulInteger / DynamicQuantizeMatMul
    against the MatMuls left in float, by count and by weight elements, and the float ones by
    name (as int8_coverage names what stays float)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    quantized_ops = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                     "MatMulIntegerToFloat", "GatherBlockQuantized"}
    q_elems = f_elems = 0
    floats: list[str] = []
    count = 0
    bits: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in quantized_ops:
            count += 1
            if node.op_type == "MatMulNBits":
                k = next((a.i for a in node.attribute if a.name == "K"), 0)
                n = next((a.i for a in node.attribute if a.name == "N"), 0)
                b = next((a.i for a in node.attribute if a.name == "bits"), 4)
                bits[f"int{b}"] = bits.get(f"int{b}", 0) + 1
                q_elems += k * n
            else:
                w = next((shapes[i] for i in node.input[1:2] if i in shapes), [])
                q_elems += int(np.prod(w)) if w else 0
        elif node.op_type in ("MatMul", "Gemm") and any(i in shapes for i in node.input[1:2]):
            f_elems += int(np.prod(shapes[node.input[1]]))
            floats.append(node.name)
    total = q_elems + f_elems
    return {"quantized_matmuls": count, "float_matmuls": floats,
            "weight_only_bits": bits, "weight_coverage": q_elems / total if total else 0.0}


def artifact(run_dir: Path, path: Path, precision: str, model: str, method: str | None,
             extra: dict[str, Any] | None = None) -> Artifact:
    h = __import__("hashlib").sha256()
    for f in sorted(path.parent.iterdir()):
        if f.is_file() and f.name.startswith(path.name):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    out: dict[str, Any] = {"path": path.relative_to(run_dir).as_posix(), "format": "decoder",
                           "precision": precision, "model": model,
                           "bytes": folder_bytes(path), "sha256": h.hexdigest(),
                           "method": method, **(extra or {})}
    return out  # type: ignore[return-value]
