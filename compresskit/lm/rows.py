"""Training rows of a causal-lm distill stage: the data source's text blocks and the records of
the generate stages before it, each with the positions whose next token counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compresskit.engine import distributed as dist
from compresskit.engine.context import StageContext
from compresskit.lm import generate


@dataclass
class Rows:
    """Training rows: token ids [n, t] and which positions count [n, t]."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def rows(ctx: StageContext, pad: int) -> Rows:
    """The data source's training blocks, then each generated record as a row of the same
    length (prompt and padding do not count; a record longer than a block is cut)."""
    blocks: Any = ctx.data().train
    ids = torch.stack([torch.as_tensor(blocks[i][0]) for i in range(len(blocks))]).long()
    mask = torch.ones_like(ids)
    # rank 0 ran the generate stages: the other ranks take its records
    records = dist.broadcast_object(generate.read(ctx.run_dir, ctx.artifacts)
                                    if dist.is_main() else None)
    if records:
        width = ids.shape[1]
        extra_ids = torch.full((len(records), width), pad, dtype=torch.long)
        extra_mask = torch.zeros_like(extra_ids)
        for i, r in enumerate(records):
            seq = (r["prompt_ids"] + r["completion_ids"])[:width]
            extra_ids[i, :len(seq)] = torch.tensor(seq)
            start = min(len(r["prompt_ids"]), width)
            # the last prompt token predicts the first completion token: it counts too
            extra_mask[i, max(start - 1, 0):len(seq)] = 1
        ids, mask = torch.cat([ids, extra_ids]), torch.cat([mask, extra_mask])
    return Rows(ids, mask)
