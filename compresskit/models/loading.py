"""Build models from their `source:`, load and save weights without unpickling objects."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.config import InputConfig, ModelConfig, OutputConfig
from compresskit.engine.artifacts import atomic_path
from compresskit.models import hf
from compresskit.models.inputs import DTYPES
from compresskit.models.sources import SourceError, call_user, locate, resolve


class ModelError(Exception):
    """A model that cannot be built, loaded or run as configured; the message says what to do."""


def build(cfg: ModelConfig, role: str, base_dir: Path, seed: int,
          inputs: Sequence[InputConfig] | None = None, task: str = "classify") -> nn.Module:
    """Instantiate the model (seeded, so a rebuild is identical), load its checkpoint, and
    adapt it to positional inputs and one output tensor when `inputs` says so (see Entry)."""
    model = instantiate(cfg, role, base_dir, seed)
    load_checkpoint(model, cfg, role, base_dir)
    return adapt(model, cfg.output, inputs, role, task) if inputs is not None else model


def instantiate(cfg: ModelConfig, role: str, base_dir: Path, seed: int) -> nn.Module:
    if cfg.source is None:  # from_teacher: built by the runner from the teacher
        raise RuntimeError(f"{role} has no source to instantiate")
    try:
        torch.manual_seed(seed)
        if hf.is_hf(cfg.source):
            model = hf.load_model(cfg.source, base_dir, cfg.kwargs)
        else:
            factory = resolve(cfg.source, base_dir)
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
    if state and all(k.startswith("model.") for k in state) and not any(
            k.startswith("model.") for k in own):
        # Saved from the wrapped model every stage sees (Entry: named inputs, a picked
        # output), such as a train stage's teacher.pt: the model's own keys are inside.
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if getattr(state, "_metadata", None) is None:
        # The module versions a state_dict carries beside its tensors, lost by a plain dict
        # (or the renaming above): those of the code that builds the model. Some modules
        # refuse to load without them (torchvision's MNASNet: "version should be set to 1 or
        # 2 instead of None").
        state = OrderedDict(state)
        state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
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
    own = model.state_dict()
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in own.items())
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def example_input(inp: InputConfig | Sequence[InputConfig], batch: int = 2) -> Any:
    """A batch of placeholder inputs: zeros for floats, ones for integers (a valid token id and
    a mask that marks every token); a tuple for several inputs."""
    specs = [inp] if isinstance(inp, InputConfig) else list(inp)
    out = tuple((torch.zeros if s.dtype.startswith("float") else torch.ones)(
        (batch, *s.shape), dtype=DTYPES[s.dtype]) for s in specs)
    return out[0] if len(out) == 1 else out


class Entry(nn.Module):
    """A model seen the way every stage and exporter wants it: positional input tensors in the
    pipeline's `input:` order, one output tensor.

    The wrapped model gets its inputs by keyword (input_ids=..., attention_mask=...), and the
    tensor the stages use is picked from a dict, tuple or ModelOutput by `output.key`, then
    optionally pooled to one embedding per sample. The model is `self.model`, so its module
    names carry a 'model.' prefix.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], output: OutputConfig,
                 keyword: bool):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.keyword = keyword
        self.key = output.key
        self.pool = output.pool
        self.normalize = output.normalize
        self.mask_index = self.names.index(output.mask) if output.mask in self.names else None

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, xs, strict=True))) if self.keyword \
            else self.model(*xs)
        out = select(out, self.key)
        if self.pool == "mean":
            if self.mask_index is None:
                out = out.mean(dim=1)
            else:
                mask = xs[self.mask_index].unsqueeze(-1).to(out.dtype)
                out = (out * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        elif self.pool == "cls":
            out = out[:, 0]
        if self.normalize:
            out = nn.functional.normalize(out, dim=-1)
        return out


def select(out: Any, key: str | int | None) -> torch.Tensor:
    """The output tensor the stages use; a clear error when `key` does not pick one."""
    if key is None:
        if isinstance(out, torch.Tensor):
            return out
        raise ModelError(f"the model returns {_describe(out)}, not one tensor; set the model's "
                         "output.key to the one the stages should use")
    if isinstance(out, Mapping):
        if key not in out:
            raise ModelError(f"output.key '{key}' is not among the model's outputs "
                             f"{_describe(out)}")
        value = out[key]
    elif isinstance(out, (tuple, list)):
        if not isinstance(key, int) or not -len(out) <= key < len(out):
            raise ModelError(f"output.key {key!r} does not index the model's {len(out)} "
                             "outputs; give an integer index")
        value = out[key]
    else:
        raise ModelError(f"output.key {key!r} is set, but the model returns {_describe(out)}")
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"output '{key}' is {type(value).__name__}, not a tensor")
    return value


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    if isinstance(out, Mapping):
        return "a mapping with keys " + ", ".join(repr(k) for k in out)
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return type(out).__name__


def forward_parameters(model: nn.Module) -> tuple[list[str], bool]:
    """Names the model's forward takes by keyword, and whether it takes **kwargs."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return [], True
    names = [n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def adapt(model: nn.Module, output: OutputConfig, inputs: Sequence[InputConfig],
          role: str, task: str = "classify") -> nn.Module:
    """The model itself when it takes one positional input and returns one tensor; else an
    Entry. Input names the forward does not take are the user's error, named here. A causal
    LM's output is its `logits` unless output.key says otherwise."""
    if task == "causal-lm" and output.key is None:
        output = output.model_copy(update={"key": "logits"})
    names = [i.name for i in inputs]
    if names == ["input"] and hf.is_hf_model(model):
        # One unnamed input goes where the model wants its main input (pixel_values for a
        # vision model, input_ids for a text one): HF forwards take everything by keyword.
        names = [str(getattr(model, "main_input_name", "input"))]
    keyword = len(names) > 1 or names[0] != "input" or hf.is_hf_model(model)
    if keyword:
        taken, var_kw = forward_parameters(model)
        unknown = [n for n in names if n not in taken]
        if unknown and not var_kw:
            raise ModelError(
                f"the {role}'s forward takes no input named '{unknown[0]}' (it takes "
                f"{', '.join(taken) or 'nothing by name'}); name the inputs under 'input:' "
                "after the forward's arguments")
    if not keyword and output.key is None and output.pool is None and not output.normalize:
        return model
    return Entry(model, names, output, keyword)


def dry_forward(model: nn.Module, inputs: Sequence[InputConfig], role: str,
                task: str = "classify") -> Any:
    """One forward pass on a placeholder batch; inputs the model rejects are the user's error."""
    model.eval()
    shown = f"input.shape {inputs[0].shape} ({inputs[0].dtype})" if len(inputs) == 1 else \
        "the inputs " + ", ".join(f"{i.name} {i.shape} ({i.dtype})" for i in inputs)
    try:
        with torch.no_grad():
            from compresskit.models.inputs import call

            out = call(model, example_input(inputs))
    except ModelError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"the {role} rejects {shown}: {msg}. Set input shape to "
                         "one sample's shape, without the batch dimension") from None
    lm = task == "causal-lm"
    if not isinstance(out, torch.Tensor) or out.dim() != (3 if lm else 2):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else _describe(out)
        raise ModelError(
            f"the {role} must return next-token logits of shape [batch, tokens, vocabulary] "
            f"for task causal-lm, got {shape}; load it with kwargs: {{auto_class: "
            "AutoModelForCausalLM}" if lm else
            f"the {role} must return one tensor of shape [batch, classes] (or [batch, dim] "
            f"for an embedding), got {shape}; set the model's output.key, or output.pool for "
            "per-token outputs")
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
