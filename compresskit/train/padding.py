"""Token sequences padded to a fixed length: batches of similar lengths, cut to the longest.

A text source pads every sample to `max_length`, so a batch of 20-token sentences costs what a
batch of 64-token ones does. With `data.group_by_length`, training draws batches of samples of
similar length (HF Trainer's `group_by_length`, torchtune's packing serves the same end) and cuts
the padding columns no sample of the batch uses. The attention mask says which positions are
real, so the model's outputs do not change; only the work does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

MASK_NAME = "attention_mask"
POOL = 50
"""Batches drawn at once and sorted by length: enough to group lengths, few enough that the
order stays random (HF's LengthGroupedSampler uses 50 too)."""


class Padding:
    """Which input is the attention mask, and which inputs share its sequence axis."""

    def __init__(self, mask: int, sequence: list[int]):
        self.mask, self.sequence = mask, sequence

    @classmethod
    def of(cls, specs: Sequence[Any]) -> Padding | None:
        """From the pipeline's `input:` list: an input named attention_mask whose first axis is
        dynamic, and every input with the same dynamic axis name. None when there is none."""
        names = [s.name for s in specs]
        if MASK_NAME not in names:
            return None
        mask = names.index(MASK_NAME)
        axis = specs[mask].dynamic.get(0)
        if axis is None:
            return None
        return cls(mask, [i for i, s in enumerate(specs) if s.dynamic.get(0) == axis])

    def length(self, x: Any) -> torch.Tensor:
        """Per sample of a batch: one past the last real position (right or left padding)."""
        mask = torch.as_tensor(x[self.mask])
        positions = torch.arange(1, mask.shape[-1] + 1)
        return (mask.ne(0) * positions).amax(dim=-1)

    def trim(self, x: Any) -> Any:
        """The batch without the padding columns past its longest sample (at least one)."""
        keep = max(1, int(self.length(x).max()))
        return tuple(v[:, :keep] if i in self.sequence else v for i, v in enumerate(x))


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar lengths: a random permutation, cut into pools of POOL
    batches, each pool sorted by length and cut into batches, then the batches shuffled. The
    generator decides it all, so a resumed run draws the same batches."""

    def __init__(self, lengths: np.ndarray, batch_size: int, generator: torch.Generator):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.lengths), generator=self.generator)
        pool = self.batch_size * POOL
        batches: list[list[int]] = []
        for start in range(0, len(perm), pool):
            chunk = perm[start:start + pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i:i + self.batch_size].tolist()
                        for i in range(0, len(chunk), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]
