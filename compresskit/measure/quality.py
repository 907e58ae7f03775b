"""How good a model's outputs are, by task.

classify: top-1 accuracy against labels. embed: against the teacher's embeddings of the same
samples, the mean cosine similarity and the top-1 nearest-neighbour agreement (for each sample,
is its nearest other sample by the model's embeddings the one the teacher's embeddings pick?).
The first metric of each task is the one reports rank by.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRICS = {"classify": ("accuracy",), "embed": ("cosine", "nn_agreement"),
           "causal-lm": ("perplexity", "agreement")}
LABELS = {"accuracy": "accuracy", "cosine": "cosine to teacher",
          "nn_agreement": "NN agreement", "perplexity": "perplexity",
          "agreement": "next-token agreement with the teacher"}


def primary(task: str) -> str:
    return METRICS[task][0]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((_unit(a) * _unit(b)).sum(axis=1).mean())


def nn_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of samples whose nearest other sample (cosine) is the same under a and b."""
    if len(a) < 2:
        return 1.0

    def nearest(x: np.ndarray) -> np.ndarray:
        sim = _unit(x) @ _unit(x).T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float((nearest(a) == nearest(b)).mean())


def score(task: str, outputs: Any, target: Any) -> dict[str, float]:
    """The task's metrics of `outputs` against `target` (labels, or the teacher's embeddings)."""
    out = np.asarray(outputs)
    tgt = np.asarray(target)
    if task == "embed":
        return {"cosine": mean_cosine(out, tgt), "nn_agreement": nn_agreement(out, tgt)}
    return {"accuracy": float((out.argmax(axis=1) == tgt).mean())}


def main(task: str, outputs: Any, target: Any) -> float:
    return score(task, outputs, target)[primary(task)]


def worse_beyond_chance(before: np.ndarray, after: np.ndarray, level: float = 0.05
                        ) -> tuple[bool, dict[str, float]]:
    """Whether `after` classifies the same samples worse than `before` by more than chance: an
    exact one-sided sign test (McNemar's) on the samples the two disagree on. `before` and
    `after` say, per sample, whether each model was right. On a validation split of a hundred
    samples one sample is a point, and fine-tuning moves near-ties either way: a lower accuracy
    by one or two samples is not a worse model. Returns the verdict and what it rests on."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    lost = int((before & ~after).sum())    # right before, wrong after
    gained = int((~before & after).sum())  # wrong before, right after
    n = lost + gained
    # P(at least `lost` of the n disagreements go against `after` | each way equally likely)
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0
    return p < level, {"lost": lost, "gained": gained, "p_value": p}
