"""Stage checkpoints keep what `model.state_dict()` carries beside the tensors: the modules'
versions, which some modules need to load (torchvision's MNASNet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.models.loading import load_weights, save_weights


class Versioned(nn.Module):
    """Loads only with its version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: dict,
                              *args: Any) -> None:
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_stage_checkpoint_loads_into_a_module_that_needs_its_version(tmp_path: Path) -> None:
    model = Versioned()
    save_weights(model, tmp_path / "student.pt")
    again = Versioned()
    load_weights(again, tmp_path / "student.pt", "student checkpoint")
    assert torch.equal(again.fc.weight, model.fc.weight)


def test_a_plain_dict_of_tensors_loads_with_the_models_own_versions(tmp_path: Path) -> None:
    model = Versioned()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "plain.pt")
    again = Versioned()
    load_weights(again, tmp_path / "plain.pt", "student checkpoint")
    assert torch.equal(again.fc.bias, model.fc.bias)
