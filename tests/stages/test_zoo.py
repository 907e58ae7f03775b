"""Every compressing stage on models nobody wrote for compresskit (tests/zoo/models.py), each
referenced from a pipeline file through models.py:callable, each fed by a different built-in
data source (digits_rgb32, folder, csv, npz)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compresskit import api

ZOO = Path(__file__).resolve().parents[1] / "zoo"


def _images(root: Path) -> Path:
    """80 PNGs per class of scikit-learn's digits, in one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True)
        for i, img in enumerate(x[y == c][:80]):
            Image.fromarray((img.reshape(8, 8) * 16).clip(0, 255).astype(np.uint8)).save(
                root / f"class_{c}" / f"{i}.png")
    return root


def _wine(path: Path) -> Path:
    from sklearn.datasets import load_wine

    data = load_wine()
    header = [n.replace("/", "_") for n in data.feature_names] + ["cultivar"]
    rows = [",".join(header)] + [",".join([*(f"{v:g}" for v in row), f"c{label}"])
                                 for row, label in zip(data.data, data.target, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _tokens(path: Path, n: int = 600, length: int = 16, seed: int = 0) -> Path:
    """Token sequences of random length (padded with 0, masked); label: token 7 occurs."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, length), dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    label = rng.integers(0, 2, n)
    for i in range(n):
        t = int(rng.integers(6, length + 1))
        seq = rng.integers(8, 32, t)
        if label[i]:
            seq[rng.integers(0, t)] = 7
        ids[i, :t], mask[i, :t] = seq, 1
    np.savez(path, input_ids=ids, attention_mask=mask, label=label)
    return path


DATA = {"resnet": None, "mobilenet": _images, "mlp": _wine, "transformer": _tokens}
CHANCE = {"resnet": 0.1, "mobilenet": 0.1, "mlp": 1 / 3, "transformer": 0.5}
TARGET = {"mobilenet": "images", "mlp": "wine.csv", "transformer": "tokens.npz"}


@pytest.mark.parametrize("name", list(DATA))
def test_every_stage_on_a_model_from_a_file(name: str, tmp_path: Path) -> None:
    overrides = []
    maker = DATA[name]
    if maker is not None:
        made = maker(tmp_path / TARGET[name])
        overrides.append(f"data.kwargs.path={made}")
    pipeline = tmp_path / f"{name}.yaml"  # beside a copy of models.py, as a user's would be
    shutil.copy(ZOO / f"{name}.yaml", pipeline)
    shutil.copy(ZOO / "models.py", tmp_path / "models.py")
    report = api.run(pipeline, overrides, output_dir=tmp_path / "run", show_progress=False)
    stages = {s["type"]: s["metrics"] for s in report["stages"]}
    assert all(s["status"] == "done" for s in report["stages"])
    assert stages["prune"]["after"]["params"] < stages["prune"]["before"]["params"]
    assert stages["lowrank"]["factorized"], "no layer was factorised"
    assert stages["train"]["accuracy"] > CHANCE[name] + 0.15  # the teacher learned something
    int8 = [a for a in report["artifacts"] if a["precision"] == "int8"]
    assert int8 and all(a["int8_coverage"] >= 0.9 for a in int8)
    assert stages["ptq"]["accuracy"] >= stages["ptq"]["fp32_accuracy"] - 0.1
    benched = {b["artifact"] for b in report["benchmarks"]}
    assert benched == {a["path"] for a in report["artifacts"] if a["format"] == "onnx"}
    assert all(b["latency_ms"]["p50"] > 0 for b in report["benchmarks"])
    if name == "transformer":  # two integer inputs with a dynamic sequence axis
        import onnx

        graph = onnx.load(str(tmp_path / "run" / "artifacts" / "student.fp32.onnx")).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
        assert graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"
        assert {b["length"] for b in report["benchmarks"]} == {8, 16}
