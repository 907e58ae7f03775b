"""The distill stage in each mode and with each loss term, on tiny digits CNNs: it trains, its
diagnostics are measured, adapters stay out of the export, bad input is exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compresskit import api
from compresskit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "models/digits.py"


def pipeline(*stages: dict, **extra) -> dict:
    cfg = {
        "name": "kd", "data": {"source": "digits", "batch_size": 64},
        "input": {"shape": [1, 8, 8]},
        "teacher": {"source": f"{DIGITS}:teacher", "kwargs": {"width": 8}},
        "student": {"source": f"{DIGITS}:student", "kwargs": {"width": 2}},
        "stages": [{"type": "train", "model": "teacher", "epochs": 2, "lr": 0.01}, *stages],
    }
    cfg.update(extra)
    return cfg


def run(cfg: dict, out: Path) -> dict:
    return api.run(cfg, base_dir=ROOT, output_dir=out, show_progress=False)


def distill(**kw) -> dict:
    return {"type": "distill", "epochs": 2, "lr": 0.01, **kw}


def test_every_loss_term_together_with_adapters_and_auto_temperature(tmp_path):
    losses = [{"type": "kl"},
              {"type": "features", "student": "features", "teacher": "features"},
              {"type": "features", "student": "stem", "teacher": "stem", "loss": "cosine"},
              {"type": "attention", "student": "features.0", "teacher": "features.0"},
              {"type": "cosine", "student": "pool", "teacher": "pool"}]
    out = tmp_path / "run"
    report = run(pipeline(distill(losses=losses, temperature="auto", auto_temperatures=[1, 4],
                                  auto_epochs=1, baseline=True),
                          {"type": "export", "models": ["student"]}), out)
    m = report["stages"][1]["metrics"]
    assert m["temperature"] in (1.0, 4.0) and set(m["temperature_sweep"]) == {"1", "4"}
    assert m["temperature_sweep"][f"{m['temperature']:g}"] == max(m["temperature_sweep"].values())
    teacher = m["teachers"]["teacher"]
    assert 0 < teacher["mean_max_prob"] <= teacher["mean_max_prob_t1"] <= 1  # T >= 1 softens
    assert teacher["student_param_ratio"] == pytest.approx(
        report["stages"][1]["params"] / report["stages"][0]["params"])
    assert 0 <= m["teacher_agreement"] <= 1 and "baseline_accuracy" in m
    # The adapters (1x1 convs 4 -> 16 channels and a Linear) trained but are not exported.
    student = onnx.load(out / "artifacts" / "student.fp32.onnx")
    weights = sum(int(np.prod(t.dims)) for t in student.graph.initializer)
    assert weights <= report["stages"][1]["params"]
    text = (out / "report.md").read_text()
    assert "## Distillation" in text and "Temperature sweep" in text


def test_multi_teacher_with_confidence_weighting(tmp_path):
    cfg = pipeline(
        {"type": "train", "model": "mlp_teacher", "epochs": 2, "lr": 0.01},
        distill(teachers=[{"model": "teacher", "weight": 2.0},
                          {"model": "mlp_teacher", "temperature": 2.0}],
                confidence_weighting=True),
        models={"mlp_teacher": {"source": f"{DIGITS}:mlp", "kwargs": {"hidden": 32}}})
    m = run(cfg, tmp_path / "run")["stages"][2]["metrics"]
    assert set(m["teachers"]) == {"teacher", "mlp_teacher"}
    assert m["teachers"]["mlp_teacher"]["temperature"] == 2.0
    assert m["teachers"]["teacher"]["temperature"] == 4.0
    assert m["teachers"]["teacher"]["weight"] == 2.0


def test_teachers_that_disagree_on_classes_are_refused_before_training(tmp_path):
    cfg = pipeline(distill(teachers=[{"model": "teacher"}, {"model": "five"}]),
                   models={"five": {"source": f"{DIGITS}:mlp", "kwargs": {"num_classes": 5}}})
    with pytest.raises(ConfigError, match="same number of classes.*'five' 5"):
        api.validate(cfg, base_dir=ROOT, deep=True)


def test_feature_names_and_shapes_are_checked_at_validation(tmp_path):
    cfg = pipeline(distill(losses=[
        {"type": "features", "student": "featurs", "teacher": "features"}]))
    with pytest.raises(ConfigError, match="no module named 'featurs'; did you mean 'features'"):
        api.validate(cfg, base_dir=ROOT, deep=True)
    cfg = pipeline(distill(losses=[
        {"type": "features", "student": "stem", "teacher": "features"}]))
    with pytest.raises(ConfigError, match=r"\[2, 8, 8\] and the teacher's \[16, 4, 4\]"):
        api.validate(cfg, base_dir=ROOT, deep=True)


def test_born_again_generations(tmp_path):
    cfg = pipeline(distill(mode="born_again", generations=2, baseline=True))
    cfg["stages"][0] = {"type": "train", "model": "student", "epochs": 2, "lr": 0.01}
    out = tmp_path / "run"
    m = run(cfg, out)["stages"][1]["metrics"]
    assert len(m["generation_accuracy"]) == 3 and m["accuracy"] == m["generation_accuracy"][-1]
    before = torch.load(out / "00-train" / "student.pt", weights_only=True)
    after = torch.load(out / "01-distill" / "student.pt", weights_only=True)
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])


def test_ema_teacher_is_the_moving_average(tmp_path):
    cfg = pipeline(distill(mode="ema", ema_decay=0.9, noise=0.05, temperature=1.0))
    cfg["stages"] = cfg["stages"][1:]
    m = run(cfg, tmp_path / "run")["stages"][0]["metrics"]
    assert 0 < m["ema_accuracy"] <= 1 and m["mode"] == "ema"


def test_mutual_updates_every_peer(tmp_path):
    cfg = pipeline(distill(mode="mutual", peers=["student", "peer"], baseline=True),
                   {"type": "export", "models": ["student", "peer"]},
                   models={"peer": {"source": f"{DIGITS}:student", "kwargs": {"width": 3}}})
    cfg["stages"] = cfg["stages"][1:]
    out = tmp_path / "run"
    report = run(cfg, out)
    m = report["stages"][0]["metrics"]
    assert set(m["peer_accuracy"]) == {"student", "peer"} and "ensemble_accuracy" in m
    manifest = json.loads((out / "00-distill" / "manifest.json").read_text())
    assert manifest["updated"] == ["peer", "student"]
    assert {a["model"] for a in report["artifacts"]} == {"student", "peer"}


def test_mode_keys_are_checked():
    bad = pipeline(distill(mode="mutual", peers=["student"], generations=3))
    with pytest.raises(ConfigError) as e:
        api.validate(bad, base_dir=ROOT)
    text = str(e.value)
    assert "at least two different peers" in text
    assert "'generations' applies to mode: born_again, not mode: mutual" in text


def test_label_free_distillation(tmp_path):
    cfg = pipeline(distill(epochs=3))
    cfg["data"]["kwargs"] = {"train_labels": False}
    # the whole chain without labels: recovery and QAT distil, Taylor ranks by predictions
    cfg["stages"] = [{"type": "distill", "epochs": 1},
                     {"type": "prune", "ratio": 0.3, "importance": "taylor", "recover": 1,
                      "latency_runs": 10},
                     {"type": "qat", "epochs": 1, "calibration_samples": 64,
                      "min_int8_coverage": 0.0, "min_agreement": 0.0},
                     {"type": "export", "models": ["student"]},
                     {"type": "ptq", "calibration_samples": 64, "min_int8_coverage": 0.0}]
    cfg["teacher"] = {"source": f"{DIGITS}:sklearn_teacher", "kwargs": {"hidden": 32}}
    report = run(cfg, tmp_path / "run")
    m = report["stages"][0]["metrics"]
    assert m["labels"] is False and m["teacher_accuracy"] > 0.9
    assert [s["status"] for s in report["stages"]] == ["done"] * 5
    # Without labels, cross-entropy stages are refused with a reason.
    cfg["stages"] = [{"type": "train", "model": "student", "epochs": 1}]
    with pytest.raises(ConfigError, match="training split has no labels"):
        run(cfg, tmp_path / "run2")
    cfg["stages"] = [{"type": "distill", "epochs": 1, "baseline": True}]
    with pytest.raises(ConfigError, match="baseline: true .* has no labels"):
        run(cfg, tmp_path / "run3")


def test_freeze_keeps_the_named_parameters_and_a_pattern_naming_none_is_refused(tmp_path):
    cfg = pipeline(distill(freeze=["stem.*"]))
    cfg["stages"][0] = {"type": "train", "model": "student", "epochs": 1, "lr": 0.01}
    out = tmp_path / "run"
    run(cfg, out)
    before = torch.load(out / "00-train" / "student.pt", weights_only=True)
    after = torch.load(out / "01-distill" / "student.pt", weights_only=True)
    for name in ("stem.0.weight", "stem.1.weight", "stem.1.bias"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    cfg = pipeline(distill(freeze=["stems.*"]))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.freeze: 'stems\.\*' matches none"):
        api.validate(cfg, base_dir=ROOT, deep=True)
