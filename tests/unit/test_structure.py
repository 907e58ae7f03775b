"""Structural edits replay exactly on a freshly built model (compresskit/structure.py)."""

from __future__ import annotations

import json

import torch
import torch_pruning as tp

from compresskit import structure
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
