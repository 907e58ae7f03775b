"""The teacher-output cache: built once, reused by later stages and reruns, equal to the live
teacher, rebuilt when corrupt or stale, and never used on randomly augmented data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from compresskit import api
from compresskit.errors import StageError

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "models/digits.py"


def pipeline(*stages: dict, data: dict | None = None) -> dict:
    return {
        "name": "cache", "data": data or {"source": "digits", "batch_size": 64},
        "input": {"shape": [1, 8, 8]},
        "teacher": {"source": f"{DIGITS}:teacher", "kwargs": {"width": 8}},
        "student": {"source": f"{DIGITS}:student", "kwargs": {"width": 2}},
        "stages": [{"type": "train", "model": "teacher", "epochs": 1, "lr": 0.01}, *stages],
    }


def run(cfg: dict, out: Path, force: bool = False) -> tuple[dict, str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=400)
    report = api.run(cfg, base_dir=ROOT, output_dir=out, show_progress=False, console=console,
                     force=force)
    return report, buffer.getvalue()


DISTILL = {"type": "distill", "epochs": 1, "lr": 0.01,
           "losses": [{"type": "kl"}, {"type": "features", "student": "features",
                                       "teacher": "features"}]}
PRUNE = {"type": "prune", "ratio": 0.3, "recover": 1, "latency_runs": 10}


def test_cache_is_built_once_reused_and_equals_the_live_teacher(tmp_path):
    out = tmp_path / "run"
    _, log = run(pipeline(DISTILL, PRUNE), out)
    assert "caching 2 teacher output(s) for 1,293 training samples" in log
    # prune recovery needs only the logits, which the distill stage cached
    assert "teacher outputs from the cache (teacher)" in log
    files = {p.name for p in (out / "cache").iterdir()}
    assert files == {"teacher.json", "teacher.npy", "teacher--features.json",
                     "teacher--features.npy"}
    logits = np.load(out / "cache" / "teacher.npy")
    features = np.load(out / "cache" / "teacher--features.npy")
    assert logits.shape == (1293, 10) and features.shape == (1293, 16, 4, 4)
    # equal to what the trained teacher computes live, sample by sample
    from compresskit.data.sources import digits
    from models.digits import teacher

    model = teacher(width=8)
    model.load_state_dict(torch.load(out / "00-train" / "teacher.pt", weights_only=True))
    x = digits()["train"].tensors[0]
    with torch.no_grad():
        live = model.eval()(x).numpy()
    np.testing.assert_allclose(logits, live, rtol=1e-4, atol=1e-5)
    # a forced rerun reuses the files (same teacher weights, same data)
    _, log = run(pipeline(DISTILL, PRUNE), out, force=True)
    assert "caching" not in log and log.count("from the cache") == 2


def test_corrupt_and_stale_cache_files_are_rebuilt(tmp_path):
    out = tmp_path / "run"
    run(pipeline(DISTILL), out)
    npy = out / "cache" / "teacher.npy"
    good = npy.read_bytes()
    npy.write_bytes(good[:-8] + b"\0" * 8)
    meta = out / "cache" / "teacher--features.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "key": "0" * 64}))
    _, log = run(pipeline(DISTILL), out, force=True)
    assert "teacher.npy is corrupt (its content does not match the sha256" in log
    assert "teacher--features.npy is stale (the teacher's weights, the data" in log
    assert npy.read_bytes() == good
    assert json.loads(meta.read_text())["key"] == record["key"]


def test_other_teacher_weights_make_the_cache_stale(tmp_path):
    out = tmp_path / "run"
    run(pipeline(DISTILL), out)
    cfg = pipeline(DISTILL)
    cfg["stages"][0]["epochs"] = 2  # another teacher
    _, log = run(cfg, out)
    assert "teacher.npy is stale" in log


AUGMENTED = '''
import torch
from torch.utils.data import Dataset

from compresskit.data.sources import digits


class Jitter(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x + 0.05 * torch.randn_like(x), y


def make():
    splits = digits()
    splits["train"] = Jitter(splits["train"])
    return splits
'''


def test_augmented_data_is_never_cached(tmp_path):
    (tmp_path / "aug.py").write_text(AUGMENTED)
    data = {"source": str(tmp_path / "aug.py") + ":make", "batch_size": 64}
    out = tmp_path / "run"
    _, log = run(pipeline(DISTILL, data=data), out)
    assert "randomly augmented" in log and not (out / "cache").exists()
    forced = pipeline({**DISTILL, "cache_teacher": True}, data=data)
    with pytest.raises(StageError, match="random augmentation"):
        run(forced, tmp_path / "forced")


def test_cache_off_and_half_precision(tmp_path):
    out = tmp_path / "run"
    run(pipeline({**DISTILL, "cache_teacher": False}), out)
    assert not (out / "cache").exists()
    run(pipeline({**DISTILL, "cache_precision": "float16"}), tmp_path / "half")
    assert np.load(tmp_path / "half" / "cache" / "teacher.npy").dtype == np.float16
