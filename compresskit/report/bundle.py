"""The deployment bundle a mobile or edge app ships: artifacts/bundle/ and artifacts/bundle.zip.

model.onnx (the INT8 model when the pipeline made one, else FP32), model.ort (the same in ORT
format, for onnxruntime mobile), required_operators.config (for a minimal onnxruntime build),
manifest.json (inputs, outputs, preprocessing, labels, opset, measured accuracy and latency,
sha256 of every file) and README.md (how to load and run it in Python).
"""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compresskit import __version__
from compresskit.engine.artifacts import (
    Artifact,
    sha256_file,
    write_bytes,
    write_json,
    write_text,
)
from compresskit.ops.latency import fmt_ms

PREFERENCE = ("qat+kd", "qat+self-kd", "qat", "ptq")
"""Which INT8 artifact of the model goes in the bundle, best first."""

README = """# {name}: deployment bundle

Made by compresskit {version} from `{source}` ({precision}{method}). Measured on the machine that
built it: {metric} {accuracy} on the {split} split, batch-1 p50 latency {latency} on the
`edge` target (one thread, ORT format).

| file | what it is |
| --- | --- |
| `model.ort` | the model in ORT format, for onnxruntime mobile and minimal builds |
| `model.onnx` | the same model as ONNX |
| `required_operators.config` | operators a reduced onnxruntime build needs |
| `manifest.json` | inputs, outputs, preprocessing, labels, figures, sha256 of every file |

Preprocessing: {preprocessing}

Run it with onnxruntime >= {ort_version} and numpy:

```python
import json

import numpy as np
import onnxruntime as ort

manifest = json.load(open("manifest.json"))
session = ort.InferenceSession("model.ort", providers=["CPUExecutionProvider"])
spec = manifest["inputs"][0]
shape = [1 if d == "batch" else d for d in spec["shape"]]
x = np.zeros(shape, dtype=spec["dtype"])  # your preprocessed input goes here
scores = session.run(None, {{spec["name"]: x}})[0]
label = int(scores.argmax(axis=1)[0])
print("predicted:", manifest["labels"][label] if manifest["labels"] else label)
```
"""


def pick(artifacts: list[Artifact], model: str) -> Artifact | None:
    """The INT8 artifact of `model` to ship, or None when the pipeline made none."""
    int8 = [a for a in artifacts if a.get("precision") == "int8"
            and (a.get("model") or "student") == model and a.get("method") in PREFERENCE]
    return min(int8, key=lambda a: PREFERENCE.index(a["method"])) if int8 else None


def _shape(dims: list[Any]) -> list[Any]:
    return ["batch" if i == 0 and not isinstance(d, int) else d for i, d in enumerate(dims)]


def build(run_dir: Path, source: Artifact, work: Path, x: np.ndarray, y: np.ndarray,
          info: dict[str, Any]) -> list[Artifact]:
    """Write the bundle for artifact `source` (a record of run_dir/artifacts) and return the
    artifact records of the bundle folder's files and of the zip. `x`, `y`: the evaluation
    split, for the accuracy the manifest states; `info`: name, preprocessing, labels, split."""
    import onnx

    from compresskit.backends import ort as backend
    from compresskit.measure import bench, quality
    from compresskit.measure.targets import TARGETS
    from compresskit.models import inputs

    staged = work / "bundle"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    shutil.copyfile(run_dir / source["path"], staged / "model.onnx")
    converted = backend.to_ort_format(staged / "model.onnx", work / "ort")
    shutil.copyfile(converted, staged / "model.ort")
    backend.required_operators(staged / "model.ort", staged / "required_operators.config")
    edge = TARGETS.get("edge")
    sess = backend.session(staged / "model.ort", edge, 1)
    task = info.get("task", "classify")
    scores = quality.score(task, backend.predict(sess, x, 256), y)
    accuracy = scores[quality.primary(task)]
    rows = bench.measure({"model.ort": staged / "model.ort"}, edge,
                         bench.Settings(runs=100, warmup=10, memory=False),
                         lambda s, bs: inputs.feeds(backend.input_names(s),
                                                    backend.batch_of(x, bs)),
                         work / "ort")
    proto = onnx.load(str(staged / "model.onnx"), load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    dtypes = {i.name: str(np.dtype(backend.ORT_DTYPES[i.type])) for i in sess.get_inputs()}
    manifest = {
        "name": info["name"], "compresskit_version": __version__,
        "onnxruntime_version": backend.version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"file": "model.ort", "onnx": "model.onnx", "from": source["path"],
                  "precision": source.get("precision"), "method": source.get("method"),
                  "opset": opset},
        "inputs": [{"name": i.name, "shape": _shape(i.shape), "dtype": dtypes[i.name]}
                   for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "shape": _shape(o.shape),
                     "meaning": "scores (logits) per class: the largest is the prediction, "
                                "softmax turns them into probabilities"}
                    for o in sess.get_outputs()],
        "preprocessing": info["preprocessing"], "labels": info["labels"],
        "measured": {**scores, "split": info["split"], "samples": len(y),
                     "edge_batch1_p50_ms": rows[0]["latency_ms"]["p50"],
                     "edge_cold_start_ms": rows[0]["cold_start"]},
    }
    write_text(staged / "README.md", README.format(
        name=info["name"], version=__version__, source=source["path"],
        precision=source.get("precision"),
        method=f", {source['method']}" if source.get("method") else "",
        accuracy=f"{accuracy:.4f}", split=info["split"],
        metric=quality.LABELS[quality.primary(task)],
        latency=fmt_ms(rows[0]["latency_ms"]["p50"]), preprocessing=info["preprocessing"],
        ort_version=backend.version()))
    manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(staged.iterdir())}
    write_json(staged / "manifest.json", manifest)
    # Replaced by renames, so an interrupted stage leaves the old bundle or the new one whole.
    final = run_dir / "artifacts" / "bundle"
    fresh, old = final.with_name(".bundle.new"), final.with_name(".bundle.old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(staged, fresh)
    if final.exists():
        final.rename(old)
    fresh.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(final.iterdir()):
            z.write(p, f"bundle/{p.name}")
    write_bytes(run_dir / "artifacts" / "bundle.zip", archive.getvalue())
    records: list[Artifact] = [{"path": f"artifacts/bundle/{p.name}", "format": "bundle",
                "precision": source.get("precision"), "model": source.get("model"),
                "bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in sorted(final.iterdir())]
    zipped = run_dir / "artifacts" / "bundle.zip"
    records.append({"path": "artifacts/bundle.zip", "format": "zip",
                    "precision": source.get("precision"), "model": source.get("model"),
                    "bytes": zipped.stat().st_size, "sha256": sha256_file(zipped)})
    return records
