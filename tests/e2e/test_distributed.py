"""Training stages under torchrun: gloo on CPU here, nccl on a GPU machine when there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY


def run(args: list[str], cwd, timeout: int = 900) -> subprocess.CompletedProcess:
    # One thread per process in both runs (torchrun sets the same for its workers), so the 1- and
    # 2-process runs differ only in the distribution, and 2 processes do not oversubscribe 2 cores.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "compresskit", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_processes_write_one_report_and_one_set_of_artifacts(tiny_pipeline, tmp_path):
    result = run([str(tiny_pipeline), "--nproc", "2", "-o", str(tmp_path / "ddp")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "launching: -m torch.distributed.run --standalone --nproc_per_node=2" in result.stderr
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done"] * 4
    assert sorted(p.name for p in (tmp_path / "ddp" / "artifacts").iterdir()) == [
        "bundle", "bundle.zip", "student.fp32.onnx", "teacher.fp32.onnx"]
    assert result.stdout.count("report:") == 1  # rank 0 alone speaks
    assert result.stderr.count("00-train: running") == 1
    # cached on the next distributed run, but not reused by a single-process run
    again = run([str(tiny_pipeline), "--nproc", "2", "-o", str(tmp_path / "ddp")], tmp_path)
    assert json.loads((tmp_path / "ddp" / "report.json").read_text())["stages"][0]["status"] \
        == "cached", again.stderr


def test_a_pruned_student_reaches_every_rank_from_the_cache(write_pipeline, tmp_path):
    """Rank 0 alone reads a cached prune stage; the other ranks rebuild the pruned structure from
    its manifest, so the weights rank 0 broadcasts before the next training stage fit."""
    prune = "  - {type: prune, ratio: 0.5, recover: 1, latency_runs: 10}\n"
    first = write_pipeline(TINY.replace("  - {type: export}\n", prune + "  - {type: export}\n"),
                           "first.yaml")
    result = run([str(first), "--nproc", "2", "-o", str(tmp_path / "ddp")], tmp_path)
    assert result.returncode == 0, result.stderr
    more = write_pipeline(TINY.replace("  - {type: export}\n", prune + "  - {type: distill, "
                                       "epochs: 1, lr: 0.01}\n  - {type: export}\n"),
                          "more.yaml")
    result = run([str(more), "--nproc", "2", "-o", str(tmp_path / "ddp")], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert [s["status"] for s in report["stages"]][:4] == ["cached"] * 3 + ["done"]
    assert report["stages"][3]["params"] == report["stages"][2]["params"]


def test_distill_modes_under_two_processes(write_pipeline, tmp_path):
    """Rank 0 builds the teacher cache while the others wait; adapters, the EMA teacher and
    mutual peers train under DistributedDataParallel and end equal on every rank."""
    stages = ("  - {type: distill, epochs: 1, lr: 0.01, losses: [{type: kl}, {type: features, "
              "student: features, teacher: features}]}\n"
              "  - {type: distill, mode: ema, epochs: 1, lr: 0.01, noise: 0.05}\n"
              "  - {type: distill, mode: mutual, peers: [student, peer], epochs: 1, lr: 0.01}\n")
    text = TINY.replace("  - {type: distill, epochs: 2, lr: 0.03}\n", stages).replace(
        "stages:", "models:\n  peer: {source: models/digits.py:student, kwargs: {width: 3}}\n"
        "stages:")
    path = write_pipeline(text)
    result = run([str(path), "--nproc", "2", "-o", str(tmp_path / "ddp")], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["done"] * 6
    assert result.stderr.count("caching 2 teacher output(s)") == 1
    assert (tmp_path / "ddp" / "cache" / "teacher--features.npy").exists()


def test_a_failing_rank_stops_the_job_with_one_message(write_pipeline, tmp_path):
    path = write_pipeline(TINY.replace("epochs: 1, lr: 0.03", "epochs: 1, lr: 0.03, "
                                       "optimizer: sgd, weight_decay: 1.0e+30"))
    result = run([str(path), "--nproc", "2", "-o", str(tmp_path / "nan")], tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("stage 00-train failed: the loss became") == 1, result.stderr


@pytest.mark.slow
def test_digits_two_processes_match_one_within_a_point(tmp_path):
    """Mean over two seeds of the exported teacher's and student's accuracy (360 test digits:
    one digit is 0.28 points, so a single seed's difference is mostly sampling noise)."""

    def accuracies(*args: str) -> dict:
        out = tmp_path / "-".join(args).replace("=", "")
        result = run(["pipelines/digits.yaml", *args, "-o", str(out)], ROOT)
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        return {b["model"]: b["accuracy"] for b in report["benchmarks"]
                if b["batch_size"] == 1 and b["precision"] == "fp32"}

    seeds = ("seed=0", "seed=1")
    one = [accuracies(s) for s in seeds]
    two = [accuracies(s, "--nproc", "2") for s in seeds]
    for model in ("teacher", "student"):
        mean_one = sum(r[model] for r in one) / len(seeds)
        mean_two = sum(r[model] for r in two) / len(seeds)
        assert abs(mean_one - mean_two) <= 0.01, (model, one, two)


@pytest.mark.skipif(not os.environ.get("COMPRESSKIT_GPU_TESTS"),
                    reason="needs a CUDA GPU with onnxruntime-gpu; set COMPRESSKIT_GPU_TESTS=1 "
                           "on such a machine")
def test_nccl_on_gpu(tiny_pipeline, tmp_path):  # pragma: no cover - no GPU on CI machines
    import torch

    n = torch.cuda.device_count()
    result = run([str(tiny_pipeline), "device=cuda", "--nproc", str(max(1, min(2, n))),
                  "-o", str(tmp_path / "gpu")], tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_qat_trains_on_every_rank_and_rank_0_writes_the_file(write_pipeline, tmp_path):
    """QAT's fine-tuning runs under DistributedDataParallel on both ranks (the replica check at
    the end of training holds); one INT8 file, written by rank 0."""
    qat = "  - {type: qat, epochs: 1, lr: 0.0001, calibration_samples: 64}\n"
    path = write_pipeline(TINY.replace("  - {type: export}\n", qat + "  - {type: export}\n"))
    result = run([str(path), "--nproc", "2", "-o", str(tmp_path / "ddp")], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["type"] == "qat")
    assert stage["status"] == "done" and stage["metrics"]["trained_on_ranks"] == 2
    assert stage["metrics"]["int8_coverage"] >= 0.95
    assert sorted(p.name for p in (tmp_path / "ddp" / "artifacts").glob("*.int8.onnx")) == [
        "student.qat.int8.onnx"]
    assert result.stderr.count("02-qat: running") == 1


@pytest.mark.slow
def test_a_language_model_distils_on_two_processes(tmp_path):
    """task causal-lm under torchrun: the generated records (written by rank 0) and the teacher's
    top-k cache reach both ranks, the ranks take equal shares (no rank waits in an all-reduce
    the other never calls), and the distilled student is one."""
    pytest.importorskip("transformers")
    import yaml

    from tests.fixtures.tiny_lm import make
    from tests.stages.test_lm import pipeline

    cfg = pipeline(make(tmp_path / "teacher", layers=4), baseline=False)
    cfg["stages"] = cfg["stages"][:2]
    cfg["data"]["kwargs"]["limit_blocks"] = 45  # 49 rows: the ranks' shares must be equal
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(cfg))
    result = run([str(tmp_path / "lm.yaml"), "--nproc", "2", "-o", str(tmp_path / "ddp")],
                 tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    distill = report["stages"][1]["metrics"]
    assert distill["generated_rows"] == 4 and distill["train_rows"] == 49
    assert distill["after"]["test_perplexity"] < distill["before"]["test_perplexity"]
