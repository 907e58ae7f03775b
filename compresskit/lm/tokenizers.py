"""The tokenizer of a pipeline's model: its `hf:` source's, or the teacher's for a student built
from_teacher."""

from __future__ import annotations

from typing import Any

from compresskit.engine.context import StageContext
from compresskit.errors import StageError


def source_of(ctx: StageContext, role: str) -> str | None:
    """The `hf:` source whose folder holds `role`'s tokenizer (None: not an hf model)."""
    sections = ctx.config.model_sections()
    seen: set[str] = set()
    while role in sections and role not in seen:
        seen.add(role)
        mcfg = sections[role][1]
        if mcfg.from_teacher is not None:
            role = "teacher"
            continue
        return mcfg.source if mcfg.source and mcfg.source.startswith("hf:") else None
    return None


def tokenizer_for(ctx: StageContext, role: str) -> Any:
    from compresskit.models import hf
    from compresskit.models.sources import SourceError

    source = source_of(ctx, role)
    if source is None:
        raise StageError(ctx.name, f"the {role} has no tokenizer: task causal-lm needs models "
                         "from 'hf:<folder>' sources (or from_teacher)")
    try:
        return hf.load_tokenizer(source, ctx.base_dir)
    except SourceError as e:
        raise StageError(ctx.name, str(e)) from None
