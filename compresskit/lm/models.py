"""The Hugging Face causal LM behind a pipeline's model, its tokenizer, and a folder other tools
can read (onnxruntime-genai's model builder, transformers).

A model loaded from GGUF refuses `save_pretrained` ("quantized with gguf and is not
serializable"); `save_folder` builds a fresh model from the config, loads the weights, drops
`quantization_config` and names the architecture, which is what the builder takes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.errors import StageError


def unwrap(model: nn.Module) -> Any:
    """The transformers model inside compresskit's input adapter (or the model itself)."""
    inner = getattr(model, "model", None)
    if type(model).__name__ == "Entry" and isinstance(inner, nn.Module):
        return inner
    return model


def is_causal_lm(model: nn.Module) -> bool:
    m = unwrap(model)
    return callable(getattr(m, "get_output_embeddings", None)) and \
        m.get_output_embeddings() is not None and hasattr(m, "base_model")


def vocab_size(model: nn.Module) -> int:
    head = unwrap(model).get_output_embeddings()
    return int(head.weight.shape[0])


def hidden_states(model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states [b, t, d], before the LM head."""
    m = unwrap(model)
    out = m.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def logits(model: nn.Module, input_ids: torch.Tensor,
           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    m = unwrap(model)
    return m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def check_same_vocabulary(teacher: nn.Module, student: nn.Module, teacher_tok: Any,
                          student_tok: Any, stage: str) -> None:
    """Token-level KD compares distributions over one vocabulary: a student whose tokenizer or
    output size differs is a clear error before any training (trl #3028, torchtune #2119)."""
    tv, sv = vocab_size(teacher), vocab_size(student)
    if tv != sv:
        raise StageError(stage, f"the teacher predicts {tv} tokens and the student {sv}: "
                         "token-level distillation needs one vocabulary; give the student the "
                         "teacher's tokenizer and vocab_size (or build it with from_teacher)")
    if teacher_tok is not None and student_tok is not None \
            and teacher_tok.get_vocab() != student_tok.get_vocab():
        t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
        differ = sorted(set(t.items()) ^ set(s.items()), key=str)[:3]
        raise StageError(stage, "the teacher's and the student's tokenizers differ (e.g. "
                         f"{', '.join(repr(k) for k, _ in differ)}): the same id would mean "
                         "different text; use one tokenizer for both")


def save_folder(model: nn.Module, tokenizer: Any, path: Path) -> Path:
    """A plain transformers folder (config.json, safetensors, tokenizer) of `model`'s weights."""
    m = unwrap(model)
    config = copy.deepcopy(m.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(m).__name__]
    fresh = type(m)(config)
    fresh.load_state_dict(m.state_dict())
    fresh.to(torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(data, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def greedy(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
           eos: int | None = None) -> list[int]:
    """Greedy decoding in torch with the model's own KV cache: the new token ids."""
    m = unwrap(model).eval()
    out = m.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens if eos is None else 0,
                     do_sample=False, pad_token_id=eos if eos is not None else 0,
                     eos_token_id=eos)
    return [int(t) for t in out[0, input_ids.shape[1]:]]
