"""Build models from their `source:`, load and save weights without unpickling objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.artifacts import atomic_path
from compresskit.config import InputConfig, ModelConfig
from compresskit.sources import SourceError, call_user, locate, resolve

DTYPES = {"float32": torch.float32, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32}


class ModelError(Exception):
    """A model that cannot be built, loaded or run as configured; the message says what to do."""


def build(cfg: ModelConfig, role: str, base_dir: Path, seed: int) -> nn.Module:
    """Instantiate the model (seeded, so a rebuild is identical) and load its checkpoint."""
    model = instantiate(cfg, role, base_dir, seed)
    load_checkpoint(model, cfg, role, base_dir)
    return model


def instantiate(cfg: ModelConfig, role: str, base_dir: Path, seed: int) -> nn.Module:
    try:
        factory = resolve(cfg.source, base_dir)
        torch.manual_seed(seed)
        model = call_user(factory, cfg.kwargs, f"{role} source '{cfg.source}'")
    except SourceError as e:
        raise ModelError(str(e)) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{role} source '{cfg.source}' returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def load_checkpoint(model: nn.Module, cfg: ModelConfig, role: str, base_dir: Path) -> None:
    if cfg.checkpoint:
        try:
            path = locate(cfg.checkpoint, base_dir, f"{role} checkpoint")
        except SourceError as e:
            raise ModelError(str(e)) from None
        load_weights(model, path, f"{role} checkpoint {cfg.checkpoint}")


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors only: torch files through weights_only=True, or safetensors; no pickled objects."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelError(f"{what} is a .safetensors file; pip install safetensors to read "
                             "it") from None
        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelError(f"{what} is not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        raise ModelError(f"{what} cannot be read as a state_dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Save it with "
                         "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{what} does not hold a state_dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: Path, what: str) -> None:
    state = read_state_dict(path, what)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", mismatched)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise ModelError(f"{what} does not fit the model ({'; '.join(parts)}). Check the "
                         "source's kwargs match the checkpoint")
    model.load_state_dict(state)


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def example_input(inp: InputConfig, batch: int = 2) -> torch.Tensor:
    return torch.zeros((batch, *inp.shape), dtype=DTYPES[inp.dtype])


def dry_forward(model: nn.Module, inp: InputConfig, role: str) -> Any:
    """One forward pass on a zero batch; a shape the model rejects is the user's error."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input(inp))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"the {role} rejects input.shape {inp.shape} ({inp.dtype}): {msg}. "
                         "Set input.shape to one sample's shape, without the batch "
                         "dimension") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the {role} must return logits of shape [batch, classes], got {shape}")
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
