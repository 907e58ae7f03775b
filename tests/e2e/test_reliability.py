"""Interruption, concurrency, numerical faults, untrusted files, full disks: nothing is lost."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compresskit import api
from compresskit.errors import ConfigError, StageError
from tests.conftest import ROOT, TINY, without_timings, workspace_with_models

RESUMABLE = """\
name: resume
seed: 3
data: {source: digits, batch_size: 32}
input: {shape: [1, 8, 8]}
teacher: {source: models/digits.py:teacher, kwargs: {width: 6}}
student: {source: models/digits.py:student, kwargs: {width: 3}}
stages:
  - {type: train, model: teacher, epochs: 3}
  - {type: distill, epochs: 3, baseline: true}
  - {type: export}
  - {type: benchmark, batch_sizes: [1], runs: 10, warmup: 1, memory: false}
"""


def cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "compresskit", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def outcome(run: Path) -> dict:
    """Everything a run produces except timings: metrics, parameters, artifact bytes."""
    report = json.loads((run / "report.json").read_text())
    return {
        "stages": [(s["type"], s["params"], without_timings(s["metrics"]))
                   for s in report["stages"]
                   if s["type"] != "benchmark"],
        # ONNX files are byte-reproducible; the bundle's model.ort is not (onnxruntime's
        # flatbuffer writer orders its tables differently each time) and its manifest and
        # README state measured latency.
        "artifacts": [(a["path"], a["sha256"]) for a in report["artifacts"]
                      if a["path"].endswith(".onnx")],
        "onnx_accuracy": [(b["artifact"], b["accuracy"]) for b in report["benchmarks"]],
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = workspace_with_models(tmp_path_factory.mktemp("reliability"))
    (tmp / "resume.yaml").write_text(RESUMABLE)
    proc = cli(["run", "resume.yaml", "-o", "reference"], tmp)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return tmp


# Kill points: mid teacher training, mid distillation, mid baseline, and between stages.
KILL_WHEN = [".00-train.partial/train.resume.pt", ".01-distill.partial/student.resume.pt",
             ".01-distill.partial/baseline.resume.pt", "02-export/manifest.json"]


@pytest.mark.parametrize("marker", KILL_WHEN)
def test_sigkill_then_resume_gives_the_uninterrupted_result(workspace, marker):
    out = f"killed-{KILL_WHEN.index(marker)}"
    proc = cli(["run", "resume.yaml", "-o", out], workspace)
    deadline = time.monotonic() + 300
    while not (workspace / out / marker).exists():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (workspace / out / "report.json").exists() or marker.startswith("02")
    resumed = cli(["run", "resume.yaml", "-o", out], workspace)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    if "partial" in marker:
        assert "resuming from the interrupted run" in err
    assert outcome(workspace / out) == outcome(workspace / "reference")
    assert not list((workspace / out).glob(".*.partial"))


def test_sigterm_stops_cleanly_with_a_resume_hint(workspace):
    proc = cli(["run", "resume.yaml", "-o", "termed"], workspace)
    deadline = time.monotonic() + 300
    while not (workspace / "termed" / ".00-train.partial" / "train.resume.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted" in err and "run the same command to resume" in err
    assert "Traceback" not in err
    assert not (workspace / "termed" / ".lock").exists()


def test_second_run_on_the_same_folder_is_refused(workspace):
    run = workspace / "reference"
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "since": "now"}))
    try:
        proc = cli(["run", "resume.yaml", "-o", "reference"], workspace)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert f"is in use by compresskit (pid {os.getpid()} on {socket.gethostname()}" in err
    finally:
        (run / ".lock").unlink()


def test_stale_lock_is_taken_over(workspace):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = workspace / "reference"
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    proc = cli(["run", "resume.yaml", "-o", "reference"], workspace)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not (run / ".lock").exists()


def test_nan_keeps_last_good_checkpoint_and_writes_no_artifact(write_pipeline, tmp_path):
    (tmp_path / "models" / "late_nan.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class LateNaN(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(64, 10)\n        self.steps = 0\n\n"
        "    def forward(self, x):\n"
        "        self.steps += self.training\n"
        "        out = self.fc(x.flatten(1))\n"
        "        return out * float('nan') if self.steps > 60 else out\n\n"
        "def student():\n    return LateNaN()\n")
    path = write_pipeline(TINY.replace("models/digits.py:student, kwargs: {width: 2}",
                                       "models/late_nan.py:student"))
    with pytest.raises(StageError, match="the loss became nan at epoch 2"):
        api.run(path, output_dir=tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    assert (run / ".01-distill.partial" / "student.resume.pt").is_file()  # epoch 1, finite
    state = torch.load(run / ".01-distill.partial" / "student.resume.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "01-distill").exists() and not (run / "artifacts").exists()


def test_full_disk_fails_the_stage_and_keeps_earlier_work(tiny_pipeline, tmp_path, monkeypatch):
    run = tmp_path / "run"
    api.run(tiny_pipeline, output_dir=run, show_progress=False)
    before = {p: p.read_bytes() for p in (run / "artifacts").rglob("*") if p.is_file()}
    import compresskit.stages.export as export_stage

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_stage, "export_onnx", full)
    with pytest.raises(StageError, match="no space left on the device while writing"):
        api.run(tiny_pipeline, ["stages.2.opset=18"], output_dir=run, show_progress=False)
    assert {p: p.read_bytes() for p in (run / "artifacts").rglob("*") if p.is_file()} == before
    assert (run / "01-distill" / "manifest.json").is_file()


def test_manifest_pointing_outside_the_run_folder_is_not_trusted(tiny_pipeline, tmp_path):
    run = tmp_path / "run"
    api.run(tiny_pipeline, output_dir=run, show_progress=False)
    manifest = json.loads((run / "00-train" / "manifest.json").read_text())
    outside = tmp_path / "outside.pt"
    torch.save({"x": torch.zeros(1)}, outside)
    manifest["state"]["teacher"] = "../outside.pt"
    (run / "00-train" / "manifest.json").write_text(json.dumps(manifest))
    report = api.run(tiny_pipeline, output_dir=run, show_progress=False)
    assert report["stages"][0]["status"] == "done"  # recomputed, the escape was ignored
    assert json.loads((run / "00-train" / "manifest.json").read_text())["state"]["teacher"] == \
        "00-train/teacher.pt"


def test_safetensors_checkpoint_loads_and_pickles_do_not(write_pipeline, tmp_path):
    from safetensors.torch import save_file

    from models.digits import student

    save_file(student(2).state_dict(), str(tmp_path / "w.safetensors"))
    ok = write_pipeline(TINY.replace("kwargs: {width: 2}}",
                                     "kwargs: {width: 2}, checkpoint: w.safetensors}"), "ok.yaml")
    api.validate(ok)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    bad = write_pipeline(TINY.replace("kwargs: {width: 2}}",
                                      "kwargs: {width: 2}, checkpoint: evil.pt}"), "bad.yaml")
    with pytest.raises(ConfigError, match="cannot be read as a state_dict"):
        api.validate(bad)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
