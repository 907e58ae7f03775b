"""Structural edits replay exactly on a freshly built model (compresskit/models/structure.py)."""

from __future__ import annotations

import json

import torch
import torch_pruning as tp

from compresskit.models import structure
from compresskit.ops.lowrank import factorize_linear
from tests.fixtures.tiny_models import Residual, Transformer


def _rebuilt(factory, edits, state):
    torch.manual_seed(123)  # different initial weights: everything must come from the edits
    fresh = structure.apply(factory(), json.loads(json.dumps(edits)))
    fresh.load_state_dict(state)  # strict: every name and shape must fit
    return fresh.eval()


def test_a_pruned_and_factorised_model_rebuilds_from_json_edits() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(3, 1, 8, 8)
    before = structure.snapshot(model)
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.head])
    pruner.step()
    edits = [structure.reshape_edit(before, structure.snapshot(model))]
    assert edits[0]["modules"]["conv1"]["attrs"] == {"in_channels": 8, "out_channels": 8}
    structure.set_module(model, "head", factorize_linear(model.head, 4))
    edits.append(structure.lowrank_edit({"head": {"kind": "linear", "rank": 4}}))
    rebuilt = _rebuilt(Residual, edits, model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_attribute_edits_carry_attention_head_counts() -> None:
    torch.manual_seed(0)
    model = Transformer().eval()
    before = structure.snapshot(model)
    model.attn.num_heads = 2  # as the prune stage sets it after removing heads
    edit = structure.reshape_edit(before, structure.snapshot(model))
    assert edit["modules"] == {"attn": {"attrs": {"num_heads": 2}, "shapes": {}}}
    assert _rebuilt(Transformer, [edit], model.state_dict()).attn.num_heads == 2


def test_an_fp32_graph_has_no_integer_coverage(tmp_path) -> None:
    from compresskit.backends import quant
    from compresskit.backends.onnx_export import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(Residual().eval(), torch.zeros(2, 1, 8, 8), path, 17)
    cov = quant.int8_coverage(path, quant.optimized_graph(path, tmp_path / "opt.onnx"))
    assert cov["int8_coverage"] == 0.0
    assert cov["macs_with_constant_weights"] == 9 * 64 * (16 + 16 * 16 * 2) + 16 * 10
    assert len(cov["float_nodes"]) == 4
