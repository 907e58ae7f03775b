"""The prune stage on tiny models with residual adds, concatenations, depthwise convolutions and
attention heads: the student shrinks, still exports with parity, and reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compresskit import api
from compresskit.errors import ConfigError, StageError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = "tests/fixtures/tiny_models.py"


def pipeline(model: str, prune: dict, export: dict | None = None) -> dict:
    return {
        "name": f"prune-{model}", "data": {"source": "digits", "batch_size": 64},
        "input": {"shape": [1, 8, 8]},
        "teacher": {"source": f"{FIXTURES}:{model}"},
        "stages": [
            {"type": "train", "model": "teacher", "epochs": 1, "lr": 0.01},
            {"type": "prune", "start_from": "teacher", "recover": 1, "latency_runs": 10,
             **prune},
            {"type": "export", "models": ["student"], **(export or {})},
        ],
    }


def run(cfg: dict, out: Path) -> dict:
    return api.run(cfg, base_dir=ROOT, output_dir=out, show_progress=False)


def manifest(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


@pytest.mark.parametrize("model", ["residual", "concat", "depthwise", "transformer"])
def test_pruned_student_is_smaller_exports_and_reloads_exactly(model, tmp_path):
    out = tmp_path / "run"
    report = run(pipeline(model, {"ratio": 0.5}), out)
    prune = report["stages"][1]["metrics"]
    assert prune["after"]["params"] < 0.6 * prune["before"]["params"]
    assert prune["after"]["macs"] < prune["before"]["macs"]
    assert prune["change"]["macs_ratio"] == pytest.approx(
        prune["after"]["macs"] / prune["before"]["macs"], abs=1e-4)
    assert report["artifacts"][0]["model"] == "student"
    edits = manifest(out, "01-prune")["structure"]["student"]
    assert edits["base"] == "teacher" and edits["edits"][0]["op"] == "reshape"
    if model == "transformer":
        assert edits["edits"][0]["modules"]["attn"]["attrs"]["num_heads"] == 2
    # A new export rebuilds the pruned student from source + edits + weights: same accuracy.
    again = run(pipeline(model, {"ratio": 0.5}, {"opset": 18}), out)
    assert [s["status"] for s in again["stages"]] == ["cached", "cached", "done"]
    bench = api.run({**pipeline(model, {"ratio": 0.5}, {"opset": 18}), "stages": [
        *pipeline(model, {"ratio": 0.5}, {"opset": 18})["stages"],
        {"type": "benchmark", "runs": 10, "warmup": 1, "memory": False}]},
        base_dir=ROOT, output_dir=out, show_progress=False)
    assert bench["benchmarks"][0]["accuracy"] == pytest.approx(prune["after"]["accuracy"])


def test_target_macs_is_reached(tmp_path):
    report = run(pipeline("residual", {"target_macs": 0.5, "recover": 0}), tmp_path / "run")
    m = report["stages"][1]["metrics"]
    assert m["mode"] == "target_macs"
    assert 0.3 < m["change"]["macs_ratio"] <= 0.55


def test_unreachable_target_fails_before_anything_is_saved(tmp_path):
    out = tmp_path / "run"
    cfg = pipeline("residual", {"target_macs": 0.05, "ignore": ["conv*"], "recover": 0})
    with pytest.raises(StageError, match="even removing .*Raise the target or ignore fewer"):
        run(cfg, out)
    assert not (out / "01-prune").exists()


def test_a_group_that_breaks_the_forward_is_left_whole_and_named(tmp_path):
    """Pruning `body` breaks a reshape by a hard-coded size: found on a trial copy, the group is
    left whole (listed with why), and the stage still finishes with a model that runs."""
    out = tmp_path / "run"
    report = run(pipeline("hard_coded", {"ratio": 0.5, "recover": 0}), out)
    m = report["stages"][1]["metrics"]
    assert "body" in m["left_whole"], m["left_whole"]
    assert "RuntimeError" in m["left_whole"]["body"]
    assert m["after"]["params"] == m["before"]["params"]  # nothing else could be pruned


def test_only_the_layers_writing_a_broken_group_are_left_whole(tmp_path):
    """`fc` reads the group that breaks (body's channels) but writes a group of its own that
    prunes safely: it is pruned, not left whole with the group it reads."""
    out = tmp_path / "run"
    report = run(pipeline("hard_coded_then_mlp", {"ratio": 0.5, "recover": 0, "round_to": 1}),
                 out)
    m = report["stages"][1]["metrics"]
    assert list(m["left_whole"]) == ["body"], m["left_whole"]
    mods = manifest(out, "01-prune")["structure"]["student"]["edits"][0]["modules"]
    assert mods["fc"]["attrs"]["out_features"] == 16


def test_ignore_pattern_matching_nothing_warns_with_close_names(tmp_path, capsys):
    from rich.console import Console

    cfg = pipeline("residual", {"ratio": 0.25, "ignore": ["conv_1"], "recover": 0})
    cfg["stages"] = cfg["stages"][:2]
    api.run(cfg, base_dir=ROOT, output_dir=tmp_path / "run", show_progress=False,
            console=Console(stderr=True, width=200))
    err = capsys.readouterr().err
    assert "ignore pattern 'conv_1' matches no module; closest module names: conv1" in err


def test_ignored_layers_keep_their_channels(tmp_path):
    out = tmp_path / "run"
    run(pipeline("concat", {"ratio": 0.5, "ignore": ["left"], "recover": 0}), out)
    modules = manifest(out, "01-prune")["structure"]["student"]["edits"][0]["modules"]
    assert "out_channels" not in modules.get("left", {}).get("attrs", {})
    assert modules["right"]["attrs"]["out_channels"] == 8


def test_two_amounts_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="give one of 'ratio', 'target_macs'"):
        run(pipeline("residual", {"ratio": 0.5, "target_macs": 0.5}), tmp_path / "run")


def test_every_importance_global_ranking_steps_and_round_to(tmp_path):
    out = tmp_path / "run"
    criteria = ["l1", "taylor", "activation", "lamp", "bn_scale", "fpgm"]
    cfg = pipeline("residual", {"ratio": 0.5, "recover": 0})
    cfg["stages"] = [cfg["stages"][0], *[
        {"type": "prune", "start_from": "teacher", "ratio": 0.5, "importance": c,
         "recover": 0, "latency_runs": 10} for c in criteria],
        {"type": "prune", "start_from": "teacher", "ratio": 0.5, "global": True,
         "recover": 0, "latency_runs": 10},
        {"type": "prune", "start_from": "teacher", "ratio": 0.5, "steps": 2, "recover": 1,
         "latency_runs": 10},
        {"type": "prune", "start_from": "teacher", "ratio": 0.3, "round_to": 8, "recover": 0,
         "latency_runs": 10}]
    report = run(cfg, out)
    stages = report["stages"][1:]
    for s in stages:
        assert s["metrics"]["after"]["params"] < s["metrics"]["before"]["params"], s["name"]
    assert [s["metrics"]["importance"] for s in stages[:6]] == criteria
    assert stages[7]["metrics"]["steps"] == 2 and stages[7]["metrics"]["recovery_loss"] > 0
    # round_to 8 keeps channel counts multiples of 8 (16 less 30% would be 11).
    edits = manifest(out, stages[8]["name"])["structure"]["student"]["edits"][0]["modules"]
    assert edits["conv1"]["attrs"]["out_channels"] % 8 == 0


def test_round_to_comes_from_the_target_when_not_given(tmp_path):
    """Unset round_to: the channel block of the target's kernels (16 with AVX-512, 8 with AVX2
    or on CUDA), halved while rounding would prune far more or less than asked."""
    from compresskit.backends.device_runner import device_info

    def prune(**kw):
        cfg = pipeline("residual", {"ratio": 0.5, "recover": 0, **kw})
        cfg["stages"] = cfg["stages"][:2]
        return run(cfg, tmp_path / "-".join(map(str, kw.values())))
    isa = device_info()["isa"]
    here = prune()["stages"][1]["metrics"]
    block = 16 if "avx512f" in isa else 8
    assert here["round_to"] in (block, block // 2, block // 4, block // 8), here
    assert "cpu has" in here["round_to_from"] or "cpu (" in here["round_to_from"]
    cuda = prune(target="cuda")["stages"][1]["metrics"]
    assert cuda["round_to"] <= 8 and "CUDA" in cuda["round_to_from"]
    given = prune(target="cuda", round_to=1)["stages"][1]["metrics"]
    assert given["round_to"] == 1 and given["round_to_from"] == "given"
    with pytest.raises(ConfigError, match="unknown target 'phone'"):
        prune(target="phone")


def test_activation_importance_prunes_units_that_never_fire(tmp_path):
    """A hidden unit with the largest weights whose ReLU never fires on the data feeds nothing:
    weight magnitude keeps it, 'activation' (input RMS x weight norm of the layers reading
    it) removes it first."""
    import torch

    from compresskit.backends import pruning

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3),
                                  torch.nn.ReLU(), torch.nn.Linear(3, 2))
        with torch.no_grad():
            net[0].weight[5] = 10.0 * net[0].weight[5].sign()  # the heaviest unit...
            net[0].bias[5] = -1000.0  # ...never fires
        return net

    x = torch.rand(64, 4)

    def kept(criterion: str) -> list[int]:
        net = model()
        before = net[0].weight.detach().clone()
        pruner = pruning.make_pruner(
            net, x[:1], criterion=criterion, ratio=0.25, steps=1, ignored=["4"],
            global_ranking=False, max_layer_ratio=0.9, round_to=None, heads=False,
            feed=lambda m: m(x))
        pruning.step(pruner, net)
        return [i for i in range(8) if any(torch.equal(before[i], w) for w in net[0].weight)]

    assert 5 in kept("l2") and 5 not in kept("activation")


def test_a_convs_own_per_channel_gain_follows_its_pruned_channels(tmp_path):
    """A Conv2d subclass with a per-output-channel parameter beside weight and bias (timm's
    ScaledStdConv2d `gain` in NF-Nets): torch-pruning prunes weight and bias only, and the
    next forward failed ("weight should contain 12 elements not 16"); the gain now keeps the
    same channels, and the structure edit replays it on a fresh model."""
    import torch
    from torch import nn

    from compresskit.backends import pruning
    from compresskit.models import structure

    class GainConv(nn.Conv2d):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__(cin, cout, 3, padding=1)
            self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None,
                                         None, weight=self.gain.view(-1), training=True)
            return self._conv_forward(x, w.reshape_as(self.weight), self.bias)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(GainConv(3, 16), nn.ReLU(), GainConv(16, 16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    net = model()
    x = torch.rand(2, 3, 8, 8)
    before = structure.snapshot(net)
    pruner = pruning.make_pruner(
        net, x[:1], criterion="l2", ratio=0.25, steps=1, ignored=["6"], global_ranking=False,
        max_layer_ratio=0.9, round_to=None, heads=False)
    pruning.step(pruner, net)
    assert net[0].out_channels == 12 and net[0].gain.shape == (12, 1, 1, 1)
    out = net(x)
    rebuilt = structure.apply(model(), [structure.reshape_edit(before, structure.snapshot(net))])
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x), out)


def test_a_group_torch_pruning_cannot_score_is_left_whole_and_the_others_pruned(monkeypatch):
    """torch-pruning maps some groups' channels past a layer's width when it scores them
    (timm's efficientvit_b0: "index 792 is out of bounds for dimension 0 with size 192"), which
    left the whole model unpruned. Now that group alone is left whole, named, and the rest
    pruned."""
    import torch
    import torch_pruning as tp
    from torch import nn

    from compresskit.backends import pruning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                        nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 4))
    net[2].unscoreable = True  # unsafe_layers tries on copies
    real = pruning.importance

    def unscoreable(name, model=None, feed=None):
        scorer = real(name, model, feed)

        class Flaky(tp.importance.Importance):
            def __call__(self, group):
                if getattr(group[0].dep.target.module, "unscoreable", False):
                    raise IndexError("index 792 is out of bounds for dimension 0 with size 192")
                return scorer(group)
        return Flaky()

    monkeypatch.setattr(pruning, "importance", unscoreable)
    x = torch.rand(1, 3, 12, 12)
    args = dict(criterion="l2", global_ranking=False, max_layer_ratio=0.9, round_to=None,
                heads=False)
    found = pruning.unsafe_layers(net, x, 0.25, ["8"], **args)
    assert list(found) == ["2"] and "cannot score its channels (IndexError" in found["2"]
    pruner = pruning.make_pruner(net, x, ratio=0.25, steps=1, ignored=["8", *found], **args)
    pruning.step(pruner, net)
    assert [net[i].out_channels for i in (0, 2, 4)] == [12, 16, 12]


def test_a_transformer_keeps_its_hidden_width_and_loses_heads_and_mlp_units(tmp_path):
    """The residual stream of a BERT embedding model is its output width: it stays whole, and
    the heads and MLP units of every layer, the first included, are pruned."""
    from tests.stages.test_byo import INPUTS, tiny_bert

    folder = tiny_bert(tmp_path / "bert")
    cfg = {
        "name": "bert-prune", "task": "embed",
        "data": {"source": "text", "kwargs": {"python": "pydoc_data.topics:topics",
                                              "tokenizer": f"hf:{folder}", "max_length": 16,
                                              "limit": 120}, "batch_size": 16},
        "input": [dict(i, shape=[16]) for i in INPUTS],
        "teacher": {"source": f"hf:{folder}",
                    "output": {"key": "last_hidden_state", "pool": "mean"}},
        "stages": [{"type": "prune", "start_from": "teacher", "ratio": 0.5, "round_to": 1,
                    "importance": "activation", "recover": 0, "latency_runs": 10}],
    }
    out = tmp_path / "run"
    report = api.run(cfg, output_dir=out, show_progress=False)
    m = report["stages"][0]["metrics"]
    assert m["after"]["params"] < m["before"]["params"]
    # The first layer kept whole is the embedding, which writes the hidden width: that group
    # stays whole, and the projections reading it are still pruned.
    assert m["kept_whole"][0] == "model.embeddings.word_embeddings", m["kept_whole"]
    assert "model.encoder.layer.0.intermediate.dense" not in m["left_whole"]
    mods = manifest(out, "00-prune")["structure"]["student"]["edits"][0]["modules"]
    for i in (0, 1):
        layer = f"model.encoder.layer.{i}"
        assert mods[f"{layer}.intermediate.dense"]["attrs"]["out_features"] == 32
        assert mods[f"{layer}.attention.self"]["attrs"]["num_attention_heads"] == 2
        assert f"{layer}.output.dense" not in mods or \
            mods[f"{layer}.output.dense"]["attrs"].get("out_features", 32) == 32
